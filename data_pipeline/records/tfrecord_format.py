"""TFRecord framing, written and read without TensorFlow.

Each record on disk is

    uint64 length (little-endian) | uint32 masked_crc32c(length bytes)
    | data[length]                | uint32 masked_crc32c(data)

Readers here verify both checksums, so a truncated or bit-flipped shard is reported
(file, record index, byte offset) instead of feeding garbage to training. Random access
works from an offset index: `index_records` scans the headers once (reading only 12
bytes per record), `read_record_at` then fetches and verifies any one record.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO, Iterable, Iterator

import google_crc32c

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
HEADER_SIZE = _HEADER.size  # 12
FOOTER_SIZE = _FOOTER.size  # 4
_MASK_DELTA = 0xA282EAD8


class TFRecordCorruptionError(ValueError):
    """A TFRecord file whose framing or checksums do not hold."""


def masked_crc32c(data: bytes) -> int:
    """The CRC32-C of `data`, rotated and offset as TFRecord stores it."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """The on-disk bytes of one record: header, data, footer."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + _FOOTER.pack(masked_crc32c(data))


def write_records(stream: BinaryIO, records: Iterable[bytes]) -> int:
    """Writes framed records to an open binary stream; returns how many."""
    count = 0
    for record in records:
        stream.write(frame_record(record))
        count += 1
    return count


def _corrupt(path, index: int, offset: int, what: str) -> TFRecordCorruptionError:
    return TFRecordCorruptionError(f"{os.fspath(path)}: record {index} at byte {offset}: {what}")


def _read_header(stream: BinaryIO, path, index: int, offset: int, file_size: int) -> int | None:
    """Returns the data length of the record at `offset`, or None at a clean end of file."""
    header = stream.read(HEADER_SIZE)
    if not header:
        return None
    if len(header) < HEADER_SIZE:
        raise _corrupt(path, index, offset, f"file ends inside the record header ({len(header)} of {HEADER_SIZE} bytes)")
    length, length_crc = _HEADER.unpack(header)
    if masked_crc32c(header[:8]) != length_crc:
        raise _corrupt(path, index, offset, "length checksum mismatch (corrupted header)")
    if offset + HEADER_SIZE + length + FOOTER_SIZE > file_size:
        raise _corrupt(path, index, offset, f"record of {length} bytes runs past the end of the file ({file_size} bytes): truncated")
    return length


def _read_body(stream: BinaryIO, length: int, path, index: int, offset: int) -> bytes:
    data = stream.read(length)
    footer = stream.read(FOOTER_SIZE)
    if len(data) != length or len(footer) != FOOTER_SIZE:
        raise _corrupt(path, index, offset, "file ends inside the record: truncated")
    if masked_crc32c(data) != _FOOTER.unpack(footer)[0]:
        raise _corrupt(path, index, offset, "data checksum mismatch (corrupted record)")
    return data


def read_records(path: str | os.PathLike) -> Iterator[bytes]:
    """Yields every record of a TFRecord file in order, verifying both CRCs."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as stream:
        index = offset = 0
        while (length := _read_header(stream, path, index, offset, file_size)) is not None:
            yield _read_body(stream, length, path, index, offset)
            offset += HEADER_SIZE + length + FOOTER_SIZE
            index += 1


def index_records(path: str | os.PathLike) -> list[tuple[int, int]]:
    """`(offset, length)` of every record, from the headers alone (length CRCs verified).

    Data CRCs are checked later, by `read_record_at`, when each record is read.
    """
    file_size = os.path.getsize(path)
    spans = []
    with open(path, "rb") as stream:
        offset = 0
        while (length := _read_header(stream, path, len(spans), offset, file_size)) is not None:
            spans.append((offset, length))
            offset += HEADER_SIZE + length + FOOTER_SIZE
            stream.seek(offset)
    return spans


def read_record_at(stream: BinaryIO, offset: int, length: int, *, path="<stream>", index: int = -1) -> bytes:
    """Reads and verifies the record whose header starts at `offset` (from `index_records`)."""
    stream.seek(offset + HEADER_SIZE)
    return _read_body(stream, length, path, index, offset)
