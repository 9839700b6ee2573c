"""Random access over TFRecord shards: indexing, CRC checks, pickling to workers."""

import concurrent.futures
import pickle

import pytest

import record_helpers
from data_pipeline.records import tfrecord_format
from data_pipeline.records.tfrecord_source import RecordCountMismatchError, TFRecordSource

RECORDS = [[f"shard{s}-record{r}-".encode() * (r + 1) for r in range(n)] for s, n in enumerate((4, 1, 3))]


@pytest.fixture()
def shard_paths(tmp_path):
    paths = []
    for s, records in enumerate(RECORDS):
        path = tmp_path / f"part-{s}.tfrecord"
        with open(path, "wb") as f:
            record_helpers.write_records(f, records)
        paths.append(path)
    return paths


def _flatten():
    return [r for records in RECORDS for r in records]


def test_reads_every_record_by_global_index(shard_paths):
    source = TFRecordSource(shard_paths, expected_num_records=[4, 1, 3])
    assert len(source) == 8
    assert [source[i] for i in range(len(source))] == _flatten()
    assert source.locate(5) == (str(shard_paths[2]), 0)
    with pytest.raises(IndexError):
        source[8]


def test_records_match_a_sequential_read(shard_paths):
    source = TFRecordSource(shard_paths)
    sequential = [r for p in shard_paths for r in record_helpers.read_records(p)]
    assert [source[i] for i in range(len(source))] == sequential


def test_bit_flip_in_data_names_shard_and_record(shard_paths):
    path = shard_paths[2]
    data = bytearray(path.read_bytes())
    spans = tfrecord_format.index_records(path)
    offset, _ = spans[1]
    data[offset + tfrecord_format.HEADER_SIZE + 3] ^= 0x04
    path.write_bytes(bytes(data))
    source = TFRecordSource(shard_paths)  # headers are intact: indexing succeeds
    assert source[5] == RECORDS[2][0]
    with pytest.raises(tfrecord_format.TFRecordCorruptionError, match=r"part-2\.tfrecord: record 1 .*checksum"):
        source[6]


def test_bit_flip_in_length_header_fails_at_indexing(shard_paths):
    path = shard_paths[0]
    data = bytearray(path.read_bytes())
    offset, _ = tfrecord_format.index_records(path)[2]
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(tfrecord_format.TFRecordCorruptionError, match=r"part-0\.tfrecord: record 2 .*length checksum"):
        TFRecordSource(shard_paths)


def test_truncated_shard_names_shard_and_record(shard_paths):
    path = shard_paths[0]
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    with pytest.raises(tfrecord_format.TFRecordCorruptionError, match=r"part-0\.tfrecord: record 3 .*truncated"):
        TFRecordSource(shard_paths)


def test_shard_truncated_after_indexing_is_caught_on_read(shard_paths):
    source = TFRecordSource(shard_paths)
    path = shard_paths[2]
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(tfrecord_format.TFRecordCorruptionError, match=r"part-2\.tfrecord: record 2 .*truncated"):
        source[7]


def test_record_count_mismatch_names_shard(shard_paths):
    with pytest.raises(RecordCountMismatchError, match=r"part-1\.tfrecord: holds 1 records, the manifest says 2"):
        TFRecordSource(shard_paths, expected_num_records=[4, 2, 3])


def test_missing_shard_is_named(shard_paths, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.tfrecord"):
        TFRecordSource([*shard_paths, tmp_path / "nowhere.tfrecord"])


def test_pickles_without_open_files_and_reads_after(shard_paths):
    source = TFRecordSource(shard_paths)
    assert source[0] == RECORDS[0][0]  # opens a descriptor in this process
    payload = pickle.dumps(source)
    assert len(payload) < 4096  # paths and offsets only
    clone = pickle.loads(payload)
    assert [clone[i] for i in range(len(clone))] == _flatten()


def test_concurrent_reads_from_threads_agree(shard_paths):
    source = TFRecordSource(shard_paths)
    indices = [i % len(source) for i in range(400)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(source.__getitem__, indices))
    assert got == [_flatten()[i] for i in indices]


def test_empty_shard_list_is_refused():
    with pytest.raises(ValueError, match="at least one shard"):
        TFRecordSource([])

