"""TFRecord framing, written and read without TensorFlow.

Each record on disk is

    uint64 length (little-endian) | uint32 masked_crc32c(length bytes)
    | data[length]                | uint32 masked_crc32c(data)

This module is the one place both checksums are computed and checked, so a truncated or
bit-flipped shard is reported (file, record index, byte offset) instead of feeding
garbage to training, whoever reads it. Random access works from an offset index:
`index_records` scans the headers once (12 bytes per record), and `check_record`
verifies the bytes that follow any one header when that record is read.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

import google_crc32c

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
HEADER_SIZE = _HEADER.size  # 12
FOOTER_SIZE = _FOOTER.size  # 4
_MASK_DELTA = 0xA282EAD8


# Data errors are the user's to fix: `user_fixable` tells the top of a program
# (`msff_jax.console`) to print one line, with this advice where the message has none.
DATA_ADVICE = "restore the data from a copy, or re-run the conversion into that folder"


class TFRecordCorruptionError(ValueError):
    """A TFRecord file whose framing or checksums do not hold."""

    user_fixable, advice = True, DATA_ADVICE


def masked_crc32c(data: bytes) -> int:
    """The CRC32-C of `data`, rotated and offset as TFRecord stores it."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """The on-disk bytes of one record: header, data, footer."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + _FOOTER.pack(masked_crc32c(data))


def corruption(path, index: int, offset: int, what: str) -> TFRecordCorruptionError:
    """The error for record `index` (header at byte `offset`) of `path`: every message
    about a damaged record has this form, so users can find the record."""
    return TFRecordCorruptionError(f"{os.fspath(path)}: record {index} at byte {offset}: {what}")


def _read_header(stream: BinaryIO, path, index: int, offset: int, file_size: int) -> int | None:
    """Returns the data length of the record at `offset`, or None at a clean end of file."""
    header = stream.read(HEADER_SIZE)
    if not header:
        return None
    if len(header) < HEADER_SIZE:
        raise corruption(path, index, offset,
                         f"file ends inside the record header ({len(header)} of {HEADER_SIZE} bytes): truncated")
    length, length_crc = _HEADER.unpack(header)
    if masked_crc32c(header[:8]) != length_crc:
        raise corruption(path, index, offset, "length checksum mismatch (corrupted header)")
    if offset + HEADER_SIZE + length + FOOTER_SIZE > file_size:
        raise corruption(path, index, offset,
                         f"record of {length} bytes runs past the end of the file ({file_size} bytes): truncated")
    return length


def index_records(path: str | os.PathLike) -> list[tuple[int, int]]:
    """`(offset, length)` of every record, from the headers alone (length CRCs verified,
    and every record checked to end inside the file).

    Data CRCs are checked later, by `check_record`, when each record is read.
    """
    spans = []
    with open(path, "rb") as stream:
        file_size = os.fstat(stream.fileno()).st_size
        offset = 0
        while (length := _read_header(stream, path, len(spans), offset, file_size)) is not None:
            spans.append((offset, length))
            offset += HEADER_SIZE + length + FOOTER_SIZE
            stream.seek(offset)
    return spans


def check_record(body: bytes, length: int, *, path, index: int, offset: int) -> bytes:
    """The data of the record whose header (at byte `offset`, `length` from
    `index_records`) is followed by `body`: its data and data CRC, as read from the file.

    Raises `TFRecordCorruptionError` naming file, record and offset when the file ended
    early or the data CRC does not hold.
    """
    if len(body) != length + FOOTER_SIZE:
        raise corruption(path, index, offset,
                         f"file ends inside the record ({len(body)} of {length + FOOTER_SIZE} bytes "
                         "after the header): truncated")
    data = body[:length]
    if masked_crc32c(data) != _FOOTER.unpack_from(body, length)[0]:
        raise corruption(path, index, offset, "data checksum mismatch (corrupted record)")
    return data
