"""The paper's study in one command: ablations and baselines, several seeds, side by side
on the GPUs of a host, then the report with confidence intervals and significance tests.

    python -m msff_jax.analysis.study --data_dir data/deepfashion15 --runs_dir runs/study \
        [--seeds 3] [--parallel 8 [--devices_per_run 1]] [--matched_ablations] \
        [--models msff_base,resnet50] [--demo] [--tiny] [--config.batch_size=128 ...]

Every (model, seed) pair trains in its own `launch.py` process (`--config
configs/study.py:MODEL --config.seed=SEED`, workdir RUNS_DIR/MODEL/seedSEED) with the same
recipe and the same `--config.*` overrides. Why one process per run: a crash in one run is
reported (with the tail of its log, WORKDIR/launch.log) and the others still run, and each
process can be confined to its own GPUs. A run whose eval_results.json exists is finished
and skipped; an unfinished one resumes from its checkpoints, so rerunning the command
after an interruption continues where it stopped.

Side by side: `--parallel N` runs N trainings at once, each on its own group of
`--devices_per_run` GPUs (default: the visible GPUs divided by N) through
CUDA_VISIBLE_DEVICES; groups never overlap and a freed group takes the next waiting run.
On a machine without GPUs the runs are sequential whatever --parallel says (they would
only compete for the same cores).

`--matched_ablations` adds `msff_base@matched` and `msff_iasm@matched`, whose conv unit is
narrowed to the full model's parameter count (configs/study.py), beside the literal ones.

Each workdir gets `study_run.json` (variant, seed, status, wall time, device kind and
count, device-hours, one entry per attempt, written when the attempt starts and completed
when it ends, so an attempt killed with the study still counts: `run_record`); the run
itself writes eval_results.json and test_predictions.npz. Finally `RUNS_DIR/report.md` is written by
`msff_jax.analysis.report`, from those files only (`python launch.py --mode report
--workdir RUNS_DIR` writes it again without a GPU).

`--demo` uses the CPU miniature recipe of configs/demo.py (its synthetic data is made
once, before any run, when --data_dir holds no manifest); `--tiny` uses TINY_OVERRIDES.

Exit status: 0 when every run has results, 1 otherwise.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import platform
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from absl import flags

from msff_jax import console
from msff_jax.analysis import paper_tables
from msff_jax.analysis import run_record
from msff_jax.console import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
LOG_FILE = run_record.LOG_FILE
RUN_RECORD = run_record.RUN_RECORD
MATCHED = "@matched"
MATCHED_MODELS = ("msff_base", "msff_iasm")
_LOG_TAIL_LINES = 25
_print_lock = threading.Lock()


def _say(message: str) -> None:
    with _print_lock:
        print(f"[study] {message}", flush=True)


# ----------------------------------------------------------------------------- flags


def _define_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_string("runs_dir", None, "Where every run's workdir and the report go.",
                        flag_values=values)
    flags.DEFINE_string("data_dir", None, "Shards (manifest.json); with --demo, made there if "
                        "missing (default RUNS_DIR/data/shards).", flag_values=values)
    flags.DEFINE_list("models", list(paper_tables.STUDY_MODELS),
                      "Comma-separated subset of the study's models.", flag_values=values)
    flags.DEFINE_integer("seeds", 1, "Runs per model, with seeds 0..N-1 (3 recommended for "
                         "claims: the report then gives the spread over seeds).",
                         lower_bound=1, flag_values=values)
    flags.DEFINE_integer("parallel", 1, "Runs at once, each on its own GPUs (a CPU-only "
                         "machine runs them one at a time).", lower_bound=1, flag_values=values)
    flags.DEFINE_integer("devices_per_run", 0, "GPUs per run when side by side; 0: the "
                         "visible GPUs divided by --parallel.", lower_bound=0, flag_values=values)
    flags.DEFINE_bool("matched_ablations", False, "Also run msff_base@matched and "
                      "msff_iasm@matched (the conv unit narrowed to the full model's "
                      "parameter count).", flag_values=values)
    flags.DEFINE_bool("demo", False, "configs/demo.py's CPU recipe.", flag_values=values)
    flags.DEFINE_bool("tiny", False, "TINY_OVERRIDES (tests).", flag_values=values)
    flags.DEFINE_bool("skip_report", False, "Do not write report.md.", flag_values=values)


@dataclasses.dataclass(frozen=True)
class Options:
    runs_dir: Path
    data_dir: Path
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    parallel: int
    devices_per_run: int
    demo: bool
    tiny: bool
    skip_report: bool
    overrides: tuple[str, ...]
    verbosity: Optional[int] = None
    show_traceback: bool = False


def parse_args(argv: Sequence[str]) -> Options:
    """`argv` without the program name. `--config.FIELD=VALUE` arguments are passed on to
    every launch.py; anything else unknown is an error."""
    overrides = [a for a in argv if a.startswith("--config.")]
    values = flags.FlagValues()
    _define_flags(values)
    console.define_common_flags(values)
    rest = console.parse_flags(values, [a for a in argv if not a.startswith("--config.")],
                               program="msff-study", doc=__doc__)
    if rest:
        raise ConfigError(f"unrecognised arguments {rest}; only --config.FIELD=VALUE "
                          "overrides are passed on to launch.py")
    if values.runs_dir is None:
        raise ConfigError("--runs_dir is required")
    seeded = [a for a in overrides if a.split("=", 1)[0] == "--config.seed"]
    if seeded:
        raise ConfigError(f"{seeded[0]}: the study sets each run's seed itself; "
                         "use --seeds N for seeds 0..N-1")
    models = [m for m in values.models if m]
    unknown = sorted(set(models) - set(paper_tables.STUDY_MODELS))
    if unknown:
        raise ConfigError(f"unknown models {unknown}; the study's are "
                         f"{list(paper_tables.STUDY_MODELS)}")
    variants = list(models)
    if values.matched_ablations:
        variants += [m + MATCHED for m in MATCHED_MODELS if m in models]
    if values.data_dir is None and not values.demo:
        raise ConfigError("--data_dir is required (except with --demo)")
    runs_dir = Path(values.runs_dir).absolute()
    data_dir = Path(values.data_dir or runs_dir / "data" / "shards").absolute()
    return Options(runs_dir=runs_dir, data_dir=data_dir, variants=tuple(variants),
                   seeds=tuple(range(values.seeds)), parallel=values.parallel,
                   devices_per_run=values.devices_per_run, demo=values.demo, tiny=values.tiny,
                   skip_report=values.skip_report, overrides=tuple(overrides),
                   verbosity=values.verbosity, show_traceback=values.show_traceback)


# ----------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training: a variant (a study model, or MODEL@matched) and a seed."""

    variant: str
    seed: int
    workdir: Path

    @property
    def model(self) -> str:
        return self.variant.removesuffix(MATCHED)

    @property
    def name(self) -> str:
        return f"{self.variant} seed {self.seed}"


def run_workdir(runs_dir: Path, variant: str, seed: int) -> Path:
    return Path(runs_dir) / variant / f"seed{seed}"


def plan_runs(options: Options) -> list[RunSpec]:
    """Seed-major: every model's seed 0 first, so an interrupted study has complete
    comparisons for its first seeds."""
    return [RunSpec(variant, seed, run_workdir(options.runs_dir, variant, seed))
            for seed in options.seeds for variant in options.variants]


def launch_command(spec: RunSpec, options: Options) -> list[str]:
    config_options = "".join(f",{name}" for name, on in
                             (("demo", options.demo), ("tiny", options.tiny)) if on)
    return [sys.executable, str(REPO_ROOT / "launch.py"),
            f"--config={REPO_ROOT / 'configs' / 'study.py'}:{spec.variant}{config_options}",
            f"--workdir={spec.workdir}", "--mode=train",
            f"--config.data_dir={options.data_dir}", f"--config.seed={spec.seed}",
            *options.overrides]


# ----------------------------------------------------------------------------- devices


@dataclasses.dataclass(frozen=True)
class Devices:
    """The accelerators runs may be given: `ids` for CUDA_VISIBLE_DEVICES (empty on a
    CPU-only machine) and what they are, for the cost table."""

    kind: str
    ids: tuple[str, ...] = ()


def detect_devices() -> Devices:
    """NVIDIA GPUs from nvidia-smi (restricted to CUDA_VISIBLE_DEVICES when set), else the
    CPU. nvidia-smi rather than JAX: initialising JAX here would take GPU memory from the
    runs."""
    try:
        listing = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,uuid,name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    gpus = [[field.strip() for field in line.split(",", 2)]
            for line in listing.splitlines() if line.count(",") >= 2]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = [v.strip() for v in visible.split(",") if v.strip()]
        gpus = [g for g in gpus if g[0] in wanted or g[1] in wanted]
        # Keep the user's order and spelling (index or UUID).
        gpus.sort(key=lambda g: next(i for i, w in enumerate(wanted) if w in g[:2]))
        ids = tuple(next(w for w in wanted if w in g[:2]) for g in gpus)
    else:
        ids = tuple(g[0] for g in gpus)
    if not gpus:
        return Devices(kind=f"cpu ({platform.processor() or platform.machine()}, "
                            f"{os.cpu_count()} cores)")
    names = sorted({g[2] for g in gpus})
    return Devices(kind=" / ".join(names), ids=ids)


def device_groups(devices: Devices, parallel: int, devices_per_run: int = 0
                  ) -> list[tuple[str, ...]]:
    """Disjoint groups of device ids, one per run slot. No GPUs: one slot (sequential),
    the runs see the whole CPU."""
    if not devices.ids:
        if parallel > 1:
            _say(f"no GPUs visible: running one at a time, not --parallel {parallel}")
        return [()]
    per_run = devices_per_run or len(devices.ids) // parallel
    if per_run < 1 or parallel * per_run > len(devices.ids):
        raise ConfigError(
            f"--parallel {parallel} x --devices_per_run {per_run or devices_per_run} "
            f"needs {parallel * max(per_run, 1)} GPUs; {len(devices.ids)} are visible "
            f"({', '.join(devices.ids)})")
    return [devices.ids[i * per_run:(i + 1) * per_run] for i in range(parallel)]


# ----------------------------------------------------------------------------- one run


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_one(spec: RunSpec, command: Sequence[str], group: tuple[str, ...],
            devices: Devices) -> str:
    """Trains and evaluates one run unless finished, on the devices of `group`; returns
    its status and records its cost."""
    # An attempt the study was killed in (its end never recorded) is closed first, its
    # time read from the run's files: the cost table keeps it.
    run_record.close_open_attempts(spec.workdir)
    if (spec.workdir / "eval_results.json").exists():
        _say(f"{spec.name}: finished earlier, skipped")
        return "skipped (finished)"
    spec.workdir.mkdir(parents=True, exist_ok=True)
    env = os.environ.copy()
    where = "cpu"
    if group:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(group)
        where = f"GPUs {','.join(group)}"
    _say(f"{spec.name} on {where}: {' '.join(command[1:])}")
    started = time.time()
    attempt = run_record.begin_attempt(spec.workdir, variant=spec.variant, model=spec.model,
                                       seed=spec.seed, devices=list(group),
                                       device_kind=devices.kind, started=started)
    with (spec.workdir / LOG_FILE).open("a") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} CUDA_VISIBLE_DEVICES="
                  f"{','.join(group)} {' '.join(command)}\n")
        log.flush()
        returncode = subprocess.run(list(command), stdout=log, stderr=subprocess.STDOUT,
                                    cwd=REPO_ROOT, env=env).returncode
    finished = time.time()
    minutes = (finished - started) / 60
    if returncode != 0:
        status = f"failed (exit {returncode})"
        _say(f"{spec.name}: FAILED (exit {returncode}) after {minutes:.1f} min; last lines of "
             f"{spec.workdir / LOG_FILE}:\n{_tail(spec.workdir / LOG_FILE)}")
    elif not (spec.workdir / "eval_results.json").exists():
        status = "failed (no eval_results.json)"
        _say(f"{spec.name}: launch.py exited 0 but wrote no eval_results.json "
             "(preempted? rerun the study to resume)")
    else:
        status = "trained"
        _say(f"{spec.name}: done in {minutes:.1f} min")
    run_record.end_attempt(spec.workdir, attempt, returncode=returncode, status=status,
                           ended=finished)
    return status


def run_all(specs: Sequence[RunSpec], groups: Sequence[tuple[str, ...]], devices: Devices,
            command_for: Callable[[RunSpec], Sequence[str]]) -> dict[RunSpec, str]:
    """Runs `specs` with at most len(groups) at once, each holding one device group for
    its whole run. A run that fails or raises is reported; the others go on."""
    free: queue.Queue = queue.Queue()
    for group in groups:
        free.put(tuple(group))

    def job(spec: RunSpec) -> str:
        group = free.get()
        try:
            return run_one(spec, command_for(spec), group, devices)
        except Exception as err:  # noqa: BLE001 - one broken run must not stop the study
            _say(f"{spec.name}: FAILED ({type(err).__name__}: {err})")
            return f"failed ({type(err).__name__})"
        finally:
            free.put(group)

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(groups)) as pool:
        futures = {spec: pool.submit(job, spec) for spec in specs}
        return {spec: future.result() for spec, future in futures.items()}


# ----------------------------------------------------------------------------- main


def _prepare_demo_data(options: Options) -> None:
    """Makes the demo's synthetic shards once, before runs that could race to make them."""
    if (options.data_dir / "manifest.json").exists():
        return
    from configs import demo
    from msff_jax.train import demo_data

    config = demo.get_config()
    config.data_dir = str(options.data_dir)
    demo_data.prepare_data(config, str(options.runs_dir))  # Says where it makes them.


def main(argv: Optional[Sequence[str]] = None, *, devices: Optional[Devices] = None) -> int:
    """`argv` without the program name (default sys.argv[1:]); `devices` replaces
    detection (tests). A mistake prints one line and returns non-zero."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parsed: list[Options] = []
    status = console.guarded(lambda: parsed.append(parse_args(argv)),
                             show_traceback=console.traceback_asked(argv))
    if status:
        return status
    options = parsed[0]
    return console.guarded(lambda: _study(options, devices), show_traceback=options.show_traceback)


def _study(options: Options, devices: Optional[Devices]) -> int:
    console.setup_logging(options.verbosity)
    options.runs_dir.mkdir(parents=True, exist_ok=True)
    devices = devices or detect_devices()
    groups = device_groups(devices, options.parallel, options.devices_per_run)
    if options.demo:
        _prepare_demo_data(options)
    specs = plan_runs(options)
    _say(f"{len(specs)} runs ({len(options.variants)} models x {len(options.seeds)} seeds), "
         f"{len(groups)} at a time on {devices.kind}")
    statuses = run_all(specs, groups, devices, lambda spec: launch_command(spec, options))

    _say("summary")
    for spec, status in statuses.items():
        results_path = spec.workdir / "eval_results.json"
        top1 = ""
        if results_path.exists():
            top1 = f"top-1 {100 * json.loads(results_path.read_text())['top1']:.2f}%"
        print(f"  {spec.variant:<24} seed {spec.seed:<3} {status:<30} {top1}", flush=True)
    if not options.skip_report:
        from msff_jax.analysis import report

        path = report.write_report(options.runs_dir)
        _say(f"report: {path}")
    failed = [spec for spec, status in statuses.items() if status.startswith("failed")]
    return 1 if failed else 0


def run() -> None:
    """Console entry point (`msff-study`)."""
    console.entry_point(main)


if __name__ == "__main__":
    run()
