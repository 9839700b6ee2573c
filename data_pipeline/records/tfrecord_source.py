"""Random access to the records of TFRecord shards, for grain's `MapDataset`.

TFRecord files have no index, so grain's own `TFRecordIterDataset` can only stream them
(no global shuffle, no exact checkpoint by position) and it skips the checksums. This
source scans each shard's 12-byte record headers once (verifying the length CRCs), keeps
the offsets in memory, and then reads any record with a single `os.pread`, verifying the
data CRC (`tfrecord_format.check_record`). A corrupt record is reported by shard file,
record index and byte offset, never decoded.

The offsets are only valid for the file that was indexed, so the source remembers each
shard's identity (device, inode, size, modification time) and refuses, with the record
named, to read a shard that was replaced or rewritten since: old offsets into new
contents must not be read silently.

The source is sent to grain's worker processes by pickling: only the paths, identities
and the offset arrays travel; each process opens its own file descriptors on first use.
`os.pread` takes no shared file position, so the many reader threads of one process can
share a descriptor safely.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np

from data_pipeline.records import tfrecord_format
from data_pipeline.records.tfrecord_format import FOOTER_SIZE, HEADER_SIZE, TFRecordCorruptionError


class RecordCountMismatchError(ValueError):
    """A shard holds a different number of records than its manifest entry says."""

    user_fixable, advice = True, tfrecord_format.DATA_ADVICE


class ShardChangedError(TFRecordCorruptionError):
    """A shard is no longer the file that was indexed (and verified) at start-up."""


def file_identity(stat: os.stat_result) -> tuple[int, ...]:
    """What tells one version of a file from another without reading it: device, inode,
    size, modification and status-change times (ns). A rewrite that keeps all five is
    not seen here; the record CRCs still check every byte read."""
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


# The part of the identity an open descriptor must match: a `chmod` changes only the
# status-change time, and must not stop a run.
_CONTENT_IDENTITY = slice(0, 4)


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
        offsets, lengths, identities = [], [], []
        for shard, path in enumerate(self._paths):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"shard file not found: {path}")
            identities.append(file_identity(os.stat(path)))
            spans = np.asarray(tfrecord_format.index_records(path), dtype=np.int64).reshape(-1, 2)
            if expected_num_records is not None and len(spans) != expected_num_records[shard]:
                raise RecordCountMismatchError(
                    f"{path}: holds {len(spans)} records, the manifest says {expected_num_records[shard]}; "
                    "the shard and manifest.json do not come from the same conversion (or the shard "
                    "was cut short at a record boundary): re-run the conversion"
                )
            offsets.append(spans[:, 0])
            lengths.append(spans[:, 1])
        self._offsets = offsets
        self._lengths = lengths
        self._identities = identities
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

    def unchanged(self) -> bool:
        """Whether every shard is still the file that was indexed (one `stat` each)."""
        for path, identity in zip(self._paths, self._identities):
            try:
                if file_identity(os.stat(path)) != identity:
                    return False
            except OSError:
                return False
        return True

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

    def _open(self, shard: int, local: int) -> int:
        """A descriptor of `shard`, checked to be the file that was indexed."""
        path = self._paths[shard]
        fd = os.open(path, os.O_RDONLY)
        identity = file_identity(os.fstat(fd))
        expected = self._identities[shard]
        if identity[_CONTENT_IDENTITY] != expected[_CONTENT_IDENTITY]:
            os.close(fd)
            size, was = identity[2], expected[2]
            if identity[:2] != expected[:2]:
                what = (f"the shard was replaced by another file ({size} bytes, {was} when it was "
                        "indexed at start-up)")
            elif size < was:
                what = f"the shard is now {size} bytes, {was} when it was indexed at start-up: truncated"
            else:
                what = f"the shard was rewritten after it was indexed at start-up (now {size} bytes, was {was})"
            offset = int(self._offsets[shard][local])
            raise ShardChangedError(
                f"{path}: record {local} at byte {offset}: {what}; restart the run so the "
                "shards are checked again")
        return fd

    def _fd(self, shard: int, local: int) -> int:
        if self._fds_pid != os.getpid():  # forked: the parent's descriptors are not ours
            self._init_process_local_state()
        fd = self._fds.get(shard)
        if fd is None:
            with self._fds_lock:
                fd = self._fds.get(shard)
                if fd is None:
                    fd = self._open(shard, local)
                    self._fds[shard] = fd
        return fd

    def _read(self, shard: int, local: int) -> bytes:
        offset = int(self._offsets[shard][local])
        length = int(self._lengths[shard][local])
        body = os.pread(self._fd(shard, local), length + FOOTER_SIZE, offset + HEADER_SIZE)
        return tfrecord_format.check_record(body, length, path=self._paths[shard], index=local, offset=offset)

    def __getitem__(self, index: int) -> bytes:
        return self._read(*self._split_index(index))

    def check_shard(self, path: str) -> None:
        """Reads every record of shard `path`, raising `TFRecordCorruptionError` at the
        first damaged one. Used to name the record after a shard's SHA-256 mismatched."""
        shard = self._paths.index(os.fspath(path))
        for local in range(len(self._offsets[shard])):
            self._read(shard, local)

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
