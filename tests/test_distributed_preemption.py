"""A SIGTERM that reaches only one of two processes (joined by jax.distributed on
localhost) stops both at the same step with one checkpoint, which two processes or one
can resume. Its own file so the test runner can run it beside test_distributed.py."""

import re
import shutil

import pytest

from msff_jax.train import checkpoints as checkpointing
from msff_jax.train import loop as train
from data_pipeline.conversion import digits
from tests.test_distributed import _start_processes, _wait_all
from tests.test_resume import (FAILURE_WORDS, final_params, load_config, run_to_end,
                               subprocess_env, write_tiny_config)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("distributed") / "digits"
    digits.write_digits_shards(str(data_dir), image_size=32, seed=0)
    return data_dir


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path_factory, digits_dir):
    """A scheduler may signal one host before the others. The processes agree on it (at
    the next evaluation batch they compare flags at, or at a multiple of
    PREEMPTION_SYNC_EVERY_STEPS), all save that step together and exit 0; the same
    command then resumes both from it and finishes, and so does one process from a copy
    of the checkpoint. The signal goes to process 1's whole process group, as schedulers
    send it, while the decode worker of its first evaluation is starting: that worker
    survives, and no process leaves leaked shared memory behind."""
    sync = train.PREEMPTION_SYNC_EVERY_STEPS
    num_steps = 3 * sync  # Room for a signal that misses the first agreement.
    work_root = tmp_path_factory.mktemp("sigterm")
    config_path = write_tiny_config(str(work_root), str(digits_dir), num_steps=num_steps,
                                    dropout_rate=0.0)
    env = subprocess_env(str(work_root / "cache"), device_count=4)
    workdir = str(work_root / "work")

    workers = "--config.data.worker_count=1"
    # Each process leads its own group (see _start_processes): the hook signals process 1
    # and its decode worker only, 0.3 s into its evaluation of step 5.
    processes, log_paths = _start_processes(
        config_path, workdir, env, str(work_root), workers,
        extra_env={1: {"MSFF_TEST_SIGTERM": "eval_start:5:group:0.3"}})
    logs = _wait_all(processes, log_paths)
    stops = []
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-3000:]
        for word in FAILURE_WORDS:
            assert word not in log, log[-3000:]
        stops += re.findall(r"preempted: checkpoint at step (\d+) written", log)
    assert len(stops) == 2 and stops[0] == stops[1], logs[1][-3000:]
    stopped = int(stops[0])
    # Step 5 when the flags are compared after the signal, at the evaluation's first
    # batch (the worker takes longer than 0.3 s to start); else the next agreement step.
    assert stopped in (5, sync), logs[1][-3000:]
    assert "SIGTERM received" in logs[1] and "SIGTERM received" not in logs[0]
    manager = checkpointing.make_manager(workdir, load_config(config_path), read_only=True)
    assert manager.latest_step() == stopped
    # The same checkpoint also resumes on one host (one process with all 8 devices).
    one_host = str(work_root / "one_host")
    shutil.copytree(workdir, one_host)
    log = run_to_end(config_path, one_host, subprocess_env(str(work_root / "cache8"), device_count=8),
                     "--verbosity=0")
    assert f"resuming from {checkpointing.checkpoint_dir(one_host)} step {stopped}" in log
    assert final_params(config_path, one_host)[1] == num_steps

    processes, log_paths = _start_processes(config_path, workdir, env, str(work_root), workers,
                                            "--verbosity=0", name="resumed")
    logs = _wait_all(processes, log_paths)
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-3000:]
        assert f"resuming from {checkpointing.checkpoint_dir(workdir)} step {stopped}" in log
    assert final_params(config_path, workdir)[1] == num_steps
