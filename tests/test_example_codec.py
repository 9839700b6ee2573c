"""The pure-Python Example codec and TFRecord framing agree with TensorFlow's."""

import io
import os

import pytest
import tensorflow as tf

from data_pipeline.records import example_codec
import record_helpers
from data_pipeline.records import tfrecord_format

FIELDS = dict(
    image_bytes=b"\xff\xd8\xff\xe0 not really a jpeg \x00\x01" * 50,
    image_format="jpeg",
    height=300,
    width=205,
    label=14,
    class_text="Leggings",
    filename="img/Fleece_Jogger_Leggings/img_00000001.jpg",
)


def _tf_example(**f) -> tf.train.Example:
    bytes_feature = lambda v: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
    int_feature = lambda v: tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))
    return tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": bytes_feature(f["image_bytes"]),
        "image/format": bytes_feature(f["image_format"].encode()),
        "image/height": int_feature(f["height"]),
        "image/width": int_feature(f["width"]),
        "image/class/label": int_feature(f["label"]),
        "image/class/text": bytes_feature(f["class_text"].encode()),
        "image/filename": bytes_feature(f["filename"].encode()),
    }))


def _expected_decoded(f):
    return {
        "image/encoded": f["image_bytes"], "image/format": f["image_format"],
        "image/height": f["height"], "image/width": f["width"], "image/class/label": f["label"],
        "image/class/text": f["class_text"], "image/filename": f["filename"],
    }


def test_encoded_bytes_equal_tf_deterministic_serialization():
    ours = example_codec.encode_example(**FIELDS)
    assert ours == _tf_example(**FIELDS).SerializeToString(deterministic=True)
    parsed = tf.train.Example.FromString(ours)
    assert parsed.features.feature["image/class/label"].int64_list.value == [14]
    assert parsed.features.feature["image/class/text"].bytes_list.value == [b"Leggings"]


def test_decodes_tf_serialized_examples():
    fields = dict(FIELDS, label=0, height=1, width=1 << 40, class_text="Tée", image_bytes=b"")
    data = _tf_example(**fields).SerializeToString()
    assert example_codec.decode_example(data) == _expected_decoded(fields)


def test_generic_features_round_trip_with_tf_including_unpacked_and_negative():
    features = {"b": [b"x", b""], "f": [1.5, -2.25], "i": [-1, 0, 2**62]}
    ours = example_codec.encode_features(features)
    parsed = tf.train.Example.FromString(ours).features.feature
    assert list(parsed["b"].bytes_list.value) == [b"x", b""]
    assert list(parsed["f"].float_list.value) == [1.5, -2.25]
    assert list(parsed["i"].int64_list.value) == [-1, 0, 2**62]
    tf_bytes = tf.train.Example(features=tf.train.Features(feature={
        "i": tf.train.Feature(int64_list=tf.train.Int64List(value=[-5, 7])),
        "f": tf.train.Feature(float_list=tf.train.FloatList(value=[0.5])),
    })).SerializeToString()
    assert example_codec.decode_features(tf_bytes) == {"i": [-5, 7], "f": [0.5]}
    # An unpacked Int64List (field 1 repeated as varints) is valid protobuf too.
    unpacked_feature = b"\x1a\x04" + b"\x08\x03\x08\x04"
    entry = b"\x0a\x01k" + b"\x12" + bytes([len(unpacked_feature)]) + unpacked_feature
    features_msg = b"\x0a" + bytes([len(entry)]) + entry
    data = b"\x0a" + bytes([len(features_msg)]) + features_msg
    assert list(tf.train.Example.FromString(data).features.feature["k"].int64_list.value) == [3, 4]
    assert example_codec.decode_features(data) == {"k": [3, 4]}


@pytest.mark.parametrize("cut", [1, 5, 40, -3])
def test_truncated_example_raises_value_error(cut):
    data = example_codec.encode_example(**FIELDS)
    with pytest.raises(ValueError):
        example_codec.decode_example(data[:cut])


def test_missing_key_and_garbage_raise_clear_errors():
    data = example_codec.encode_features({"image/encoded": [b"x"]})
    with pytest.raises(ValueError, match="lacks the key"):
        example_codec.decode_example(data)
    with pytest.raises(ValueError):
        example_codec.decode_example(b"\x0f\xff\xff")
    wrong_kind = example_codec.encode_features(dict(
        {k: v for k, v in example_codec.decode_features(example_codec.encode_example(**FIELDS)).items()},
        **{"image/class/label": [b"3"]}))
    with pytest.raises(ValueError, match="image/class/label"):
        example_codec.decode_example(wrong_kind)


# ----------------------------------------------------------------------------- TFRecord


def test_tfrecord_files_interoperate_with_tf(tmp_path):
    records = [b"", b"a", os.urandom(1000), example_codec.encode_example(**FIELDS)]
    ours = tmp_path / "ours.tfrecord"
    with open(ours, "wb") as stream:
        assert record_helpers.write_records(stream, records) == 4
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(ours))] == records
    theirs = tmp_path / "theirs.tfrecord"
    with tf.io.TFRecordWriter(str(theirs)) as writer:
        for record in records:
            writer.write(record)
    assert ours.read_bytes() == theirs.read_bytes()
    assert list(record_helpers.read_records(theirs)) == records
    spans = tfrecord_format.index_records(theirs)
    assert [length for _, length in spans] == [len(r) for r in records]
    with open(theirs, "rb") as stream:
        for i in (3, 0, 2):
            assert record_helpers.read_record_at(stream, *spans[i], path=theirs, index=i) == records[i]


def _write(path, records):
    with open(path, "wb") as stream:
        record_helpers.write_records(stream, records)
    return bytearray(path.read_bytes())


def test_truncated_tfrecord_names_file_and_record(tmp_path):
    path = tmp_path / "shard.tfrecord"
    data = _write(path, [b"x" * 100, b"y" * 100, b"z" * 100])
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(tfrecord_format.TFRecordCorruptionError, match=r"shard\.tfrecord: record 2 .*truncated"):
        list(record_helpers.read_records(path))
    with pytest.raises(tfrecord_format.TFRecordCorruptionError, match="record 2"):
        tfrecord_format.index_records(path)
    path.write_bytes(bytes(data[:116 + 5]))  # cut inside record 1's header
    with pytest.raises(tfrecord_format.TFRecordCorruptionError, match="record 1 .*header"):
        list(record_helpers.read_records(path))


def test_bit_flips_are_caught_in_data_and_in_length(tmp_path):
    path = tmp_path / "shard.tfrecord"
    data = _write(path, [b"a" * 50, b"b" * 50])
    flipped = bytearray(data)
    flipped[66 + 12 + 20] ^= 0x04  # inside record 1's data
    path.write_bytes(bytes(flipped))
    with pytest.raises(tfrecord_format.TFRecordCorruptionError, match="record 1 at byte 66: data checksum"):
        list(record_helpers.read_records(path))
    spans = tfrecord_format.index_records(path)
    with open(path, "rb") as stream, pytest.raises(tfrecord_format.TFRecordCorruptionError, match="record 1"):
        record_helpers.read_record_at(stream, *spans[1], path=path, index=1)
    flipped = bytearray(data)
    flipped[2] ^= 0x01  # record 0's length
    path.write_bytes(bytes(flipped))
    with pytest.raises(tfrecord_format.TFRecordCorruptionError, match="record 0 .*length checksum"):
        list(record_helpers.read_records(path))


def test_frame_record_matches_stream_writer():
    stream = io.BytesIO()
    record_helpers.write_records(stream, [b"abc"])
    assert stream.getvalue() == tfrecord_format.frame_record(b"abc")
