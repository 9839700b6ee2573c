"""One run per workdir (msff_jax.train.workdir_lock): a second launch is refused at once
with one line naming the holder; a holder that dies (SIGKILL included), or a child it
forked that outlives it, never blocks the rerun; a requeued job can wait; the processes
of one multi-process run share the lock and a second run is refused on all of them.

Most cases use a small helper process that only holds the lock; one test launches two
real trainings together on one workdir."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from msff_jax.train import workdir_lock
from tests.test_distributed import _free_port
from tests.test_resume import REPO, launch_args, subprocess_env, write_tiny_config

# Holds WORKDIR's lock (printing "held" once it does) until killed, or for HOLD seconds;
# with FORK, first forks a child that sleeps on (as a stray worker would).
HOLDER = """
import os, sys, time
from msff_jax.train import workdir_lock
workdir, hold, fork = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "fork"
workdir_lock.acquire(workdir)
if fork and os.fork() == 0:
    time.sleep(600)
    os._exit(0)
print("held", flush=True)
time.sleep(hold)
"""


def _start_holder(workdir, hold=600.0, fork=False):
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir), str(hold),
                                "fork" if fork else "-"], cwd=REPO, stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONPATH=REPO), start_new_session=True)
    assert process.stdout.readline().strip() == "held"
    return process


def _kill_group(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    process.stdout.close()


@pytest.fixture
def release_after(tmp_path):
    yield
    for workdir in list(workdir_lock._held):
        workdir_lock.release(workdir)


def test_second_holder_is_refused_naming_the_first_and_a_killed_one_blocks_nothing(tmp_path, release_after):
    workdir = tmp_path / "work"
    holder = _start_holder(workdir)
    try:
        started = time.monotonic()
        with pytest.raises(workdir_lock.WorkdirBusyError) as refused:
            workdir_lock.acquire(str(workdir))
        assert time.monotonic() - started < 5  # At once: no waiting unless asked.
        message = str(refused.value)
        assert "\n" not in message
        assert re.search(rf"--workdir {re.escape(str(workdir))} is in use by another run \(host \S+, "
                         rf"pid {holder.pid}, since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d.*, command: \S*python\S* -c",
                         message), message
        assert f"kill {holder.pid}" in message and "workdir_lock_wait_secs" in message
    finally:
        _kill_group(holder)  # SIGKILL: nothing runs on its way out.
    # Its run.lock is left behind, with its details; it means nothing.
    assert json.loads((workdir / workdir_lock.LOCK_FILE).read_text())["pid"] == holder.pid
    workdir_lock.acquire(str(workdir))
    assert workdir_lock.holder(str(workdir))["pid"] == os.getpid()
    workdir_lock.acquire(str(workdir))  # Taking it again in the same process is a no-op.
    workdir_lock.release(str(workdir))
    assert not (workdir / workdir_lock.LOCK_FILE).exists()


def test_a_child_forked_by_the_holder_does_not_keep_the_lock(tmp_path, release_after):
    workdir = tmp_path / "work"
    holder = _start_holder(workdir, fork=True)
    children = subprocess.run(["pgrep", "-g", str(holder.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2  # The holder and the child it forked.
    try:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        workdir_lock.acquire(str(workdir))  # The child lives on, sharing the holder's file.
    finally:
        _kill_group(holder)


def test_waiting_takes_the_lock_when_the_holder_ends_or_gives_up(tmp_path, capsys, release_after):
    workdir = tmp_path / "work"
    holder = _start_holder(workdir, hold=600)
    try:
        started = time.monotonic()
        with pytest.raises(workdir_lock.WorkdirBusyError, match=r"after waiting 2 s"):
            workdir_lock.acquire(str(workdir), wait_secs=2)
        assert 2 <= time.monotonic() - started < 10
    finally:
        _kill_group(holder)
    holder = _start_holder(workdir, hold=3)  # Ends by itself, releasing on its way out.
    try:
        started = time.monotonic()
        workdir_lock.acquire(str(workdir), wait_secs=120)
        assert time.monotonic() - started < 60
        assert workdir_lock.holder(str(workdir))["pid"] == os.getpid()
    finally:
        _kill_group(holder)
    assert f"{workdir} is in use by another run (host" in capsys.readouterr().out


def test_a_workdir_made_for_the_lock_alone_is_removed_with_it(tmp_path, release_after):
    fresh = tmp_path / "fresh"
    workdir_lock.acquire(str(fresh))
    assert sorted(os.listdir(fresh)) == [workdir_lock.LOCK_FILE]
    workdir_lock.release(str(fresh))
    assert not fresh.exists()  # A failed start leaves a new workdir as it was: absent.
    used = tmp_path / "used"
    workdir_lock.acquire(str(used))
    (used / "config.json").write_text("{}")
    workdir_lock.release(str(used))
    assert sorted(os.listdir(used)) == ["config.json"]


# Joins two processes with jax.distributed, then every process takes the workdir's lock.
JOINED = """
import sys, time
from msff_jax.train import distributed, workdir_lock
address, index, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
distributed.initialize(address, 2, index)
try:
    workdir_lock.acquire(workdir)
    print("held", workdir_lock.holder(workdir)["pid"], flush=True)
except workdir_lock.WorkdirBusyError as err:
    print("refused", err, flush=True)
except Exception as err:
    print("failed", type(err).__name__, err, flush=True)
distributed.barrier("read")  # Process 0 keeps it until both have read the holder.
"""


def _joined_run(workdir):
    address = f"127.0.0.1:{_free_port()}"
    processes = [subprocess.Popen([sys.executable, "-c", JOINED, address, str(i), str(workdir)],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
                 for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    return processes, [out.strip().splitlines()[0] for out, _ in outputs]  # Then gloo's notes.


def test_the_processes_of_one_run_share_the_lock_and_a_second_run_is_refused_on_each(tmp_path):
    workdir = tmp_path / "work"
    processes, lines = _joined_run(workdir)
    assert lines == [f"held {processes[0].pid}"] * 2  # Process 0 holds it for both.
    holder = _start_holder(workdir)
    try:
        _, lines = _joined_run(workdir)
    finally:
        _kill_group(holder)
    for line in lines:
        assert line.startswith("refused --workdir") and f"pid {holder.pid}," in line, lines


def test_two_launches_on_one_workdir_leave_one_run_and_a_one_line_refusal(tmp_path_factory):
    """Together: one trains, the other is refused with one line and writes nothing.
    Then, staggered: while another process holds the workdir a launch is refused at once,
    and once that holder is SIGKILLed the same command runs (here: the finished run's
    final report again)."""
    from data_pipeline.conversion import digits

    root = tmp_path_factory.mktemp("two_launches")
    digits.write_digits_shards(str(root / "digits"), image_size=32, seed=0)
    config_path = write_tiny_config(str(root), str(root / "digits"), num_steps=3)
    env = subprocess_env(str(root / "cache"))
    workdir = str(root / "work")
    rates = ("0.05", "0.2")
    launches = [subprocess.Popen(launch_args(config_path, workdir, f"--config.optimizer.base_learning_rate={r}"),
                                 cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for r in rates]
    outputs = [p.communicate(timeout=600) for p in launches]
    codes = [p.returncode for p in launches]
    assert sorted(codes) == [0, 1], [err[-2000:] for _, err in outputs]
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    refusal = outputs[loser][1]
    errors = [line for line in refusal.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is in use by another run" in errors[0], refusal[-2000:]
    assert f"pid {launches[winner].pid}," in errors[0] and "Traceback" not in refusal
    # Everything in the workdir is the winner's.
    with open(os.path.join(workdir, "config.json")) as f:
        assert f"{json.load(f)['optimizer']['base_learning_rate']}" == rates[winner]
    with open(os.path.join(workdir, "eval_results.json")) as f:
        assert json.load(f)["step"] == 3
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]  # No step half-written by the other.

    holder = _start_holder(workdir)
    command = launch_args(config_path, workdir, f"--config.optimizer.base_learning_rate={rates[winner]}")
    try:
        refused = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 1 and f"pid {holder.pid}," in refused.stderr, refused.stderr[-2000:]
    finally:
        _kill_group(holder)
    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))


def test_when_process_0_cannot_take_the_lock_the_others_stop_with_its_reason(tmp_path):
    """Not a refusal (the workdir is a file): process 0 raises its own error, the other
    one says that process 0 failed, and why, instead of waiting out a timeout."""
    workdir = tmp_path / "work"
    workdir.write_text("a file where the workdir should be")
    _, lines = _joined_run(workdir)
    assert lines[0].startswith("failed ") and str(workdir) in lines[0], lines
    own_reason = lines[0].split(" ", 2)[2]
    assert lines[1] == f"failed RuntimeError process 0 could not take the lock of {workdir}: {own_reason}", lines
