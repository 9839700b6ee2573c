"""Speed experiments: one model option (or XLA flag) at a time, against its baseline.

The benchmark mode answers "how fast"; this script answers "what makes it faster". Each
experiment is one run of `launch.py --mode benchmark` on one model, in its own process
(XLA flags are read once per process), training step only, with one change: a model
option from `msff_jax.models` that keeps the function and the parameters
(`max_pool_backward`, `fuse_pointwise`, each against its default), a different architecture to attribute time
(no IASM, widths rounded to multiples of 32), or extra XLA flags. The baselines and
the select-and-scatter experiment also record a profiler trace, summarised per kernel
kind (`kernel_profile.md`).

    python -m benchmarks.speed_experiments --out_dir runs/speed             # one GPU
    python -m benchmarks.speed_experiments --tiny --out_dir /tmp/speed      # CPU check

Experiments run in the order listed (most informative first) until `--budget_s` is
spent; each gets at most `--experiment_limit_s`. The table printed last gives each
experiment's training images/s and its ratio to its model's baseline from the same run.
Results in `--out_dir` (default $OUT, else runs/speed): speed_experiments.csv (the
benchmark's columns, `framework` naming the experiment), speed_experiments.md (the
table) and kernel_profile.md; each experiment's own workdir and trace stay in a
scratch directory that is removed at the end.

On a host without grain/ml_collections/clu (an offline GPU host), wheels carried in
`.whl/` are installed into a scratch directory first, as `gpu_benchmark.sh` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]

from msff_jax.analysis.benchmark import outputs

# XLA's default already records fusions and cuBLAS calls into CUDA graphs (command
# buffers); adding cuDNN's convolutions is the candidate, turning them all off the
# attribution.
CUDNN_COMMAND_BUFFERS = "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"
NO_COMMAND_BUFFERS = "--xla_gpu_enable_command_buffer="


@dataclasses.dataclass
class Experiment:
    name: str
    model: str
    baseline: str  # The experiment whose rate this one is divided by.
    overrides: dict = dataclasses.field(default_factory=dict)
    xla_flags: str = ""
    profile: bool = False
    what: str = ""
    in_tiny_run: bool = True  # False where the change needs the full-size model.


EXPERIMENTS: tuple[Experiment, ...] = (
    # Ordered by what a short GPU booking needs first: the two options on both models,
    # then attributions and XLA flags.
    Experiment("msff_baseline", "msff_ecomnet", "msff_baseline", profile=True,
               what="MSFF-EComNet as benchmarked (gather max-pool backward, separate 1x1s)"),
    Experiment("msff_scatter_pool", "msff_ecomnet", "msff_baseline",
               {"max_pool_backward": "scatter"}, profile=True,
               what="max-pool backward by XLA's select-and-scatter (the default until 2026-11-27)"),
    Experiment("msff_fused_pointwise", "msff_ecomnet", "msff_baseline",
               {"fuse_pointwise": True},
               what="MSP-Conv's 1x1 convs on the block input as one conv"),
    Experiment("resnet50_baseline", "resnet50", "resnet50_baseline", profile=True,
               what="ResNet-50 as benchmarked (gather max-pool backward)"),
    Experiment("resnet50_scatter_pool", "resnet50", "resnet50_baseline",
               {"max_pool_backward": "scatter"},
               what="stem max-pool backward by XLA's select-and-scatter"),
    Experiment("msff_widths_x32", "msff_ecomnet", "msff_baseline",
               {"stage_widths": (160, 320, 640, 1280)},
               what="attribution: stage widths multiples of 32, branches of 8 "
                    "(11.22 M params, not the paper's)",
               in_tiny_run=False),
    Experiment("msff_no_iasm", "msff_msp", "msff_baseline",
               what="attribution: MSFF without IASM (ablation msff_msp)", in_tiny_run=False),
    Experiment("msff_cudnn_command_buffers", "msff_ecomnet", "msff_baseline",
               xla_flags=CUDNN_COMMAND_BUFFERS,
               what="cuDNN convolutions in CUDA graphs too"),
    Experiment("msff_no_command_buffers", "msff_ecomnet", "msff_baseline",
               xla_flags=NO_COMMAND_BUFFERS,
               what="attribution: no CUDA graphs, every kernel launched alone"),
)
BY_NAME = {e.name: e for e in EXPERIMENTS}

# A CPU flag standing in for the GPU ones in a tiny run: it checks the plumbing.
TINY_XLA_FLAGS = "--xla_cpu_enable_fast_math=false"


def _environment_with_packages(scratch: Path) -> dict[str, str]:
    """os.environ, plus carried wheels on PYTHONPATH where launch.py's imports are missing."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    missing = [m for m in ("grain", "ml_collections", "clu") if importlib.util.find_spec(m) is None]
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    if missing and wheels:
        site = scratch / "site"
        print(f"=== {', '.join(missing)} missing: installing {len(wheels)} wheels from .whl/", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
             "--no-compile", "--target", str(site), *map(str, wheels)],
            check=True,
        )
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return env


def _command(experiment: Experiment, args, workdir: Path) -> list[str]:
    config = "configs/benchmark.py:cpu_tiny" if args.tiny else "configs/benchmark.py"
    command = [
        sys.executable, "launch.py", "--mode", "benchmark", "--config", config,
        "--workdir", str(workdir),
        f"--config.benchmark.models=('{experiment.model}',)",
        f"--config.benchmark.framework=jax[{experiment.name}]",
        "--config.benchmark.include_inference=False",
        "--config.benchmark.end_to_end=False",
        f"--config.benchmark.warmup_steps={args.warmup_steps}",
        f"--config.benchmark.timed_steps={args.timed_steps}",
        f"--config.benchmark.repeats={args.repeats}",
        f"--config.model_overrides={experiment.overrides!r}",
    ]
    if experiment.profile:
        command.append(f"--config.benchmark.profile_steps={args.profile_steps}")
    return command


def _run(experiment: Experiment, args, env: dict[str, str], limit_s: float,
         scratch: Path) -> dict[str, Any]:
    # Workdirs (traces included) stay in scratch: only the summaries go to out_dir.
    workdir = scratch / experiment.name
    flags = TINY_XLA_FLAGS if (args.tiny and experiment.xla_flags) else experiment.xla_flags
    run_env = dict(env)
    if flags:
        run_env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), flags]))
    print(f"=== {experiment.name}: {experiment.what} (limit {limit_s:.0f}s)", flush=True)
    start = time.perf_counter()
    row, profile, error = None, None, None
    try:
        result = subprocess.run(
            _command(experiment, args, workdir), cwd=REPO, env=run_env,
            capture_output=True, text=True, timeout=limit_s,
        )
        if result.returncode != 0:
            error = f"exit {result.returncode}: {_last_line(result.stderr)}"
            print(result.stderr[-3000:], flush=True)
    except subprocess.TimeoutExpired:
        error = f"stopped at its {limit_s:.0f}s limit"
    csv_path = workdir / "benchmark.csv"
    if error is None:
        rows = outputs.read_csv(csv_path) if csv_path.exists() else []
        row = rows[0] if rows else None
        error = None if row else f"no result row in {csv_path}"
        profile_path = workdir / "kernel_profile.md"
        profile = profile_path.read_text() if profile_path.exists() else None
    wall_s = time.perf_counter() - start
    print(f"=== {experiment.name}: {error or 'done'} after {wall_s:.0f}s", flush=True)
    return {"experiment": experiment, "wall_s": wall_s, "error": error, "row": row,
            "profile": profile, "xla_flags": flags}


def _last_line(text: str) -> str:
    """The last non-empty line of a log (usually the exception), safe in a table cell."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:300].replace("|", "/")


def _table(outcomes: list[dict[str, Any]]) -> str:
    rates = {o["experiment"].name: o["row"]["train_samples_per_sec"] for o in outcomes if o["row"]}
    lines = [
        "| experiment | model | what | train img/s | ms/step | vs baseline | compile s | step memory GB | XLA flags |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        e, row = o["experiment"], o["row"]
        if row is None:
            lines.append(f"| {e.name} | {e.model} | {e.what} | failed: {o['error']} | | | | | |")
            continue
        base = rates.get(e.baseline)
        ratio = f"{row['train_samples_per_sec'] / base:.3f}x" if base else "no baseline"
        memory = row.get("train_memory_gb")
        lines.append(
            f"| {e.name} | {e.model} | {e.what} | {row['train_samples_per_sec']:,.1f} | "
            f"{row['train_step_time']:.2f} | {ratio} | {row['compile_s']:.1f} | "
            f"{f'{memory:.2f}' if memory else ''} | {o['xla_flags'] or ''} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", type=Path, default=Path(os.environ.get("OUT", "runs/speed")))
    parser.add_argument("--experiments", nargs="*", choices=sorted(BY_NAME),
                        help="default: all (a tiny run: those that fit tiny models)")
    parser.add_argument("--tiny", action="store_true", help="tiny models at 32 px on the CPU")
    parser.add_argument("--budget_s", type=float, default=420.0)
    parser.add_argument("--experiment_limit_s", type=float, default=150.0)
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--timed_steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile_steps", type=int, default=3)
    args = parser.parse_args(argv)

    chosen = [BY_NAME[n] for n in args.experiments] if args.experiments else [
        e for e in EXPERIMENTS if e.in_tiny_run or not args.tiny
    ]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="msff_speed_") as scratch:
        env = _environment_with_packages(Path(scratch))
        for experiment in chosen:
            left = args.budget_s - (time.perf_counter() - start)
            if left < 30:
                print(f"=== SKIPPED {experiment.name}: {left:.0f}s of the budget left", flush=True)
                continue
            limit = min(args.experiment_limit_s, left)
            outcomes.append(_run(experiment, args, env, limit, Path(scratch)))

    rows = [dict(o["row"]) for o in outcomes if o["row"]]
    outputs.write_csv(args.out_dir / "speed_experiments.csv", rows)
    table = _table(outcomes)
    (args.out_dir / "speed_experiments.md").write_text(table)
    profiles = [o["profile"] for o in outcomes if o["profile"]]
    if profiles:
        (args.out_dir / "kernel_profile.md").write_text("\n".join(profiles))
        print("\n".join(profiles))
    print(f"=== {len(rows)} of {len(chosen)} experiments measured in "
          f"{time.perf_counter() - start:.0f}s; results in {args.out_dir}\n")
    print(table)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
