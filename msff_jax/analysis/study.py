"""The whole experiment in one command: four ablations, three baselines, then the report.

    python -m msff_jax.analysis.study --data_dir data/deepfashion15 --runs_dir runs/study \
        [--models msff_base,resnet50] [--demo] [--tiny] [--config.batch_size=128 ...]

Each model trains in its own `launch.py` process (`--config configs/study.py:MODEL`,
workdir RUNS_DIR/MODEL) with the same recipe and the same `--config.*` overrides, so a
crash in one run is reported (with the tail of its log, RUNS_DIR/MODEL/launch.log) and
the others still run. A run whose eval_results.json exists is finished and skipped, and
an unfinished one resumes from its checkpoints, so rerunning the command after an
interruption continues where it stopped. Finally `RUNS_DIR/report.md` is written
(`msff_jax.analysis.report`), with throughput when RUNS_DIR/benchmark/benchmark.csv exists
(`python launch.py --config configs/benchmark.py --workdir RUNS_DIR/benchmark --mode benchmark`).

`--demo` uses the CPU miniature recipe of configs/demo.py (its synthetic data is made on
the first run when --data_dir holds no manifest); `--tiny` uses TINY_OVERRIDES.

Exit status: 0 when every model has results, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from msff_jax.analysis import paper_tables

REPO_ROOT = Path(__file__).resolve().parent.parent
LOG_FILE = "launch.log"
_LOG_TAIL_LINES = 25


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m msff_jax.analysis.study",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs_dir", required=True)
    parser.add_argument("--data_dir", default=None,
                        help="shards (manifest.json); with --demo, made there if missing "
                             "(default RUNS_DIR/data/shards)")
    parser.add_argument("--models", default=",".join(paper_tables.STUDY_MODELS),
                        help="comma-separated subset of the study's models")
    parser.add_argument("--demo", action="store_true", help="configs/demo.py's CPU recipe")
    parser.add_argument("--tiny", action="store_true", help="TINY_OVERRIDES (tests)")
    parser.add_argument("--skip_report", action="store_true")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognised arguments {bad}; only --config.FIELD=VALUE overrides "
                     "are passed on to launch.py")
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(paper_tables.STUDY_MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; the study's are {paper_tables.STUDY_MODELS}")
    args.models = models
    if args.data_dir is None:
        if not args.demo:
            parser.error("--data_dir is required (except with --demo)")
        args.data_dir = str(Path(args.runs_dir) / "data" / "shards")
    return args, rest


def launch_command(model: str, args: argparse.Namespace, overrides: Sequence[str]) -> list[str]:
    options = "".join(f",{name}" for name, on in (("demo", args.demo), ("tiny", args.tiny)) if on)
    return [sys.executable, str(REPO_ROOT / "launch.py"),
            f"--config={REPO_ROOT / 'configs' / 'study.py'}:{model}{options}",
            f"--workdir={Path(args.runs_dir).absolute() / model}",
            "--mode=train", f"--config.data_dir={Path(args.data_dir).absolute()}", *overrides]


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_model(model: str, args: argparse.Namespace, overrides: Sequence[str]) -> str:
    """Trains and evaluates one model unless finished; returns its status."""
    workdir = Path(args.runs_dir) / model
    if (workdir / "eval_results.json").exists():
        print(f"[study] {model}: finished earlier, skipped", flush=True)
        return "skipped (finished)"
    workdir.mkdir(parents=True, exist_ok=True)
    command = launch_command(model, args, overrides)
    print(f"[study] {model}: {' '.join(command[1:])}", flush=True)
    start = time.time()
    with (workdir / LOG_FILE).open("a") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        log.flush()
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=REPO_ROOT, env=os.environ.copy()).returncode
    minutes = (time.time() - start) / 60
    if returncode != 0:
        print(f"[study] {model}: FAILED (exit {returncode}) after {minutes:.1f} min; "
              f"last lines of {workdir / LOG_FILE}:\n{_tail(workdir / LOG_FILE)}", flush=True)
        return f"failed (exit {returncode})"
    if not (workdir / "eval_results.json").exists():
        print(f"[study] {model}: launch.py exited 0 but wrote no eval_results.json", flush=True)
        return "failed (no eval_results.json)"
    print(f"[study] {model}: done in {minutes:.1f} min", flush=True)
    return "trained"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, overrides = parse_args(argv)
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
    statuses = {model: run_model(model, args, overrides) for model in args.models}

    print("\n[study] summary", flush=True)
    for model, status in statuses.items():
        results_path = Path(args.runs_dir) / model / "eval_results.json"
        top1 = ""
        if results_path.exists():
            top1 = f"top-1 {100 * json.loads(results_path.read_text())['top1']:.2f}%"
        print(f"  {model:<20} {status:<28} {top1}", flush=True)
    if not args.skip_report:
        from msff_jax.analysis import report

        path = report.write_report(Path(args.runs_dir))
        print(f"[study] report: {path}", flush=True)
    failed = [m for m, status in statuses.items() if status.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
