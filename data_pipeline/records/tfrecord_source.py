"""Random access to the records of TFRecord shards, for grain's `MapDataset`.

TFRecord files have no index, so grain's own `TFRecordIterDataset` can only stream them
(no global shuffle, no exact checkpoint by position) and it skips the checksums. This
source scans each shard's 12-byte record headers once (verifying the length CRCs), keeps
the offsets in memory, and then reads any record with a single `os.pread`, verifying the
data CRC. A corrupt record is reported by shard file and record index, never decoded.

The source is sent to grain's worker processes by pickling: only the paths and the offset
arrays travel; each process opens its own file descriptors on first use. `os.pread` takes
no shared file position, so the many reader threads of one process can share a
descriptor safely.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Sequence

import numpy as np

from data_pipeline.records.tfrecord_format import (
    FOOTER_SIZE,
    HEADER_SIZE,
    TFRecordCorruptionError,
    index_records,
    masked_crc32c,
)

_FOOTER = struct.Struct("<I")


class RecordCountMismatchError(ValueError):
    """A shard holds a different number of records than its manifest entry says."""


class TFRecordSource:
    """`grain.sources.RandomAccessDataSource` of the raw serialized records of shards.

    Global index `i` runs over the shards in the order given: shard 0's records first.
    `expected_num_records` (one count per shard, e.g. from the manifest) is checked
    against the scanned index, so a shard that lost or gained records is caught at start.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        expected_num_records: Sequence[int] | None = None,
    ):
        self._paths = [os.fspath(p) for p in paths]
        if not self._paths:
            raise ValueError("TFRecordSource needs at least one shard file")
        if expected_num_records is not None and len(expected_num_records) != len(self._paths):
            raise ValueError(
                f"{len(expected_num_records)} expected record counts for {len(self._paths)} shards"
            )
        offsets, lengths = [], []
        for shard, path in enumerate(self._paths):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"shard file not found: {path}")
            spans = np.asarray(index_records(path), dtype=np.int64).reshape(-1, 2)
            if expected_num_records is not None and len(spans) != expected_num_records[shard]:
                raise RecordCountMismatchError(
                    f"{path}: holds {len(spans)} records, the manifest says {expected_num_records[shard]}"
                )
            offsets.append(spans[:, 0])
            lengths.append(spans[:, 1])
        self._offsets = offsets
        self._lengths = lengths
        # _shard_starts[k] is the global index of shard k's first record.
        self._shard_starts = np.concatenate([[0], np.cumsum([len(o) for o in offsets])])
        self._init_process_local_state()

    # Per-process state: descriptors are never pickled, and a forked child reopens its own.
    def _init_process_local_state(self) -> None:
        self._fds: dict[int, int] = {}
        self._fds_pid = os.getpid()
        self._fds_lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_fds", "_fds_pid", "_fds_lock"):
            del state[key]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_process_local_state()

    def __len__(self) -> int:
        return int(self._shard_starts[-1])

    def __repr__(self) -> str:
        return f"TFRecordSource({len(self._paths)} shards, {len(self)} records)"

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    def locate(self, index: int) -> tuple[str, int]:
        """The shard file and the record index within it of global record `index`."""
        shard, local = self._split_index(index)
        return self._paths[shard], local

    def _split_index(self, index: int) -> tuple[int, int]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record index {index} out of range for {len(self)} records")
        shard = int(np.searchsorted(self._shard_starts, index, side="right")) - 1
        return shard, index - int(self._shard_starts[shard])

    def _fd(self, shard: int) -> int:
        if self._fds_pid != os.getpid():  # forked: the parent's descriptors are not ours
            self._init_process_local_state()
        fd = self._fds.get(shard)
        if fd is None:
            with self._fds_lock:
                fd = self._fds.get(shard)
                if fd is None:
                    fd = os.open(self._paths[shard], os.O_RDONLY)
                    self._fds[shard] = fd
        return fd

    def __getitem__(self, index: int) -> bytes:
        shard, local = self._split_index(index)
        offset = int(self._offsets[shard][local])
        length = int(self._lengths[shard][local])
        path = self._paths[shard]
        body = os.pread(self._fd(shard), length + FOOTER_SIZE, offset + HEADER_SIZE)
        if len(body) != length + FOOTER_SIZE:
            raise TFRecordCorruptionError(
                f"{path}: record {local} at byte {offset}: file ends inside the record "
                f"(truncated after indexing)"
            )
        data = body[:length]
        if masked_crc32c(data) != _FOOTER.unpack_from(body, length)[0]:
            raise TFRecordCorruptionError(
                f"{path}: record {local} at byte {offset}: data checksum mismatch (corrupted record)"
            )
        return data

    def close(self) -> None:
        if getattr(self, "_fds_pid", None) != os.getpid():
            return
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may already be gone
            pass
