"""Two processes on localhost (4 simulated devices each, joined by jax.distributed) train
exactly like one process with 8 devices: same global batches, same BatchNorm statistics,
same parameters to float tolerance. And how `distributed.initialize` reads its flags and
SLURM's environment. (A SIGTERM to one of two processes: test_distributed_preemption.py.)"""

import json
import os
import signal
import socket
import subprocess

import jax
import numpy as np
import pytest

from data_pipeline.conversion import digits
from msff_jax.train import checkpoints as checkpointing
from msff_jax.train import distributed
from tests.test_resume import (REPO, final_params, launch_args, run_to_end,
                               subprocess_env, write_tiny_config)

# Three steps (one checkpoint, at step 3). The two runs reduce in different orders, so
# parameters agree to float reassociation only: ~1e-5 relative after 1-5 steps here. But
# the model has argmax-like ties (max-pools, CBAM's max descriptors) that a last-bit
# difference can flip, and after a flip the runs differ by 1e-2 to 3e-2 on some BatchNorm
# biases. Seen at step 6 on one CPU, not on another, and just as much between one
# process with 2 devices and one with 8 (global relative difference 5.7e-4 for both
# comparisons; 1e-7 between 4 and 8 devices), so it comes from the reduction order, not
# from the distributed setup. Fewer steps keep this test about the latter.
NUM_STEPS = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    data_dir = str(root / "digits")
    digits.write_digits_shards(data_dir, image_size=32, seed=0)
    # No dropout: each process feeds its own strided slice of the stream, so the global
    # batch holds the same examples as with one process but in another order, and
    # dropout masks (drawn per position in the global batch) would land on other examples.
    return root, write_tiny_config(str(root), data_dir, num_steps=NUM_STEPS, dropout_rate=0.0)


def _start_processes(config_path, workdir, env, log_dir, *extra_args, count=2, name="process",
                     extra_env=None):
    """`count` launch.py processes joined on a free localhost port, each in its own
    process group (with its decode workers, if any); each one's stderr goes to a file,
    so no pipe fills while the test waits on another. `extra_env[i]`: more environment
    for process i."""
    address = f"127.0.0.1:{_free_port()}"
    processes, log_paths = [], []
    for i in range(count):
        log_paths.append(os.path.join(log_dir, f"{name}_{i}.log"))
        with open(log_paths[-1], "w") as log:
            processes.append(subprocess.Popen(
                launch_args(config_path, workdir, f"--coordinator_address={address}",
                            f"--num_processes={count}", f"--process_id={i}", *extra_args),
                cwd=REPO, env=dict(env, **(extra_env or {}).get(i, {})), stdout=subprocess.DEVNULL,
                stderr=log, text=True,
                start_new_session=True))
    return processes, log_paths


def _wait_all(processes, log_paths, timeout=900):
    """Waits for every process (killing all if one hangs); returns their logs."""
    try:
        for process in processes:
            process.wait(timeout=timeout)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    return [open(path).read() for path in log_paths]


def test_two_processes_match_one_process_with_eight_devices(setup):
    root, config_path = setup
    single = str(root / "single")
    run_to_end(config_path, single, subprocess_env(str(root / "cache8"), device_count=8))

    multi = str(root / "multi")
    processes, log_paths = _start_processes(
        config_path, multi, subprocess_env(str(root / "cache4"), device_count=4), str(root),
        "--verbosity=0")  # The library log line below is hidden by default.
    logs = _wait_all(processes, log_paths)
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-3000:]
    assert "process 1 of 2, 4 local of 8 devices" in logs[1]
    # Each process wrote its own data-iterator position into the shared checkpoints.
    iterator_dir = os.path.join(multi, "checkpoints", str(NUM_STEPS), "data_iter")
    iterator_files = sorted(f for f in os.listdir(iterator_dir) if f.endswith(".json"))
    assert iterator_files == ["process_0-of-2.json", "process_1-of-2.json"]
    # Only process 0 writes the report.
    assert os.path.isfile(os.path.join(multi, "eval_results.json"))

    params_single, step_single = final_params(config_path, single)
    params_multi, step_multi = final_params(config_path, multi)
    assert step_single == step_multi == NUM_STEPS
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params_single, params_multi)
    moved = max(float(np.abs(a).max()) for a in jax.tree.leaves(params_single))
    assert moved > 0

    # The per-image answers of the final test evaluation, gathered from two processes'
    # devices, come out in the split's record order, every image once, as with one process.
    def predictions(workdir):
        with np.load(os.path.join(workdir, "test_predictions.npz"), allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    one, two = predictions(single), predictions(multi)
    assert str(two["split"]) == "test" and int(two["step"]) == NUM_STEPS
    np.testing.assert_array_equal(two["index"], np.arange(len(two["index"])))
    np.testing.assert_array_equal(two["index"], one["index"])
    np.testing.assert_array_equal(two["label"], one["label"])
    assert len(set(two["label"].tolist())) > 1  # Real labels, not a constant.
    # Same parameters to 1e-4: a last-bit tie may flip an answer, not the order.
    assert np.mean(two["predicted"] == one["predicted"]) >= 0.95


# ------------------------------------------------------------- distributed.initialize


@pytest.fixture
def fake_runtime(monkeypatch):
    """Records the calls `initialize` makes to JAX's runtime instead of joining one."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax.config, "update", lambda name, value: calls.append({name: value}))
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NODELIST", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_initialize_alone_is_one_process(fake_runtime):
    distributed.initialize()
    assert fake_runtime == []


def _slurm(monkeypatch, **variables):
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    for name, value in variables.items():
        monkeypatch.setenv(f"SLURM_{name}", value)


@pytest.mark.parametrize("ntasks", ["1", ""])
def test_initialize_in_a_slurm_step_with_one_task_is_one_process(fake_runtime, monkeypatch, ntasks):
    _slurm(monkeypatch, NTASKS=ntasks, STEP_NODELIST="node1")
    distributed.initialize()
    assert fake_runtime == []


def test_initialize_under_srun_lets_jax_read_slurm(fake_runtime, monkeypatch):
    _slurm(monkeypatch, NTASKS="4", STEP_NUM_TASKS="4", STEP_NODELIST="node[1-4]")
    distributed.initialize()
    assert fake_runtime == [{"jax_cpu_collectives_implementation": "gloo"}, {}]


def test_srun_of_one_task_in_a_larger_allocation_is_one_process(fake_runtime, monkeypatch):
    _slurm(monkeypatch, NTASKS="4", STEP_NUM_TASKS="1", STEP_NODELIST="node1")
    distributed.initialize()
    assert fake_runtime == []


def test_batch_script_of_a_multi_task_allocation_is_one_process_with_a_warning(
        fake_runtime, monkeypatch, caplog):
    """sbatch/salloc set SLURM_NTASKS for the allocation, but only srun starts the other
    processes; joining here would wait for processes that never come."""
    _slurm(monkeypatch, NTASKS="4")
    with caplog.at_level("WARNING"):
        distributed.initialize()
    assert fake_runtime == []
    assert "not an srun step" in caplog.text


def test_initialize_with_flags_passes_them_on(fake_runtime, monkeypatch):
    _slurm(monkeypatch, NTASKS="4", STEP_NODELIST="node[1-4]")  # Explicit flags win over SLURM.
    distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=1)
    assert fake_runtime[-1] == dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)


@pytest.mark.parametrize("num_processes, process_id, message", [
    (None, 0, "needs --num_processes and --process_id"),
    (2, None, "needs --num_processes and --process_id"),
    (2, 2, r"--process_id=2 must be in \[0, --num_processes=2\)"),
    (2, -1, r"--process_id=-1 must be in"),
])
def test_initialize_rejects_incomplete_flags(fake_runtime, num_processes, process_id, message):
    with pytest.raises(ValueError, match=message):
        distributed.initialize("10.0.0.1:1234", num_processes=num_processes, process_id=process_id)
    assert fake_runtime == []


def test_any_process_in_one_process_is_the_flag():
    assert distributed.any_process(True) is True
    assert distributed.any_process(False) is False


# ------------------------------------------------------- data position on another host count


class _Manager:
    def __init__(self, directory):
        self.directory = directory


def _write_positions(root, step, positions):
    directory = root / str(step) / checkpointing.DATA_ITER_ITEM
    directory.mkdir(parents=True)
    for name, next_batch in positions.items():
        (directory / name).write_text(json.dumps({"next_batch": next_batch, "seed": 0,
                                                  "global_batch_size": 16}))


def test_position_saved_by_two_processes_resumes_one(tmp_path):
    _write_positions(tmp_path, 7, {"process_0-of-2.json": 7, "process_1-of-2.json": 7})
    assert checkpointing.saved_iterator_state(_Manager(tmp_path), 7)["next_batch"] == 7


def test_positions_that_disagree_are_refused(tmp_path):
    _write_positions(tmp_path, 7, {"process_0-of-2.json": 7, "process_1-of-2.json": 6})
    with pytest.raises(ValueError, match="processes saved different data positions"):
        checkpointing.saved_iterator_state(_Manager(tmp_path), 7)


def test_missing_or_broken_positions_name_the_directory(tmp_path):
    (tmp_path / "3" / checkpointing.DATA_ITER_ITEM).mkdir(parents=True)
    with pytest.raises(checkpointing.DamagedCheckpointError,
                       match=r"3/data_iter holds no data-iterator position"):
        checkpointing.saved_iterator_state(_Manager(tmp_path), 3)
    _write_positions(tmp_path, 5, {"process_0-of-1.json": 5})
    (tmp_path / "5" / checkpointing.DATA_ITER_ITEM / "process_0-of-1.json").write_text("{trunc")
    with pytest.raises(ValueError, match=r"process_0-of-1.json: unreadable data-iterator position"):
        checkpointing.saved_iterator_state(_Manager(tmp_path), 5)
