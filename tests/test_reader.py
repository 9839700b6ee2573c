"""The grain reader end to end on tiny shards: order, sharding, exact resume, eval
exactly-once, and the manifest's guards against damaged or mismatched shards."""

import json
import os

import numpy as np
import pytest

from data_pipeline.records import manifest
from data_pipeline.records import reader
from data_pipeline.records import tfrecord_format
from record_helpers import NUM_CLASSES, NUM_EXAMPLES, example_ids, write_dataset

IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("shards")
    write_dataset(path)
    return str(path)


def _train(data_dir, **overrides):
    options = dict(global_batch_size=6, image_size=IMAGE_SIZE, seed=3, process_index=0, process_count=1)
    options.update(overrides)
    return reader.make_train_iterator(data_dir, **options)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_train_batches_have_contract_shapes_and_true_labels(data_dir):
    batch = next(_train(data_dir))
    assert batch["image"].shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32
    assert [i % NUM_CLASSES for i in example_ids(batch["image"])] == batch["label"].tolist()


def test_train_is_deterministic_for_a_seed_and_differs_across_seeds(data_dir):
    first = _take(_train(data_dir), 3)
    again = _take(_train(data_dir), 3)
    other = _take(_train(data_dir, seed=4), 3)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert any(not np.array_equal(a["image"], c["image"]) for a, c in zip(first, other))


def test_each_epoch_covers_every_example_once_in_a_fresh_order(data_dir):
    batches_per_epoch = NUM_EXAMPLES // 6
    batches = _take(_train(data_dir), 2 * batches_per_epoch)
    ids = [i for b in batches for i in example_ids(b["image"])]
    epoch0, epoch1 = ids[:NUM_EXAMPLES], ids[NUM_EXAMPLES:]
    assert sorted(epoch0) == list(range(NUM_EXAMPLES))
    assert sorted(epoch1) == list(range(NUM_EXAMPLES))
    assert epoch0 != epoch1


def test_processes_split_each_global_batch_disjointly(data_dir):
    single = _take(_train(data_dir), 5)
    halves = [_take(_train(data_dir, process_index=p, process_count=2), 5) for p in range(2)]
    seen = []
    for step in range(5):
        ids = [example_ids(halves[p][step]["image"]) for p in range(2)]
        assert halves[0][step]["image"].shape[0] == 3
        assert not set(ids[0]) & set(ids[1])
        # Global batch `step` is the same examples whatever the process count.
        assert sorted(ids[0] + ids[1]) == sorted(example_ids(single[step]["image"]))
        seen += ids[0] + ids[1]
    assert sorted(seen) == list(range(NUM_EXAMPLES))


def test_restored_state_resumes_with_the_batch_that_would_have_come(data_dir):
    iterator = _train(data_dir)
    _take(iterator, 3)
    state = iterator.get_state()
    expected = _take(iterator, 4)  # crosses into the second epoch
    resumed = _train(data_dir)
    resumed.set_state(json.loads(json.dumps(state)))  # states travel as JSON in checkpoints
    for want, got in zip(expected, _take(resumed, 4)):
        np.testing.assert_array_equal(want["image"], got["image"])
        np.testing.assert_array_equal(want["label"], got["label"])


def test_worker_processes_give_the_same_batches_and_exact_restore(data_dir):
    reference = _take(_train(data_dir), 6)
    iterator = _train(data_dir, worker_count=2)
    try:
        head = _take(iterator, 2)
        state = iterator.get_state()
        _take(iterator, 2)  # run ahead, then rewind the same iterator
        iterator.set_state(state)
        tail = _take(iterator, 4)
    finally:
        iterator.close()
    for want, got in zip(reference, head + tail):
        np.testing.assert_array_equal(want["image"], got["image"])
        np.testing.assert_array_equal(want["label"], got["label"])


SIGTERM_TO_THE_GROUP = """
import os, signal, sys
from data_pipeline.records import reader


def main(data_dir):
    iterator = reader.make_train_iterator(data_dir, global_batch_size=6, image_size=16, seed=3,
                                          worker_count=2, read_threads=1, prefetch_buffer=1)
    for _ in range(4):  # Batches come from the workers in turn: both are up and set.
        next(iterator)
    signal.signal(signal.SIGTERM, lambda *_: print("trainer got SIGTERM", flush=True))
    os.killpg(0, signal.SIGTERM)  # As a scheduler does: every process of the group.
    for _ in range(40):
        next(iterator)
    iterator.close()
    print("40 batches after the signal", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
"""


def test_decode_workers_leave_sigterm_to_the_trainer(data_dir, tmp_path):
    """A preemption signal sent to the whole process group must not kill the decode
    workers: the trainer still needs batches until it has saved its checkpoint."""
    import subprocess
    import sys

    script = tmp_path / "sigterm_to_the_group.py"
    script.write_text(SIGTERM_TO_THE_GROUP)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, str(script), data_dir], cwd=repo, capture_output=True,
                            text=True, timeout=300, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=repo))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainer got SIGTERM" in result.stdout
    assert "40 batches after the signal" in result.stdout


def test_state_from_another_seed_is_refused(data_dir):
    state = _train(data_dir, seed=4).get_state()
    with pytest.raises(ValueError, match="seed"):
        _train(data_dir).set_state(state)


def test_eval_sees_every_example_once_with_padding_masked(data_dir):
    # 30 examples, global batch 8 -> 4 batches of 2 x 4, the last 2 slots padding.
    per_process = [
        list(reader.make_eval_iterator(
            data_dir, split="train", global_batch_size=8, image_size=IMAGE_SIZE,
            process_index=p, process_count=2,
        ))
        for p in range(2)
    ]
    assert len(per_process[0]) == len(per_process[1]) == 4
    ids = []
    for batches in per_process:
        for batch in batches:
            assert batch["image"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
            assert batch["mask"].dtype == np.bool_
            real = batch["mask"]
            ids += [i for i, keep in zip(example_ids(batch["image"]), real) if keep]
            assert [i % NUM_CLASSES for i in example_ids(batch["image"][real])] == batch["label"][real].tolist()
    assert sorted(ids) == list(range(NUM_EXAMPLES))
    assert sum(int((~b["mask"]).sum()) for batches in per_process for b in batches) == 2


def test_eval_crop_is_the_same_every_pass(data_dir):
    ds = reader.make_eval_iterator(
        data_dir, split="train", global_batch_size=8, image_size=IMAGE_SIZE, process_index=0, process_count=1
    )
    for a, b in zip(ds, ds):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_open_split_reports_size_and_classes(data_dir):
    _, info = reader.open_split(data_dir, "train")
    assert info.num_examples == NUM_EXAMPLES
    assert info.class_names == ("class0", "class1", "class2")


# ------------------------------------------------------------------ manifest guards


def test_missing_manifest_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        reader.load_manifest(tmp_path)


def test_malformed_manifest_names_line(tmp_path):
    (tmp_path / "manifest.json").write_text('{"format_version": 1,\n "class_names": [,]}')
    with pytest.raises(manifest.ManifestError, match="line 2"):
        reader.load_manifest(tmp_path)


def test_manifest_missing_key_is_named(tmp_path):
    content = write_dataset(tmp_path, num_examples=3, num_shards=1)
    del content["splits"]["train"]["shards"][0]["sha256"]
    (tmp_path / "manifest.json").write_text(json.dumps(content))
    with pytest.raises(manifest.ManifestError, match="sha256"):
        reader.load_manifest(tmp_path)


def test_unknown_split_lists_known_ones(data_dir):
    with pytest.raises(manifest.ManifestError, match=r"'validation'.*\['train'\]"):
        _train(data_dir, split="validation")


def test_checksum_mismatch_names_the_shard(tmp_path):
    content = write_dataset(tmp_path, num_examples=6, num_shards=2)
    shard = tmp_path / content["splits"]["train"]["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(manifest.ShardChecksumError, match=shard.name):
        _train(str(tmp_path))


def test_bit_flip_without_checksum_check_is_caught_by_record_crc(tmp_path):
    content = write_dataset(tmp_path, num_examples=6, num_shards=2)
    shard = tmp_path / content["splits"]["train"]["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x10  # inside the image bytes of the shard's last record (record 2)
    shard.write_bytes(bytes(data))
    iterator = _train(str(tmp_path), verify_checksums=False)
    with pytest.raises(tfrecord_format.TFRecordCorruptionError, match=rf"{shard.name}: record 2 .*checksum"):
        _take(iterator, 1)


def test_undecodable_image_names_shard_and_record(tmp_path):
    content = write_dataset(tmp_path, num_examples=6, num_shards=2, broken_image_ids=(4,))
    shard = content["splits"]["train"]["shards"][1]["file"]
    with pytest.raises(reader.RecordDecodeError, match=rf"{shard}: record 1: cannot decode image"):
        _take(_train(str(tmp_path)), 1)
    with pytest.raises(reader.RecordDecodeError, match=rf"{shard}: record 1: cannot decode image"):
        list(reader.make_eval_iterator(str(tmp_path), split="train", global_batch_size=6, image_size=IMAGE_SIZE,
                                       process_index=0, process_count=1))


def test_label_outside_the_manifest_classes_names_shard_and_record(tmp_path):
    content = write_dataset(tmp_path, num_examples=6, num_shards=2, num_classes=2)
    shard = content["splits"]["train"]["shards"][0]["file"]  # Example 2, label 2.
    message = rf"{shard}: record 2: label 2 is outside the manifest's 2 classes"
    with pytest.raises(reader.RecordDecodeError, match=message):
        _take(_train(str(tmp_path)), 1)
    with pytest.raises(reader.RecordDecodeError, match=message):
        list(reader.make_eval_iterator(str(tmp_path), split="train", global_batch_size=6, image_size=IMAGE_SIZE,
                                       process_index=0, process_count=1))


def test_record_count_disagreeing_with_manifest_is_named(tmp_path):
    content = write_dataset(tmp_path, num_examples=6, num_shards=2)
    content["splits"]["train"]["shards"][0]["num_records"] = 4
    content["splits"]["train"]["num_examples"] = 7
    (tmp_path / "manifest.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=rf"{content['splits']['train']['shards'][0]['file']}.*3 records.*4"):
        _train(str(tmp_path), verify_checksums=False)


def test_global_batch_must_divide_over_processes(data_dir):
    with pytest.raises(ValueError, match="multiple of the process count"):
        _train(data_dir, global_batch_size=7, process_count=2)


# ------------------------------------------------------------------ device feed


@pytest.fixture(scope="module")
def batch_sharding():
    import jax

    from msff_jax.train import mesh as mesh_lib

    assert jax.device_count() == 8, "tests/conftest.py simulates 8 CPU devices"
    return mesh_lib.batch_sharding(mesh_lib.make_mesh((8, 1)))


def test_global_batch_is_split_over_eight_devices_on_the_batch_axis(batch_sharding):
    from data_pipeline.records import device_feed

    local = {"image": np.arange(16 * 2 * 2 * 3, dtype=np.uint8).reshape(16, 2, 2, 3),
             "label": np.arange(16, dtype=np.int32)}
    batch = device_feed.to_global_batch(local, batch_sharding)
    assert batch["image"].shape == (16, 2, 2, 3) and batch["image"].dtype == np.uint8
    shards = sorted(batch["label"].addressable_shards, key=lambda s: s.index[0].start)
    assert len({s.device for s in shards}) == 8
    assert [s.data.tolist() for s in shards] == [[2 * d, 2 * d + 1] for d in range(8)]
    np.testing.assert_array_equal(np.asarray(batch["image"]), local["image"])


def test_prefetch_state_is_the_last_batch_consumed_not_prefetched(data_dir, batch_sharding):
    from data_pipeline.records import device_feed

    fed = device_feed.prefetch_to_mesh(_train(data_dir, global_batch_size=8), batch_sharding, size=3)
    _take(fed, 2)
    state = fed.get_state()
    assert state["next_batch"] == 2  # although up to 3 more batches were prefetched
    expected = np.asarray(next(fed)["image"])
    resumed = device_feed.prefetch_to_mesh(_train(data_dir, global_batch_size=8), batch_sharding, size=3)
    resumed.set_state(state)
    got = next(resumed)
    assert got["image"].sharding == batch_sharding
    np.testing.assert_array_equal(np.asarray(got["image"]), expected)
    fed.close()
    resumed.close()
