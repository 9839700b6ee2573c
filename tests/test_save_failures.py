"""A checkpoint save that fails stops the run within seconds with one error naming the
step, the path and the cause; the earlier checkpoints stay intact; the rerun works once
the cause is fixed. For the synchronous and the asynchronous saver: a read-only
checkpoints/ (once made read-only by a helper process, whose save used to wait five
minutes inside Orbax before a timeout naming nothing) and a save whose writer raises
(in-process). Then through launch.py: a read-only checkpoints/ stops training with one
line, and a SIGTERM that comes while a failing save is pending ends the run at once.
(A full disk: tests/test_damaged_files.py.)"""

import ctypes
import os
import re
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from msff_jax.train import checkpoints as checkpointing
from tests.test_damaged_files import CONFIG, Position, _abstract, _save_steps, _state
from tests.test_resume import REPO, launch_args, subprocess_env, write_tiny_config

# Runs the command in argv[1:] so that it obeys file permissions even as root: the Linux
# capabilities that override them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER)
# leave the bounding set before the command is executed, so it never has them.
OBEYING_PERMISSIONS = """
import ctypes, os, sys
if os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2, 3):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            sys.exit(f"cannot drop capability {capability}: errno {ctypes.get_errno()}")
os.execv(sys.argv[1], sys.argv[1:])
"""


def obeying_permissions(command):
    """`command`, run so that a read-only folder is read-only to it (see above)."""
    return [sys.executable, "-c", OBEYING_PERMISSIONS, *command]


def _config(asynchronous):
    config = CONFIG.to_dict()
    config["checkpoint"]["asynchronous"] = asynchronous
    return ml_collections.ConfigDict(config)


ASYNC = pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])

# Steps 2 and 4 saved, then checkpoints/ made read-only and step 6 saved; then writable
# again and step 6 saved once more.
READ_ONLY = """
import os, sys, time
import ml_collections
sys.path.insert(0, {tests!r})
from msff_jax.train import checkpoints as checkpointing
from test_damaged_files import Position, _save_steps, _state

config = ml_collections.ConfigDict({config!r})
_save_steps({workdir!r}, steps=(2, 4), config=config)
directory = os.path.join({workdir!r}, "checkpoints")
manager = checkpointing.make_manager({workdir!r}, config)
os.chmod(directory, 0o555)
started = time.monotonic()
try:
    checkpointing.save(manager, 6, _state(6), Position(60), force=True)
    checkpointing.wait_until_finished(manager)
    print("saved while read-only")
except checkpointing.CheckpointWriteError as err:
    print(f"after {{time.monotonic() - started:.1f}} s: {{err}}", flush=True)
os.chmod(directory, 0o755)
checkpointing.save(manager, 6, _state(6), Position(60), force=True)
checkpointing.wait_until_finished(manager)
print("steps", manager.all_steps(), flush=True)
"""


@ASYNC
def test_read_only_checkpoints_fail_at_once_and_the_rerun_saves(tmp_path, asynchronous):
    workdir = tmp_path / "work"
    script = READ_ONLY.format(tests=os.path.dirname(__file__), workdir=str(workdir),
                              config=_config(asynchronous).to_dict())
    result = subprocess.run(obeying_permissions([sys.executable, "-c", script]), cwd=REPO,
                            capture_output=True, text=True, timeout=240,
                            env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    failed = re.search(r"after ([\d.]+) s: (.*)", result.stdout)
    assert failed, result.stdout + result.stderr[-3000:]
    assert float(failed.group(1)) < 30
    directory = re.escape(str(workdir / "checkpoints"))
    assert re.match(rf"saving step 6 under {directory} failed: permission denied at {directory}/6\S* "
                    r".*\(2, 4\) are intact", failed.group(2)), failed.group(2)
    assert "steps [2, 4, 6]" in result.stdout


# Makes the state item's array writes fail with an I/O error `delay` seconds into the
# save (in the background when the saver is asynchronous); `undo()` puts them back. Run
# in this process by the tests below and in launch.py's by FAILING_LAUNCH.
FAILING_WRITES = """
import errno, os, time
from orbax.checkpoint._src.handlers import standard_checkpoint_handler

class _FailingWrite:
    def __init__(self, path, delay):
        self.path, self.delay = path, delay

    def result(self, timeout=None):
        time.sleep(self.delay)
        raise OSError(errno.EIO, "Input/output error", self.path)

_handler = standard_checkpoint_handler.StandardCheckpointHandler
_original = _handler.async_save

async def _failing_async_save(self, directory, *args, **kwargs):
    return [_FailingWrite(os.path.join(str(directory), "array_data"), delay)]

_handler.async_save = _failing_async_save
undo = lambda: setattr(_handler, "async_save", _original)
"""


def failing_state_writes(delay=0.0):
    names = {"delay": delay}
    exec(FAILING_WRITES, names)
    return names["undo"]


@ASYNC
def test_a_save_that_raises_is_named_and_the_rerun_saves(tmp_path, asynchronous):
    _save_steps(tmp_path, steps=(2, 4), config=_config(asynchronous))
    manager = checkpointing.make_manager(str(tmp_path), _config(asynchronous))
    restore_writes = failing_state_writes()
    try:
        with pytest.raises(checkpointing.CheckpointWriteError) as failed:
            checkpointing.save(manager, 6, _state(6), Position(60), force=True)
            checkpointing.wait_until_finished(manager)
    finally:
        restore_writes()
    directory = re.escape(str(tmp_path / "checkpoints"))
    assert re.match(rf"saving step 6 under {directory} failed: an I/O error \(EIO: Input/output "
                    rf"error\) at {directory}/6\S*/array_data: .*\(2, 4\) are intact", str(failed.value))
    assert sorted(n for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()) == ["2", "4"]
    checkpointing.save(manager, 6, _state(6), Position(60), force=True)
    checkpointing.wait_until_finished(manager)
    position = Position()
    step, state = checkpointing.restore_latest_intact(manager, _abstract(), position)
    assert step == 6 and position.next_batch == 60
    np.testing.assert_array_equal(np.asarray(state["w"]), _state(6)["w"])
    manager.close()


def test_a_save_failing_in_the_background_is_seen_within_seconds(tmp_path):
    """The training loop calls `check_saves` every step: an asynchronous save that fails
    stops the run then, not at the next save (which may be an hour later)."""
    manager = checkpointing.make_manager(str(tmp_path), _config(True))
    restore_writes = failing_state_writes(delay=1.0)
    try:
        checkpointing.save(manager, 2, _state(2), Position(20), force=True)  # Returns at once.
        started = time.monotonic()
        with pytest.raises(checkpointing.CheckpointWriteError, match=r"saving step 2 .*EIO"):
            while time.monotonic() - started < 60:
                checkpointing.check_saves(manager)
                time.sleep(0.05)
        assert time.monotonic() - started < 30
    finally:
        restore_writes()
    checkpointing.check_saves(manager)  # Reported once.
    manager.close()


# ------------------------------------------------------------------------- launch.py

# launch.py with the state's array writes failing one second into the background save.
FAILING_LAUNCH = """
import runpy, sys
delay = 1.0
{failing_writes}
sys.argv = {argv!r}
runpy.run_path("launch.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from data_pipeline.conversion import digits

    root = tmp_path_factory.mktemp("save_failures")
    digits.write_digits_shards(str(root / "digits"), image_size=32, seed=0)
    # Three steps: the first save (step 3) ends the run.
    config_path = write_tiny_config(str(root), str(root / "digits"), num_steps=3)
    return root, config_path, subprocess_env(str(root / "cache"))


def _one_error_line(stderr):
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def test_training_into_a_read_only_checkpoints_dir_stops_with_one_line(tiny_run):
    root, config_path, env = tiny_run
    workdir = root / "read_only"
    (workdir / "checkpoints").mkdir(parents=True)
    os.chmod(workdir / "checkpoints", 0o555)
    failed = subprocess.run(obeying_permissions(launch_args(config_path, str(workdir))), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=280)
    assert failed.returncode == 1, failed.stderr[-3000:]
    line = _one_error_line(failed.stderr)
    assert re.match(rf"error: saving step 3 under {re.escape(str(workdir))}/checkpoints failed: permission "
                    r"denied at .*checkpoints/3\S*: .*\(none\) are intact.*make it writable", line), line
    assert os.listdir(workdir / "checkpoints") == []  # The rerun, once it is writable: above.


def test_sigterm_while_a_failing_save_is_pending_ends_the_run_at_once(tiny_run):
    root, config_path, env = tiny_run
    workdir = root / "sigterm"
    argv = launch_args(config_path, str(workdir))[1:]
    script = FAILING_LAUNCH.format(failing_writes=FAILING_WRITES, argv=argv)
    started = time.monotonic()
    failed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            timeout=280, env=dict(env, MSFF_TEST_SIGTERM="save:3:self"))
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "SIGTERM received" in failed.stderr, failed.stderr[-3000:]
    line = _one_error_line(failed.stderr)
    assert re.match(r"error: saving step 3 under .* failed: an I/O error \(EIO", line), line
    assert time.monotonic() - started < 240
    assert not [n for n in os.listdir(workdir / "checkpoints") if n.isdigit()]
