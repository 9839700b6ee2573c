"""`tf.train.Example` records for image classification, in pure Python.

Grain runs decoding in worker processes; importing TensorFlow there costs seconds of
start-up and hundreds of MB per worker. The Example message is simple enough to read and
write straight from the protobuf wire format, so the data pipeline never needs TF:

    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }   // entries: key = 1, value = 2
    Feature  { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                            Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }
    FloatList { repeated float value = 1 [packed = true]; }
    Int64List { repeated int64 value = 1 [packed = true]; }

`encode_example` writes map entries sorted by key, which is byte-for-byte what TF's
`SerializeToString(deterministic=True)` produces. `decode_example` accepts anything a
protobuf parser would: any entry order, packed or unpacked repeated numbers, unknown
fields (skipped). Malformed bytes raise `ValueError`; the caller adds file and record.
"""

from __future__ import annotations

import struct
from typing import Union

FeatureValue = Union[list[bytes], list[float], list[int]]

IMAGE_ENCODED = "image/encoded"
IMAGE_FORMAT = "image/format"
IMAGE_HEIGHT = "image/height"
IMAGE_WIDTH = "image/width"
CLASS_LABEL = "image/class/label"
CLASS_TEXT = "image/class/text"
FILENAME = "image/filename"

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_BYTES, _WIRE_FIXED32 = 0, 1, 2, 5
_BYTES_LIST, _FLOAT_LIST, _INT64_LIST = 1, 2, 3


# ----------------------------------------------------------------------------- encode


def _varint(value: int) -> bytes:
    if value < 0:  # int64 negatives travel as their 64-bit two's complement.
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    return _varint((field_number << 3) | _WIRE_BYTES) + _varint(len(payload)) + payload


def _encode_feature(value: FeatureValue) -> bytes:
    if not value:
        raise ValueError("empty feature lists are not written; leave the key out")
    if all(isinstance(v, (bytes, bytearray)) for v in value):
        inner = b"".join(_length_delimited(1, bytes(v)) for v in value)
        return _length_delimited(_BYTES_LIST, inner)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        packed = b"".join(_varint(v) for v in value)
        return _length_delimited(_INT64_LIST, _length_delimited(1, packed))
    if all(isinstance(v, float) for v in value):
        packed = struct.pack(f"<{len(value)}f", *value)
        return _length_delimited(_FLOAT_LIST, _length_delimited(1, packed))
    raise TypeError(f"a feature is a list of bytes, of ints or of floats; got {value!r:.80}")


def encode_features(features: dict[str, FeatureValue]) -> bytes:
    """Serializes a generic `{key: [values]}` mapping as a `tf.train.Example`."""
    entries = b"".join(
        _length_delimited(
            1, _length_delimited(1, key.encode("utf-8")) + _length_delimited(2, _encode_feature(value))
        )
        for key, value in sorted(features.items())
    )
    return _length_delimited(1, entries)


def encode_example(
    *,
    image_bytes: bytes,
    image_format: str,
    height: int,
    width: int,
    label: int,
    class_text: str,
    filename: str,
) -> bytes:
    """One classification record with the keys listed in ARCHITECTURE.md."""
    if label < 0:
        raise ValueError(f"label must be a 0-based class index, got {label}")
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    return encode_features({
        IMAGE_ENCODED: [bytes(image_bytes)],
        IMAGE_FORMAT: [image_format.encode("utf-8")],
        IMAGE_HEIGHT: [int(height)],
        IMAGE_WIDTH: [int(width)],
        CLASS_LABEL: [int(label)],
        CLASS_TEXT: [class_text.encode("utf-8")],
        FILENAME: [filename.encode("utf-8")],
    })


# ----------------------------------------------------------------------------- decode


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos < end and buf[pos] < 0x80:  # fast path: most keys and lengths fit one byte
        return buf[pos], pos + 1
    result = shift = 0
    while True:
        if pos >= end:
            raise ValueError(f"truncated varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError(f"varint longer than 10 bytes ending at byte {pos}")


def _fields(buf: bytes, start: int, end: int):
    """Yields `(field_number, wire_type, value)`; `value` is an int for varints and a
    `(start, end)` span for everything else."""
    pos = start
    while pos < end:
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError(f"field number 0 at byte {pos}")
        if wire == _WIRE_VARINT:
            value, pos = _read_varint(buf, pos, end)
            yield number, wire, value
            continue
        if wire == _WIRE_BYTES:
            length, pos = _read_varint(buf, pos, end)
            size = length
        elif wire == _WIRE_FIXED64:
            size = 8
        elif wire == _WIRE_FIXED32:
            size = 4
        else:
            raise ValueError(f"unsupported wire type {wire} for field {number} at byte {pos}")
        if pos + size > end:
            raise ValueError(f"field {number} runs past the end of its message (byte {pos} + {size} > {end})")
        yield number, wire, (pos, pos + size)
        pos += size


def _expect_span(number: int, wire: int, value, what: str) -> tuple[int, int]:
    if wire != _WIRE_BYTES:
        raise ValueError(f"{what} (field {number}) has wire type {wire}, expected length-delimited")
    return value


def _to_int64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


def _decode_feature(buf: bytes, start: int, end: int) -> FeatureValue:
    result: FeatureValue = []
    for number, wire, value in _fields(buf, start, end):
        if number not in (_BYTES_LIST, _FLOAT_LIST, _INT64_LIST):
            continue
        s, e = _expect_span(number, wire, value, "Feature kind")
        result = []  # oneof: the last kind present wins, as in protobuf.
        for inner_number, inner_wire, inner in _fields(buf, s, e):
            if inner_number != 1:
                continue
            if number == _BYTES_LIST:
                a, b = _expect_span(1, inner_wire, inner, "BytesList value")
                result.append(buf[a:b])
            elif number == _INT64_LIST:
                if inner_wire == _WIRE_VARINT:
                    result.append(_to_int64(inner))
                else:
                    a, b = _expect_span(1, inner_wire, inner, "Int64List value")
                    while a < b:
                        v, a = _read_varint(buf, a, b)
                        result.append(_to_int64(v))
            elif inner_wire == _WIRE_FIXED32:
                result.append(struct.unpack_from("<f", buf, inner[0])[0])
            else:
                a, b = _expect_span(1, inner_wire, inner, "FloatList value")
                if (b - a) % 4:
                    raise ValueError(f"packed floats of {b - a} bytes, not a multiple of 4")
                result.extend(struct.unpack_from(f"<{(b - a) // 4}f", buf, a))
    return result


def decode_features(data: bytes) -> dict[str, FeatureValue]:
    """Parses a serialized `tf.train.Example` into `{key: [values]}`.

    Raises `ValueError` for bytes that are not a well-formed Example.
    """
    buf = bytes(data)
    features: dict[str, FeatureValue] = {}
    for number, wire, value in _fields(buf, 0, len(buf)):
        if number != 1:
            continue
        s, e = _expect_span(number, wire, value, "Example.features")
        for entry_number, entry_wire, entry in _fields(buf, s, e):
            if entry_number != 1:
                continue
            es, ee = _expect_span(entry_number, entry_wire, entry, "Features.feature entry")
            key, feature = "", []
            for part_number, part_wire, part in _fields(buf, es, ee):
                if part_number == 1:
                    a, b = _expect_span(1, part_wire, part, "feature key")
                    try:
                        key = buf[a:b].decode("utf-8")
                    except UnicodeDecodeError as err:
                        raise ValueError(f"feature key is not UTF-8: {buf[a:b]!r:.60}") from err
                elif part_number == 2:
                    a, b = _expect_span(2, part_wire, part, "feature value")
                    feature = _decode_feature(buf, a, b)
            features[key] = feature
    return features


def _single(features: dict[str, FeatureValue], key: str, kind: type):
    values = features.get(key)
    if values is None:
        raise ValueError(f"Example lacks the key {key!r} (has {sorted(features)})")
    if len(values) != 1 or not isinstance(values[0], kind):
        raise ValueError(f"{key!r} must hold exactly one {kind.__name__}, got {values!r:.80}")
    return values[0]


def _text(features: dict[str, FeatureValue], key: str) -> str:
    raw = _single(features, key, bytes)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{key!r} is not UTF-8 text: {raw!r:.60}") from err


def decode_example(data: bytes) -> dict:
    """Parses one classification record written by `encode_example` (or by TF).

    Returns `{'image/encoded': bytes, 'image/format': str, 'image/height': int,
    'image/width': int, 'image/class/label': int, 'image/class/text': str,
    'image/filename': str}`.
    """
    features = decode_features(data)
    label = _single(features, CLASS_LABEL, int)
    if label < 0:
        raise ValueError(f"{CLASS_LABEL!r} is negative ({label})")
    return {
        IMAGE_ENCODED: _single(features, IMAGE_ENCODED, bytes),
        IMAGE_FORMAT: _text(features, IMAGE_FORMAT),
        IMAGE_HEIGHT: _single(features, IMAGE_HEIGHT, int),
        IMAGE_WIDTH: _single(features, IMAGE_WIDTH, int),
        CLASS_LABEL: label,
        CLASS_TEXT: _text(features, CLASS_TEXT),
        FILENAME: _text(features, FILENAME),
    }
