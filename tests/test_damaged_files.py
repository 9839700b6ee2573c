"""Damaged files are named and nothing good is lost (issue 15, part 3).

Shards: a flipped byte (record data or header), a truncated shard, missing shards and a
manifest that disagrees with its shards each stop with an error naming the file and the
record, at start-up where the check is cheap, else when the record is read, also from
grain's worker processes. The eval split is verified once per run, yet a shard replaced
mid-run is never read through the old index.

Checkpoints: a step directory with a file missing or cut short (a machine crash) is
named in a warning and set aside, and resume falls back to the newest intact step; with
none intact it stops with a clear error. A disk that fills up during a save gives a clear
error, keeps the earlier checkpoints, and a rerun continues.
"""

import glob
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from data_pipeline.records import manifest as manifest_lib
from data_pipeline.records import reader
from data_pipeline.records import tfrecord_format
from data_pipeline.records.tfrecord_source import RecordCountMismatchError, ShardChangedError
from msff_jax.train import checkpoints as checkpointing
from record_helpers import write_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------ shards


def _dataset(tmp_path, num_examples=6, num_shards=2):
    content = write_dataset(tmp_path, num_examples=num_examples, num_shards=num_shards)
    shards = [tmp_path / s["file"] for s in content["splits"]["train"]["shards"]]
    return content, shards


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _eval(data_dir, **options):
    return list(reader.make_eval_iterator(str(data_dir), split="train", global_batch_size=6, image_size=16,
                                          process_index=0, process_count=1, **options))


def test_flipped_byte_in_a_record_is_named_at_start_up_and_when_read(tmp_path):
    _, shards = _dataset(tmp_path)
    offset, _ = tfrecord_format.index_records(shards[1])[2]
    _flip(shards[1], offset + tfrecord_format.HEADER_SIZE + 40)  # inside record 2's data
    record = rf"{re.escape(str(shards[1]))}: record 2 at byte {offset}: data checksum mismatch"
    # With the SHA-256 check (the default): at start-up, the shard and its record named.
    with pytest.raises(manifest_lib.ShardChecksumError, match=rf"{shards[1].name}: SHA-256 .*{record}"):
        reader.open_split(str(tmp_path), "train")
    # Without it: when the record is read, the same message from a grain worker process.
    with pytest.raises(tfrecord_format.TFRecordCorruptionError, match=record):
        _eval(tmp_path, verify_checksums=False)
    with pytest.raises(tfrecord_format.TFRecordCorruptionError, match=record) as from_worker:
        _eval(tmp_path, verify_checksums=False, worker_count=1)
    assert "Worker process" not in str(from_worker.value)


def test_flipped_byte_in_a_header_and_a_truncated_shard_name_the_record_at_start_up(tmp_path):
    _, shards = _dataset(tmp_path)
    offset, _ = tfrecord_format.index_records(shards[0])[1]
    _flip(shards[0], offset + 2)  # record 1's length
    with pytest.raises(tfrecord_format.TFRecordCorruptionError,
                       match=rf"{shards[0].name}: record 1 at byte {offset}: length checksum"):
        reader.open_split(str(tmp_path), "train")  # SHA-256 on, yet the record is named
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[:-50])
    _flip(shards[0], offset + 2)  # repaired
    with pytest.raises(tfrecord_format.TFRecordCorruptionError,
                       match=rf"{shards[1].name}: record 2 at byte \d+: .*truncated"):
        reader.open_split(str(tmp_path), "train")


def test_missing_shards_are_all_named_with_the_manifest(tmp_path):
    _, shards = _dataset(tmp_path, num_examples=9, num_shards=3)
    shards[0].unlink()
    shards[2].unlink()
    for verify in (True, False):
        with pytest.raises(manifest_lib.MissingShardError) as err:
            reader.open_split(str(tmp_path), "train", verify_checksums=verify)
        message = str(err.value)
        assert "manifest.json" in message and "2 of them are missing" in message
        assert shards[0].name in message and shards[2].name in message and shards[1].name not in message


def test_manifest_that_disagrees_with_its_shards_is_named(tmp_path):
    content, shards = _dataset(tmp_path)
    # Counts: the shard holds 3 records, the manifest says 4.
    entry = content["splits"]["train"]
    entry["shards"][0]["num_records"], entry["num_examples"] = 4, 7
    (tmp_path / "manifest.json").write_text(json.dumps(content))
    with pytest.raises(RecordCountMismatchError, match=rf"{shards[0].name}: holds 3 records, the manifest says 4"):
        reader.open_split(str(tmp_path), "train")
    # SHA-256: a whole, valid shard from another conversion in the place of shard 1.
    other = tmp_path / "other"
    other_content = write_dataset(other, num_examples=6, num_shards=2, broken_image_ids=(4,))
    write_dataset(tmp_path, num_examples=6, num_shards=2)
    shutil.copy(other / other_content["splits"]["train"]["shards"][1]["file"], shards[1])
    with pytest.raises(manifest_lib.ShardChecksumError,
                       match=rf"{shards[1].name}: SHA-256 .*every record in it passes its CRC.*another conversion"):
        reader.open_split(str(tmp_path), "train")


def test_split_is_verified_once_and_a_replaced_shard_is_checked_again(tmp_path, monkeypatch):
    _, shards = _dataset(tmp_path)
    hashed = []
    real_sha256 = manifest_lib.file_sha256
    monkeypatch.setattr(manifest_lib, "file_sha256", lambda path: hashed.append(path) or real_sha256(path))
    first = _eval(tmp_path)
    assert len(hashed) == 2
    again = _eval(tmp_path)  # A second evaluation: no manifest re-read, no re-hash.
    assert len(hashed) == 2
    np.testing.assert_array_equal(first[0]["image"], again[0]["image"])
    source, _ = reader.open_split(str(tmp_path), "train")
    assert reader.open_split(str(tmp_path), "train")[0] is source

    # Shard 1 replaced by another file (a new inode) holding other records.
    other = tmp_path / "other"
    other_content = write_dataset(other, num_examples=6, num_shards=2, broken_image_ids=(5,))
    replacement = tmp_path / "replacement.tfrecord"
    shutil.copy(other / other_content["splits"]["train"]["shards"][1]["file"], replacement)
    os.replace(replacement, shards[1])
    # A copy of the source opened before the replacement, as a grain worker receives it,
    # refuses to read the new file through the old index...
    with pytest.raises(ShardChangedError, match=rf"{shards[1].name}: record 0 at byte 0: .*replaced"):
        pickle.loads(pickle.dumps(source))[3]
    # ...and the next evaluation hashes it again, against the manifest.
    with pytest.raises(manifest_lib.ShardChecksumError, match=shards[1].name):
        _eval(tmp_path)
    assert len(hashed) > 2


# -------------------------------------------------------------------------- checkpoints


CONFIG = ml_collections.ConfigDict({"checkpoint": {"every_steps": 1, "keep": 3, "asynchronous": False}})


class Position:
    """A data iterator's position, as the checkpoints save and restore it."""

    def __init__(self, next_batch=0):
        self.next_batch = next_batch

    def get_state(self):
        return {"next_batch": self.next_batch}

    def set_state(self, state):
        self.next_batch = state["next_batch"]


def _state(step):
    """200 KB of incompressible numbers, so the array file outgrows the disk-full limit."""
    w = np.random.default_rng(step).normal(size=(50_000,)).astype(np.float32)
    return {"w": w, "b": np.arange(3, dtype=np.float32) + step}


def _abstract():
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), _state(0))


def _save_steps(workdir, steps=(2, 4, 6), config=CONFIG):
    manager = checkpointing.make_manager(str(workdir), config)
    for step in steps:
        checkpointing.save(manager, step, _state(step), Position(10 * step),
                           metrics={checkpointing.BEST_METRIC: 0.1 * step}, force=True)
    manager.close()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Steps 2, 4 and 6, written once and copied by each test."""
    workdir = tmp_path_factory.mktemp("saved")
    _save_steps(workdir)
    return workdir


def _largest_file(directory):
    files = [f for f in glob.glob(os.path.join(directory, "**"), recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def _damage(step_dir, kind):
    if kind == "array data truncated":  # OCDBT's data files, half written
        for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
            os.truncate(path, os.path.getsize(path) // 2)
    elif kind == "array data missing":
        os.remove(_largest_file(os.path.join(step_dir, "state", "ocdbt.process_0", "d")))
    elif kind == "state item missing":
        shutil.rmtree(os.path.join(step_dir, "state"))
    elif kind == "tree metadata truncated":
        os.truncate(os.path.join(step_dir, "state", "_METADATA"), 0)
    elif kind == "data position missing":
        for path in glob.glob(os.path.join(step_dir, "data_iter", "process_*.json")):
            os.remove(path)
    elif kind == "metrics truncated":
        os.truncate(os.path.join(step_dir, "metrics", "metrics"), 5)
    else:
        raise AssertionError(kind)


DAMAGES = ["array data truncated", "array data missing", "state item missing", "tree metadata truncated",
           "data position missing", "metrics truncated"]


@pytest.mark.parametrize("kind", DAMAGES)
def test_resume_falls_back_to_the_newest_intact_checkpoint(saved, tmp_path, caplog, kind):
    workdir = tmp_path / "work"
    shutil.copytree(saved, workdir)
    checkpoints = workdir / "checkpoints"
    _damage(str(checkpoints / "6"), kind)
    caplog.set_level(logging.WARNING)
    manager = checkpointing.make_manager(str(workdir), CONFIG)
    position = Position()
    step, state = checkpointing.restore_latest_intact(manager, _abstract(), position)
    assert step == 4 and position.next_batch == 40
    np.testing.assert_array_equal(np.asarray(state["w"]), _state(4)["w"])
    assert re.search(rf"checkpoint {re.escape(str(checkpoints))}/6 .*(damaged|cannot be restored)", caplog.text)
    # Nothing deleted: the good ones stay, the damaged one is moved aside, never listed.
    assert sorted(os.listdir(checkpoints)) == ["2", "4"]
    assert os.listdir(workdir / checkpointing.DAMAGED_DIR) == ["6"]
    assert manager.all_steps() == [2, 4]
    # The resumed run saves step 6 again.
    checkpointing.save(manager, 6, _state(6), Position(60), force=True)
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 4, 6]
    manager.close()


def test_resume_with_every_checkpoint_damaged_stops_and_moves_nothing(saved, tmp_path):
    workdir = tmp_path / "work"
    shutil.copytree(saved, workdir)
    for step in (2, 4, 6):
        _damage(str(workdir / "checkpoints" / str(step)), "array data truncated")
    manager = checkpointing.make_manager(str(workdir), CONFIG)
    with pytest.raises(checkpointing.DamagedCheckpointError) as err:
        checkpointing.restore_latest_intact(manager, _abstract(), Position())
    message = str(err.value)
    assert all(f"checkpoints/{step}: the checkpoint is damaged" in message for step in (2, 4, 6))
    assert "does not start from scratch" in message
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]
    assert not os.path.exists(workdir / checkpointing.DAMAGED_DIR)


def test_a_model_that_does_not_match_is_not_taken_for_damage(saved, tmp_path):
    workdir = tmp_path / "work"
    shutil.copytree(saved, workdir)
    manager = checkpointing.make_manager(str(workdir), CONFIG)
    other = dict(_abstract(), w=jax.ShapeDtypeStruct((7,), np.float32, sharding=_abstract()["w"].sharding))
    with pytest.raises(ValueError, match="shape") as err:
        checkpointing.restore_latest_intact(manager, other, Position())
    assert not isinstance(err.value, checkpointing.DamagedCheckpointError)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]


def test_read_only_manager_names_a_damaged_metrics_file(saved, tmp_path):
    workdir = tmp_path / "work"
    shutil.copytree(saved, workdir)
    _damage(str(workdir / "checkpoints" / "4"), "metrics truncated")
    with pytest.raises(checkpointing.DamagedCheckpointError, match=r"checkpoints/4/metrics/metrics: unreadable"):
        checkpointing.make_manager(str(workdir), CONFIG, read_only=True)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]


DISK_FULL = """
import resource, signal, sys
import ml_collections, numpy as np
from msff_jax.train import checkpoints as checkpointing
sys.path.insert(0, {tests!r})
from test_damaged_files import CONFIG, Position, _state

manager = checkpointing.make_manager({workdir!r}, ml_collections.ConfigDict({config!r}))
# The disk "fills up": no file may grow past 64 KiB; writes fail with EFBIG, as they fail
# with ENOSPC on a full disk.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
try:
    checkpointing.save(manager, 8, _state(8), Position(80), force=True)
    checkpointing.wait_until_finished(manager)
except checkpointing.CheckpointWriteError as err:
    print("CheckpointWriteError:", err)
    sys.exit(3)
"""


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_disk_full_during_a_save_is_a_clear_error_and_a_rerun_continues(saved, tmp_path, asynchronous):
    workdir = tmp_path / "work"
    shutil.copytree(saved, workdir)
    config = CONFIG.to_dict()
    config["checkpoint"]["asynchronous"] = asynchronous
    script = DISK_FULL.format(tests=os.path.dirname(__file__), workdir=str(workdir), config=config)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
    assert result.returncode == 3, result.stderr[-3000:]
    assert re.search(r"saving step 8 under .*checkpoints failed: the disk is full.* \(2, 4, 6\) are intact",
                     result.stdout), result.stdout + result.stderr[-3000:]
    # The earlier checkpoints are intact; the unfinished one is not listed.
    manager = checkpointing.make_manager(str(workdir), ml_collections.ConfigDict(config))
    assert manager.all_steps() == [2, 4, 6]
    position = Position()
    step, state = checkpointing.restore_latest_intact(manager, _abstract(), position)
    assert step == 6 and position.next_batch == 60
    np.testing.assert_array_equal(np.asarray(state["b"]), _state(6)["b"])
    # With room again, the rerun saves and goes on.
    checkpointing.save(manager, 8, _state(8), Position(80), force=True)
    checkpointing.wait_until_finished(manager)
    assert 8 in manager.all_steps() and 6 in manager.all_steps()
    assert not os.path.exists(workdir / checkpointing.DAMAGED_DIR)
    manager.close()
