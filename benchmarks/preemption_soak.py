"""Preemption soak: SIGTERM a tiny training run at random moments, rerun, compare.

    python -m benchmarks.preemption_soak --runs 50 [--root DIR] [--seed S]

One uninterrupted reference run first (digits shards, a tiny MSFF-EComNet, one decode
worker); then, `--runs` times: start the same run in a session of its own, wait a random
time between 0 and the reference's wall time, send SIGTERM to its process group or to the
main process only (chosen at random), and check that

- it exits 0 with no traceback, dead decode worker or leaked shared memory in its output;
- the rerun of the same command exits 0 just as cleanly, and its final parameters equal
  the reference's bitwise.

A run failing any check is lost. The table counts ok and lost runs by the phase the
signal landed in (the trainer's "SIGTERM received ... during PHASE" line).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAILURE_WORDS = ("Traceback", "terminated unexpectedly", "leaked", "resource_tracker")

# configs/digits.py:tiny (as the resume tests), with one decode worker: the soak also
# signals while worker processes start and stop.
CONFIG = '''
from configs import digits


def get_config():
    config = digits.get_config("tiny")
    config.data_dir = {data_dir!r}
    config.data.worker_count = 1
    return config
'''


def _env(cache_dir: str) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
                JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _command(config_path: str, workdir: str) -> list:
    return [sys.executable, "launch.py", "--config", config_path, "--workdir", workdir]


def _clean(log: str) -> str | None:
    """The first failure word in `log`, or None."""
    return next((word for word in FAILURE_WORDS if word in log), None)


def _run(config_path, workdir, env, *, signal_after=None, to_group=True):
    """(return code, output, seconds); with `signal_after`, SIGTERM after that many seconds."""
    start = time.monotonic()
    process = subprocess.Popen(_command(config_path, workdir), cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    if signal_after is not None:
        try:
            process.wait(timeout=signal_after)
        except subprocess.TimeoutExpired:
            if to_group:
                os.killpg(process.pid, signal.SIGTERM)
            else:
                process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=900)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, output, time.monotonic() - start


def _final_params(config_path: str, workdir: str):
    import importlib.util

    import jax

    from msff_jax.train import checkpoints

    spec = importlib.util.spec_from_file_location("soak_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    variables, step = checkpoints.restore_for_inference(module.get_config(), workdir, "latest")
    return jax.device_get(variables), step


def _equal(a, b) -> bool:
    import jax
    import numpy as np

    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    return tree_a == tree_b and all(x.dtype == y.dtype and np.array_equal(x, y)
                                    for x, y in zip(leaves_a, leaves_b))


def _phase(output: str) -> str:
    match = re.search(r"SIGTERM received \(\w+\) during (.+?): ", output)
    if not match:
        return "no SIGTERM taken (run over, or not yet listening)"
    # "the val evaluation of step 5" -> "the val evaluation": counts by kind of phase.
    return re.sub(r" (of )?step \d+", "", match.group(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--root", default=None, help="working directory (default: a new temporary one)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    root = args.root or tempfile.mkdtemp(prefix="preemption_soak_")
    os.makedirs(root, exist_ok=True)
    rng = random.Random(args.seed)
    from data_pipeline.conversion import digits
    from msff_jax import console

    console.setup_logging(None)  # This process reads checkpoints: Orbax's notes stay quiet.

    data_dir = os.path.join(root, "digits")
    if not os.path.isfile(os.path.join(data_dir, "manifest.json")):
        digits.write_digits_shards(data_dir, image_size=32, seed=0)
    config_path = os.path.join(root, "soak_config.py")
    with open(config_path, "w") as f:
        f.write(CONFIG.format(data_dir=data_dir))
    env = _env(os.path.join(root, "jax_cache"))

    reference = os.path.join(root, "reference")
    _run(config_path, reference + "_warmup", env)  # Fills the compilation cache.
    code, output, seconds = _run(config_path, reference, env)
    if code != 0 or _clean(output):
        print(output[-3000:])
        print(f"the reference run failed (exit {code}); nothing measured")
        return 1
    reference_params, _ = _final_params(config_path, reference)
    print(f"reference run: {seconds:.1f} s; signals land uniformly in [0, {seconds:.1f}] s", flush=True)

    counts = collections.defaultdict(collections.Counter)
    for run in range(args.runs):
        workdir = os.path.join(root, f"run{run:03d}")
        delay, to_group = rng.uniform(0, seconds), rng.random() < 0.5
        code, output, _ = _run(config_path, workdir, env, signal_after=delay, to_group=to_group)
        phase = _phase(output)
        problem = None
        if code != 0:
            problem = f"exit {code}"
        elif _clean(output):
            problem = f"'{_clean(output)}' in its output"
        else:
            code, rerun_output, _ = _run(config_path, workdir, env)
            if code != 0 or _clean(rerun_output):
                problem = f"rerun: exit {code}" + (f", '{_clean(rerun_output)}'" if _clean(rerun_output) else "")
            elif not _equal(_final_params(config_path, workdir)[0], reference_params):
                problem = "resumed parameters differ from the reference"
        counts[phase]["lost" if problem else "ok"] += 1
        target = "group" if to_group else "main process"
        print(f"run {run + 1}/{args.runs}: SIGTERM to the {target} at {delay:.1f} s, during {phase}: "
              f"{problem or 'ok'}", flush=True)
        if problem:
            with open(os.path.join(root, f"run{run:03d}.log"), "w") as f:
                f.write(output)

    print(f"\n{'phase':<58} {'ok':>4} {'lost':>4}")
    for phase, count in sorted(counts.items()):
        print(f"{phase:<58} {count['ok']:>4} {count['lost']:>4}")
    lost = sum(count["lost"] for count in counts.values())
    print(f"{'all':<58} {args.runs - lost:>4} {lost:>4}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
