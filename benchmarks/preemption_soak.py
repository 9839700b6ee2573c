"""Preemption soak: interrupt a tiny training run at random moments, rerun, compare.

    python -m benchmarks.preemption_soak --runs 50 [--phases sigterm,second_launch,sigkill]
                                         [--root DIR] [--seed S]

One uninterrupted reference run first (digits shards, a tiny MSFF-EComNet, one decode
worker); then, for each phase, `--runs` times: start the same run in a session of its
own, wait a random time between 0 and the reference's wall time, and

- sigterm: send SIGTERM to its process group or to the main process only (chosen at
  random); it must exit 0 with no traceback, dead decode worker or leaked shared memory
  in its output;
- second_launch: start the same command again on the same workdir (the first time with
  no wait at all: two launches together); one of the two must be refused with one error
  line naming the other, which must exit 0 just as cleanly, or, if the first had ended,
  the second must find the run finished;
- sigkill: SIGKILL its main process only (what the OOM killer does);

then the rerun of the same command (sigterm, sigkill) must exit 0 just as cleanly, the
final parameters must equal the reference's bitwise, and 20 s after the run ended no
process of its process group may be left, nor shared memory its decode workers made
(orphans). A run failing any check is lost. The tables count ok and lost runs by the
phase the signal landed in (the trainer's "SIGTERM received ... during PHASE" line), by
how the second launch ended, and by the last line the killed run had logged.
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
PHASES = ("sigterm", "second_launch", "sigkill")
ORPHAN_GRACE_SECS = 20

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


class Run:
    """One launch.py in a session of its own, its output in a file (a pipe would keep
    the reader waiting on whatever process still holds it)."""

    def __init__(self, config_path, workdir, env, log_path):
        self.log_path = log_path
        self.started = time.monotonic()
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(_command(config_path, workdir), cwd=REPO, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def wait_or_signal(self, after: float | None, sig=signal.SIGTERM, to_group: bool = True) -> bool:
        """Sends `sig` after `after` seconds unless the run ended first; True if sent."""
        if after is None:
            return False
        try:
            self.process.wait(timeout=after)
            return False
        except subprocess.TimeoutExpired:
            (os.killpg if to_group else os.kill)(self.process.pid, sig)
            return True

    def finish(self, timeout: float = 900) -> tuple[int, str, float]:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        with open(self.log_path) as f:
            return self.process.returncode, f.read(), time.monotonic() - self.started


def _run(config_path, workdir, env, log_path) -> tuple[int, str, float]:
    return Run(config_path, workdir, env, log_path).finish()


def _group_left(pgid: int) -> list[int]:
    """Processes still running (zombies aside) in process group `pgid`."""
    from data_pipeline.records.worker_lifetime import stat_fields

    left = []
    for name in os.listdir("/proc"):
        fields = stat_fields(name) if name.isdigit() else None
        if fields and int(fields[2]) == pgid and fields[0] != "Z":
            left.append(int(name))
    return left


def _orphans(pid: int) -> str | None:
    """What the run started by `pid` left behind once given ORPHAN_GRACE_SECS: live
    processes of its group, shared memory of its decode workers."""
    from data_pipeline.records import worker_lifetime

    deadline = time.monotonic() + ORPHAN_GRACE_SECS
    while True:
        processes = _group_left(pid)
        blocks = [n for n in os.listdir(worker_lifetime.SHM_DIR)
                  if n.startswith(worker_lifetime.SHM_PREFIX) and f"_{pid}_" in n]
        if not (processes or blocks) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for process in processes:  # Leave the machine as it was for the next run.
        try:
            os.kill(process, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if processes or blocks:
        return f"{len(processes)} processes and {len(blocks)} shared-memory blocks left"
    return None


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


def _clean_exit(code: int, output: str) -> bool:
    return code == 0 and not _clean(output)


def _refused(code: int, output: str, holder_pid: int) -> bool:
    """Exit 1 with one error line, the refusal naming `holder_pid`, and nothing else wrong."""
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    return (code == 1 and len(errors) == 1 and "is in use by another run" in errors[0]
            and f"pid {holder_pid}," in errors[0] and not _clean(output))


def _sigterm_phase(output: str) -> str:
    match = re.search(r"SIGTERM received \(\w+\) during (.+?): ", output)
    if not match:
        return "no SIGTERM taken (run over, or not yet listening)"
    # "the val evaluation of step 5" -> "the val evaluation": counts by kind of phase.
    return re.sub(r" (of )?step \d+", "", match.group(1))


def _last_progress(output: str) -> str:
    """Where a SIGKILLed run was: the kind of its last progress line."""
    kinds = {"step ": "after a training step", "eval step": "after an evaluation or checkpoint",
             "done in": "after the final report"}
    where = "during start-up"
    for line in output.splitlines():
        where = next((kind for prefix, kind in kinds.items() if line.startswith(prefix)), where)
    return where


class Soak:
    def __init__(self, root, config_path, env, reference_params, seconds, rng):
        self.root, self.config_path, self.env = root, config_path, env
        self.reference_params, self.seconds, self.rng = reference_params, seconds, rng

    def _rerun_matches(self, workdir: str, log_path: str) -> str | None:
        code, output, _ = _run(self.config_path, workdir, self.env, log_path)
        if code != 0 or _clean(output):
            return f"rerun: exit {code}" + (f", '{_clean(output)}'" if _clean(output) else "")
        return self._matches(workdir)

    def _matches(self, workdir: str) -> str | None:
        if not _equal(_final_params(self.config_path, workdir)[0], self.reference_params):
            return "final parameters differ from the reference"
        return None

    # Each phase returns (what was done, where it landed, the problem or None, orphans).

    def sigterm(self, workdir, log_path, number):
        delay, to_group = self.rng.uniform(0, self.seconds), self.rng.random() < 0.5
        run = Run(self.config_path, workdir, self.env, log_path)
        run.wait_or_signal(delay, signal.SIGTERM, to_group)
        code, output, _ = run.finish()
        where = _sigterm_phase(output)
        problem = orphans = _orphans(run.process.pid)
        if problem is None and code != 0:
            problem = f"exit {code}"
        elif problem is None and _clean(output):
            problem = f"'{_clean(output)}' in its output"
        problem = problem or self._rerun_matches(workdir, log_path + ".rerun")
        return (f"SIGTERM to the {'group' if to_group else 'main process'} at {delay:.1f} s", where, problem,
                bool(orphans))

    def second_launch(self, workdir, log_path, number):
        delay = 0.0 if number == 0 else self.rng.uniform(0, self.seconds)
        first = Run(self.config_path, workdir, self.env, log_path)
        try:
            first.process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            pass
        first_ended = first.process.poll() is not None
        second = Run(self.config_path, workdir, self.env, log_path + ".second")
        code2, output2, _ = second.finish()
        code1, output1, _ = first.finish()
        problem = orphans = _orphans(first.process.pid) or _orphans(second.process.pid)
        if _refused(code2, output2, first.process.pid) and _clean_exit(code1, output1):
            where = "the second refused"
        elif _refused(code1, output1, second.process.pid) and _clean_exit(code2, output2):
            where = "the first refused (started together, the second took the lock)"
        elif _clean_exit(code1, output1) and _clean_exit(code2, output2) \
                and re.search(r"resuming from .* step 12\b", output2):
            where = "the second ran after the first ended" + ("" if first_ended else " (during its exit)")
        else:
            where = "neither refused nor after the first"
            problem = problem or f"exits {code1} and {code2}, not one clean run and one refusal"
        problem = problem or self._matches(workdir)
        return f"second launch after {delay:.1f} s", where, problem, bool(orphans)

    def sigkill(self, workdir, log_path, number):
        delay = self.rng.uniform(0, self.seconds)
        run = Run(self.config_path, workdir, self.env, log_path)
        sent = run.wait_or_signal(delay, signal.SIGKILL, to_group=False)
        code, output, _ = run.finish()
        where = _last_progress(output) if sent else "run over before the signal"
        problem = orphans = _orphans(run.process.pid)
        if problem is None and not sent and (code != 0 or _clean(output)):
            problem = f"exit {code}"
        problem = problem or self._rerun_matches(workdir, log_path + ".rerun")
        return f"SIGKILL to the main process at {delay:.1f} s", where, problem, bool(orphans)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="random moments per phase")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {PHASES}")
    parser.add_argument("--root", default=None, help="working directory (default: a new temporary one)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phases {unknown}; known: {PHASES}")
    root = args.root or tempfile.mkdtemp(prefix="preemption_soak_")
    os.makedirs(root, exist_ok=True)
    rng = random.Random(args.seed)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # This process only reads CPU runs' checkpoints.
    from msff_jax import cuda_plugin

    cuda_plugin.quiet_start()  # Without the plugin's driver notices.
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
    _run(config_path, reference + "_warmup", env, reference + "_warmup.log")  # Fills the compilation cache.
    code, output, seconds = _run(config_path, reference, env, reference + ".log")
    if code != 0 or _clean(output):
        print(output[-3000:])
        print(f"the reference run failed (exit {code}); nothing measured")
        return 1
    soak = Soak(root, config_path, env, _final_params(config_path, reference)[0], seconds, rng)
    print(f"reference run: {seconds:.1f} s; moments drawn uniformly in [0, {seconds:.1f}] s", flush=True)

    lost_total = 0
    for phase in phases:
        counts = collections.defaultdict(collections.Counter)
        for run in range(args.runs):
            name = f"{phase}{run:03d}"
            workdir, log_path = os.path.join(root, name), os.path.join(root, f"{name}.log")
            what, where, problem, orphaned = getattr(soak, phase)(workdir, log_path, run)
            counts[where]["lost" if problem else "ok"] += 1
            counts[where]["orphans"] += orphaned
            print(f"{phase} {run + 1}/{args.runs}: {what}, {where}: {problem or 'ok'}", flush=True)
            if problem:
                print(f"  logs: {log_path}*", flush=True)
        print(f"\n{phase:<58} {'ok':>4} {'lost':>4} {'orphans':>7}")
        for where, count in sorted(counts.items()):
            print(f"{where:<58} {count['ok']:>4} {count['lost']:>4} {count['orphans']:>7}")
        lost = sum(count["lost"] for count in counts.values())
        orphans = sum(count["orphans"] for count in counts.values())
        print(f"{'all':<58} {args.runs - lost:>4} {lost:>4} {orphans:>7}\n", flush=True)
        lost_total += lost
    return 1 if lost_total else 0


if __name__ == "__main__":
    sys.exit(main())
