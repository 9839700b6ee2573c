"""The workdir and the paths around it: a read-only workdir, a file where a folder is
expected, a save into a read-only checkpoints/ folder, and a start that fails (damaged
data, weights of another model) are each one line naming the path and what to do, and a
fresh workdir is left as it was."""

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from configs import digits as digits_config
from data_pipeline.conversion import digits
from msff_jax import console
from msff_jax.train import checkpoints as checkpointing
from msff_jax.train import loop as train

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, JAX_PLATFORMS="cpu")
ENV.pop("MSFF_SHOW_TRACEBACK", None)


@contextlib.contextmanager
def read_only(path: Path):
    """`path` (a folder) made read-only for this user: chmod for an ordinary user; for
    root, whom permissions do not stop, the immutable attribute (chattr +i)."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(mode & ~0o222)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if shutil.which("chattr") is None or subprocess.run(
            ["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a folder read-only for root on this file system (no chattr +i)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def _launch(*args):
    return subprocess.run([sys.executable, "launch.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=ENV)


def _one_error_line(result, *fragments):
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "unexpected" not in errors[0], errors[0]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def _listing(folder: Path):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def trained_looking(tmp_path):
    """A workdir with a checkpoint step folder: enough for the workdir checks, which run
    before any checkpoint is read."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "12").mkdir(parents=True)
    (workdir / "config.json").write_text("{}")
    return workdir


@pytest.mark.parametrize("mode, writes", [("eval", "eval_SPLIT_stepN.json"), ("export", "export/")])
def test_a_read_only_workdir_is_named_before_any_work(trained_looking, mode, writes):
    before = _listing(trained_looking)
    with read_only(trained_looking):
        result = _launch("--config", "configs/digits.py:tiny", "--workdir", str(trained_looking),
                         "--mode", mode)
    line = _one_error_line(result, f"--mode {mode} writes {writes}", "read-only")
    assert str(trained_looking) in line
    assert _listing(trained_looking) == before


def test_a_file_where_a_workdir_folder_is_expected(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    result = _launch("--config", "configs/digits.py:tiny", "--workdir", str(a_file / "run"))
    _one_error_line(result, f"{a_file} is a file, where a folder is needed")
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("not a folder")
    result = _launch("--config", "configs/digits.py:tiny", "--workdir", str(workdir))
    _one_error_line(result, f"{workdir / 'checkpoints'} is a file, where --mode train needs a folder")
    assert _listing(workdir) == ["checkpoints"]


# ------------------------------------------------------------------ a start that fails


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    digits.write_digits_shards(str(out), image_size=8, seed=0)
    return out


def _tiny_config(data_dir, **changes):
    config = digits_config.get_config("tiny")
    config.data_dir = str(data_dir)
    config.update(changes)
    return config


@pytest.mark.parametrize("exists", [False, True], ids=["new_workdir", "empty_workdir"])
def test_a_start_on_damaged_data_leaves_a_fresh_workdir_as_it_was(digits_dir, tmp_path, exists):
    damaged = tmp_path / "damaged"
    shutil.copytree(digits_dir, damaged)
    shard = next(damaged.glob("train-*.tfrecord"))
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x10
    shard.write_bytes(bytes(data))
    workdir = tmp_path / "run"
    if exists:
        workdir.mkdir()
    with pytest.raises(Exception) as error:
        train.train_and_evaluate(_tiny_config(damaged), str(workdir))
    message, status = console.describe_exception(error.value)
    assert status == 1 and "unexpected" not in message and shard.name in message
    assert "re-run the conversion" in message
    assert workdir.exists() == exists and (not exists or _listing(workdir) == [])


def test_an_unreadable_shard_is_named_with_advice_and_the_workdir_left_as_it_was(
        digits_dir, tmp_path, monkeypatch):
    """Permission denied on a shard (simulated: this test may run as root, whom file
    modes do not stop), met while the start-up hashes it."""
    import errno

    from data_pipeline.records import manifest as manifest_lib

    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    shard = next(data.glob("train-*.tfrecord"))

    def unreadable(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(manifest_lib, "file_sha256", unreadable)
    workdir = tmp_path / "run"
    with pytest.raises(PermissionError) as error:
        train.train_and_evaluate(_tiny_config(data), str(workdir))
    message, status = console.describe_exception(error.value)
    assert status == 1 and "unexpected" not in message and "Errno" not in message
    assert message.startswith(f"{shard}: permission denied") and "ls -ld" in message
    assert not workdir.exists()


def test_weights_of_another_model_are_refused_before_the_data_start_up(digits_dir, tmp_path,
                                                                        monkeypatch):
    from safetensors.numpy import save_file

    from data_pipeline.records import reader

    weights = tmp_path / "other_model.safetensors"
    save_file({f"blocks.{i}.conv.weight": np.zeros((4, 4, 3, 3), np.float32) for i in range(85)},
              str(weights))
    monkeypatch.setattr(reader, "make_train_iterator", lambda *a, **k: pytest.fail(
        "the data started before the weights were checked"))
    from msff_jax.models import TINY_OVERRIDES

    config = _tiny_config(digits_dir, model="resnet50", pretrained_path=str(weights))
    config.model_overrides = ml_collections.ConfigDict(TINY_OVERRIDES["resnet50"])
    workdir = tmp_path / "run"
    with pytest.raises(console.ConfigError) as error:
        train.train_and_evaluate(config, str(workdir))
    message, status = console.describe_exception(error.value)
    assert message.startswith("config.pretrained_path:") and str(weights) in message
    assert "85 unexpected key(s)" in message and "... and 80 more" in message
    assert "blocks.84" not in message and len(message) < 1200  # a summary, not 170 keys
    assert "holds the weights of another model" in message
    assert not workdir.exists()


# ------------------------------------------------------------------ saving


def test_a_save_into_a_read_only_checkpoints_folder(tmp_path):
    config = ml_collections.ConfigDict({"checkpoint": {"every_steps": 1, "keep": 2,
                                                       "asynchronous": False}})

    class Position:
        def get_state(self):
            return {"next_batch": 3}

    state = {"w": np.arange(4, dtype=np.float32)}
    manager = checkpointing.make_manager(str(tmp_path), config)
    checkpointing.save(manager, 1, state, Position(), force=True)
    directory = tmp_path / "checkpoints"
    with read_only(directory):
        with pytest.raises(checkpointing.CheckpointWriteError) as error:
            checkpointing.save(manager, 2, state, Position(), force=True)
            checkpointing.wait_until_finished(manager)
    message, status = console.describe_exception(error.value)
    assert status == 1 and "unexpected" not in message
    assert f"saving step 2 under {directory} failed: permission denied" in message
    assert "(1) are intact" in message and "make it writable" in message
    assert [p.name for p in directory.iterdir() if p.name.isdigit()] == ["1"]
    manager.close()
