"""The grain input pipeline: TFRecord shards to host-local uint8 batches.

Train, as a chain of `grain.MapDataset` index transformations (nothing is read until an
element is asked for):

    range(N) -> shuffle(seed) -> repeat() -> decode+augment(seed, epoch, position)
             -> [process_index::process_count] -> batch(local) -> workers

Position `k` of the infinite stream is epoch `k // N`, so `shuffle` draws a new
permutation every epoch, and the augmentation's random numbers come from
`(seed, epoch, position)` alone. Batch `j` of process `p` is therefore a pure function of
`j`, which is what makes `get_state()`/`set_state()` exact, with or without worker
processes, and makes global batch `j` (all processes together) the stream positions
`[j * global_batch, (j + 1) * global_batch)` whatever the process count.

Batching happens before the hand-off to worker processes, so each worker builds whole
batches and the main process only receives them (one shared-memory transfer per batch).

Eval pads the split to a whole number of global batches; padding examples carry
`mask=False`, so every example is counted exactly once and every process yields the same
number of identically shaped batches.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import math
import os
import signal
import threading
import weakref
from collections.abc import Sequence

import grain
import numpy as np

from data_pipeline.records import example_codec
from data_pipeline.records import transforms
from data_pipeline.records import worker_lifetime
from data_pipeline.records import manifest as manifest_lib
from data_pipeline.records.manifest import load_manifest, shard_paths, split_info
from data_pipeline.records.tfrecord_format import TFRecordCorruptionError
from data_pipeline.records.tfrecord_source import TFRecordSource, file_identity

__all__ = [
    "SplitInfo",
    "load_manifest",
    "make_eval_iterator",
    "make_train_iterator",
    "open_split",
    "RecordDecodeError",
    "TrainIterator",
]


class RecordDecodeError(ValueError):
    """A record whose CRC holds but whose Example or image cannot be decoded."""

    user_fixable, advice = True, manifest_lib.DATA_ADVICE


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """What the trainer needs to know about a split without reading it."""

    num_examples: int
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# Splits already opened in this process: (real data_dir, split) -> (manifest identity,
# checksums verified, source, info). Evaluation builds its iterator again every time;
# this keeps it from re-reading the manifest and re-hashing the shards each time.
_OPENED: dict[tuple[str, str], tuple] = {}
_OPENED_LOCK = threading.Lock()


def _manifest_identity(data_dir: str) -> tuple | None:
    try:
        return file_identity(os.stat(os.path.join(data_dir, manifest_lib.MANIFEST_NAME)))
    except OSError:
        return None


def _open_split_uncached(data_dir: str, split: str, verify_checksums: bool) -> tuple[TFRecordSource, SplitInfo]:
    """The start-up checks, cheapest first: manifest, every shard present, every record
    header (length CRC, truncation) and count, then (optionally) each shard's SHA-256."""
    manifest = load_manifest(data_dir)
    info = split_info(manifest, split, data_dir)
    manifest_lib.check_shards_exist(data_dir, split, manifest)
    source = TFRecordSource(
        shard_paths(data_dir, manifest, split),
        expected_num_records=[shard["num_records"] for shard in info["shards"]],
    )
    if len(source) == 0:
        raise ValueError(f"split {split!r} in {data_dir!r} has no examples")
    if verify_checksums:
        try:
            manifest_lib.verify_split_checksums(data_dir, split, manifest)
        except manifest_lib.ShardChecksumError as err:
            try:  # Name the damaged record too, when a record's CRC shows it.
                source.check_shard(err.path)
            except TFRecordCorruptionError as damaged:
                raise manifest_lib.ShardChecksumError(f"{err}; the first damaged record: {damaged}",
                                                      err.path) from None
            raise manifest_lib.ShardChecksumError(
                f"{err}; every record in it passes its CRC, so it is a whole shard from another "
                "conversion than manifest.json: re-run the conversion, or put back the matching "
                "manifest.json", err.path) from None
    return source, SplitInfo(num_examples=len(source), class_names=tuple(manifest["class_names"]))


def open_split(
    data_dir: str | os.PathLike, split: str, *, verify_checksums: bool = True
) -> tuple[TFRecordSource, SplitInfo]:
    """Validates the manifest, checks that every shard is there, indexes the shards
    (record headers and counts against the manifest) and, with `verify_checksums`,
    compares each shard's SHA-256 with the manifest's; errors name the file (and record).

    The result is kept for this process and returned again while the manifest and every
    shard are the same files (device, inode, size, times); a file replaced or rewritten
    since is opened and checked afresh, never read through the old index.
    """
    data_dir = os.path.realpath(os.fspath(data_dir))
    key = (data_dir, split)
    with _OPENED_LOCK:
        opened = _OPENED.get(key)
    if opened is not None:
        manifest_identity, verified, source, info = opened
        if (manifest_identity == _manifest_identity(data_dir) and (verified or not verify_checksums)
                and source.unchanged()):
            return source, info
    manifest_identity = _manifest_identity(data_dir)
    source, info = _open_split_uncached(data_dir, split, verify_checksums)
    with _OPENED_LOCK:
        _OPENED[key] = (manifest_identity, verify_checksums, source, info)
    return source, info


def _default_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # deferred: worker processes import this module and need no JAX

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of the "
            f"process count {process_count}"
        )
    return global_batch_size // process_count


def _decode_record(source: TFRecordSource, record_index: int, num_classes: int) -> dict:
    """Reads (CRC-checked) and parses one record; errors name the shard and record.

    A label outside the manifest's classes is refused here: one-hot encoding would turn
    it into an all-zero target and train on it silently."""
    data = source[record_index]
    try:
        example = example_codec.decode_example(data)
    except ValueError as err:
        path, local = source.locate(record_index)
        raise RecordDecodeError(f"{path}: record {local}: not a valid Example: {err}") from err
    label = example[example_codec.CLASS_LABEL]
    if label >= num_classes:
        path, local = source.locate(record_index)
        raise RecordDecodeError(f"{path}: record {local}: label {label} is outside the "
                                f"manifest's {num_classes} classes [0, {num_classes})")
    return example


def _image_error(source: TFRecordSource, record_index: int, err: Exception) -> RecordDecodeError:
    path, local = source.locate(record_index)
    return RecordDecodeError(f"{path}: record {local}: {err}")


@dataclasses.dataclass(frozen=True)
class _TrainExample:
    """Stream position -> augmented example. Picklable, so it runs in grain workers."""

    source: TFRecordSource
    num_classes: int
    seed: int
    image_size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    backend: str

    def __call__(self, position: int, record_index: int) -> dict:
        epoch, index_in_epoch = divmod(int(position), len(self.source))
        rng = np.random.default_rng([self.seed, epoch, index_in_epoch])
        example = _decode_record(self.source, record_index, self.num_classes)
        try:
            image = transforms.decode_and_random_resized_crop(
                example[example_codec.IMAGE_ENCODED], self.image_size, rng,
                scale=self.scale, ratio=self.ratio, backend=self.backend,
            )
        except ValueError as err:
            raise _image_error(self.source, record_index, err) from err
        image = transforms.random_horizontal_flip(image, rng)
        return {"image": image, "label": np.int32(example[example_codec.CLASS_LABEL])}


@dataclasses.dataclass(frozen=True)
class _EvalExample:
    """Padded position -> centre-cropped example, or a masked-out blank past the end."""

    source: TFRecordSource
    num_classes: int
    image_size: int

    def __call__(self, record_index: int) -> dict:
        record_index = int(record_index)
        if record_index >= len(self.source):
            return {
                "image": np.zeros((self.image_size, self.image_size, 3), np.uint8),
                "label": np.int32(0),
                "mask": np.bool_(False),
            }
        example = _decode_record(self.source, record_index, self.num_classes)
        try:
            # The one eval transform (no backend): predict and export.json reproduce it.
            image = transforms.decode_resize_center_crop(example[example_codec.IMAGE_ENCODED], self.image_size)
        except ValueError as err:
            raise _image_error(self.source, record_index, err) from err
        return {"image": image, "label": np.int32(example[example_codec.CLASS_LABEL]), "mask": np.bool_(True)}


def _ensure_absl_flags_parsed() -> None:
    """grain's worker start-up reads absl flags, which raise if never parsed; programs
    not started by `absl.app.run` (pytest, notebooks, plain scripts) take the defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _worker_ignores_sigterm(worker_index: int, worker_count: int) -> None:
    """Decode workers leave SIGTERM and SIGINT to the training process.

    A scheduler's preemption signal (and a terminal's Ctrl-C) often reaches the whole
    process group. A worker killed by it makes the trainer's next `next()` raise before
    the trainer has saved; ignoring it lets the trainer save and then stop its workers
    itself. A trainer that blocked SIGTERM before starting any thread
    (`msff_jax.train.preemption.install`) has its workers born with it blocked, which
    covers the moments before this call; a blocked signal pending here is discarded.
    """
    del worker_index, worker_count
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# Every iterator with worker processes that is still open, so that `shutdown` can stop
# them on any way out of the program.
_open_worker_iterators: weakref.WeakSet = weakref.WeakSet()
_shutdown_registered = False


class _WorkerIterDataset(grain.IterDataset):
    """`mp_prefetch`'s dataset whose iterators are recorded for `shutdown`."""

    def __iter__(self):
        global _shutdown_registered
        iterator = self._parent.__iter__()
        _open_worker_iterators.add(iterator)
        if not _shutdown_registered:
            # atexit runs the last registered first: before multiprocessing's own exit
            # handler, which would otherwise stop the shared-memory deletion pool first.
            atexit.register(shutdown)
            _shutdown_registered = True
        return iterator


def release_shared_memory() -> None:
    """Frees now the shared-memory blocks of batches nobody holds any more.

    grain hands batches over from worker processes in shared memory, freed when the
    array is garbage: some only by the cycle collector (a finished iterator's
    StopIteration keeps the last batches in its traceback), and the rest by a deletion
    thread pool. Blocks still unfreed when the program exits are reported by
    multiprocessing's resource tracker as "leaked shared_memory". This collects the
    cycles and waits until the pool (one thread, first in first out) has done what it
    was given.
    """
    gc.collect()
    from grain._src.python.ipc import shared_memory_array

    pool = getattr(shared_memory_array.SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:
        try:
            pool.apply(int)
        except ValueError:  # The pool was already stopped.
            pass


def shutdown() -> None:
    """Stops every reader iterator's decode workers that is still open, then frees its
    shared memory, leaving none for the resource tracker to report. Runs at exit (on
    every way out, failures included); safe to call at any time, any number of times."""
    for iterator in list(_open_worker_iterators):
        try:
            iterator.close()
        except Exception:  # noqa: BLE001, S110 - best effort at exit; the rest still close.
            pass
    release_shared_memory()
    from grain._src.python.ipc import shared_memory_array

    shared_memory_array.SharedMemoryArray._disable_async_del()  # Later deletions: at once.


def _to_iter_dataset(
    ds: grain.MapDataset, *, worker_count: int, read_threads: int, prefetch_buffer: int
) -> grain.IterDataset:
    """Threads within each process, then (if `worker_count`) worker processes.

    Elements are whole batches here, so buffers are counted in batches."""
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer)
    )
    if worker_count > 0:
        _ensure_absl_flags_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=prefetch_buffer),
            worker_init_fn=worker_lifetime.worker_init_fn(_worker_ignores_sigterm),
        )
        it = _WorkerIterDataset(it)
    return it


class TrainIterator(grain.DatasetIterator):
    """The training iterator; its state is the number of batches already returned.

    Batch `j` is a pure function of `j` (see the module docstring), so restoring is
    rebuilding the pipeline from batch `j` onward: exact, independent of grain's
    internal iterator states, and valid across a change of `worker_count` or thread
    count (and even of the process count, since global batch `j` is the same stream
    slice). A state from a different seed or global batch size is refused.
    """

    def __init__(self, batches: grain.MapDataset, *, seed: int, global_batch_size: int, **pipeline_options):
        super().__init__()
        self._batches = batches
        self._seed = seed
        self._global_batch_size = global_batch_size
        self._pipeline_options = pipeline_options
        self._next_batch = 0
        self._iterator = iter(_to_iter_dataset(batches, **pipeline_options))

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        batch = next(self._iterator)
        self._next_batch += 1
        return batch

    def get_state(self) -> dict:
        return {"next_batch": self._next_batch, "seed": self._seed, "global_batch_size": self._global_batch_size}

    def set_state(self, state: dict) -> None:
        for key in ("seed", "global_batch_size"):
            if state.get(key) != getattr(self, f"_{key}"):
                raise ValueError(
                    f"iterator state was saved with {key}={state.get(key)!r}, this pipeline has "
                    f"{getattr(self, f'_{key}')!r}; restoring it would not resume the same data"
                )
        next_batch = int(state["next_batch"])
        if next_batch < 0:
            raise ValueError(f"next_batch must be >= 0, got {next_batch}")
        self._iterator.close()
        self._iterator = iter(_to_iter_dataset(self._batches[next_batch:], **self._pipeline_options))
        self._next_batch = next_batch

    def start_prefetch(self) -> None:
        self._iterator.start_prefetch()

    def close(self) -> None:
        if not self._closed:
            self._iterator.close()
        super().close()


def make_train_iterator(
    data_dir: str | os.PathLike,
    *,
    split: str = "train",
    global_batch_size: int,
    image_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    read_threads: int = 2,
    prefetch_buffer: int = 2,
    scale_range: Sequence[float] = transforms.DEFAULT_SCALE,
    ratio_range: Sequence[float] = transforms.DEFAULT_RATIO,
    image_backend: str = transforms.DEFAULT_BACKEND,
    verify_checksums: bool = True,
) -> TrainIterator:
    """Infinite iterator of `{'image': uint8 (local_batch, s, s, 3), 'label': int32
    (local_batch,)}`, freshly shuffled each epoch (see the module docstring).

    `process_index`/`process_count` default to JAX's; `worker_count` decode processes
    (0: decode in this process with `read_threads` threads); `prefetch_buffer` batches
    are prepared ahead per process; `image_backend` is `'cv2'` or `'pil'` (see
    `transforms`). Call `close()` when done (stops the workers).
    """
    process_index, process_count = _default_process(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, process_count)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    source, info = open_split(data_dir, split, verify_checksums=verify_checksums)
    augment = _TrainExample(
        source=source, num_classes=len(info.class_names), seed=seed, image_size=image_size,
        scale=tuple(scale_range), ratio=tuple(ratio_range), backend=image_backend,
    )
    batches = (
        grain.MapDataset.range(len(source))
        .shuffle(seed=seed)
        .repeat()
        .map_with_index(augment)
        .slice(slice(process_index, None, process_count))
        .batch(local_batch, drop_remainder=True)
    )
    return TrainIterator(
        batches, seed=seed, global_batch_size=global_batch_size,
        worker_count=worker_count, read_threads=read_threads, prefetch_buffer=prefetch_buffer,
    )


def make_eval_iterator(
    data_dir: str | os.PathLike,
    *,
    split: str,
    global_batch_size: int,
    image_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    read_threads: int = 2,
    prefetch_buffer: int = 2,
    verify_checksums: bool = True,
) -> grain.IterDataset:
    """Finite, re-iterable eval dataset of `{'image', 'label', 'mask'}` batches.

    The split is padded to `ceil(N / global_batch_size)` global batches; process `p`
    takes padded positions `p, p + P, p + 2P, ...`, so over all processes every example
    appears exactly once with `mask=True`, and every process yields the same number of
    batches of shape `(global_batch_size / P, ...)`.
    """
    process_index, process_count = _default_process(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, process_count)
    source, info = open_split(data_dir, split, verify_checksums=verify_checksums)
    padded = math.ceil(len(source) / global_batch_size) * global_batch_size
    ds = (
        grain.MapDataset.range(padded)
        .slice(slice(process_index, None, process_count))
        .map(_EvalExample(source=source, num_classes=len(info.class_names), image_size=image_size))
        .batch(local_batch, drop_remainder=True)
    )
    return _to_iter_dataset(ds, worker_count=worker_count, read_threads=read_threads, prefetch_buffer=prefetch_buffer)
