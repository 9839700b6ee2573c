"""Decode workers end with their run however the training process dies
(data_pipeline.records.worker_lifetime): after a SIGKILL of the main process only (what
the OOM killer does) the workers and the resource tracker exit within seconds and their
shared memory is gone; after a SIGKILL of the whole process group the blocks left in
/dev/shm are traced to the dead run by their names and removed by a later run, which
leaves every other block alone."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from data_pipeline.records import worker_lifetime
from tests.test_resume import REPO

# A trainer-like process: SIGTERM taken from the start, two decode workers whose buffers
# fill with batches in shared memory, then it waits to be killed.
TRAINER = """
import json, multiprocessing, sys, time
from multiprocessing import resource_tracker
from msff_jax.train import preemption

preemption.install()
from data_pipeline.records import reader

iterator = reader.make_train_iterator(sys.argv[1], global_batch_size=16, image_size=32, seed=0,
                                      worker_count=2, read_threads=1, prefetch_buffer=2)
for _ in range(3):
    next(iterator)
time.sleep(2)  # The workers fill their buffers.
print(json.dumps({"workers": [p.pid for p in multiprocessing.active_children()],
                  "tracker": resource_tracker._resource_tracker._pid}), flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    from data_pipeline.conversion import digits

    directory = str(tmp_path_factory.mktemp("worker_lifetime") / "digits")
    digits.write_digits_shards(directory, image_size=32, seed=0)
    return directory


def _running(pid):
    """Alive and not a zombie (an orphan's zombie stays until its new parent reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _blocks_of(pid):
    return [n for n in os.listdir(worker_lifetime.SHM_DIR)
            if n.startswith(worker_lifetime.SHM_PREFIX) and f"_{pid}_" in n]


def _start_trainer(digits_dir):
    before = set(os.listdir(worker_lifetime.SHM_DIR))
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, digits_dir], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
    line = trainer.stdout.readline()
    assert line, trainer.stderr.read()[-3000:]
    started = json.loads(line)
    assert len(started["workers"]) == 2 and _running(started["tracker"])
    assert _blocks_of(trainer.pid), "the workers hold no tagged shared memory"
    return trainer, started, before


def _wait_gone(pids, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _running(p)]


def test_workers_and_tracker_exit_when_the_main_process_is_killed(digits_dir):
    trainer, started, before = _start_trainer(digits_dir)
    others = [*started["workers"], started["tracker"]]
    try:
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.communicate(timeout=60)  # Returns once the workers and tracker, holding its pipes, are gone.
        assert _wait_gone(others, 30) == []
    finally:
        for pid in others:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    # The tracker removed what the workers had in flight, and nothing else is left: no
    # block tagged for this run, and no untagged one. (Tagged blocks of other runs, such
    # as tests training beside this one, are theirs.)
    assert _blocks_of(trainer.pid) == []
    new = set(os.listdir(worker_lifetime.SHM_DIR)) - before
    assert [n for n in new if n.startswith("psm_") and not n.startswith(worker_lifetime.SHM_PREFIX)] == []


def test_a_later_run_removes_what_a_killed_group_left_and_nothing_else(digits_dir, monkeypatch, tmp_path):
    trainer, started, _ = _start_trainer(digits_dir)
    os.killpg(trainer.pid, signal.SIGKILL)  # Workers and tracker die with it: nobody cleans up.
    trainer.communicate(timeout=60)
    assert _wait_gone([*started["workers"], started["tracker"]], 30) == []
    left = _blocks_of(trainer.pid)
    assert left
    # Blocks that must stay: untagged ones, and tagged ones of a live run (this process).
    untagged = f"psm_{os.getpid():x}test"
    alive = f"{worker_lifetime.SHM_PREFIX}{worker_lifetime.run_tag(os.getpid())}_00000000"
    for name in (untagged, alive):
        with open(os.path.join(worker_lifetime.SHM_DIR, name), "wb") as f:
            f.write(b"x")
    try:
        monkeypatch.setattr(worker_lifetime, "_swept", False)
        assert worker_lifetime.remove_orphaned_shared_memory() >= len(left)
        assert _blocks_of(trainer.pid) == []
        assert os.path.exists(os.path.join(worker_lifetime.SHM_DIR, untagged))
        assert os.path.exists(os.path.join(worker_lifetime.SHM_DIR, alive))
        assert worker_lifetime.remove_orphaned_shared_memory() == 0  # Once per process.
    finally:
        for name in (untagged, alive):
            os.remove(os.path.join(worker_lifetime.SHM_DIR, name))
