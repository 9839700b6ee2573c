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

import dataclasses
import math
import os
import signal
from collections.abc import Sequence

import grain
import numpy as np

from data_pipeline.records import example_codec
from data_pipeline.records import transforms
from data_pipeline.records.manifest import load_manifest, shard_paths, split_info, verify_split_checksums
from data_pipeline.records.tfrecord_source import TFRecordSource

__all__ = [
    "SplitInfo",
    "describe_split",
    "load_manifest",
    "make_eval_iterator",
    "make_train_iterator",
    "open_split",
    "RecordDecodeError",
    "TrainIterator",
]


class RecordDecodeError(ValueError):
    """A record whose CRC holds but whose Example or image cannot be decoded."""


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """What the trainer needs to know about a split without reading it."""

    num_examples: int
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def describe_split(data_dir: str | os.PathLike, split: str) -> SplitInfo:
    manifest = load_manifest(data_dir)
    info = split_info(manifest, split, data_dir)
    return SplitInfo(num_examples=info["num_examples"], class_names=tuple(manifest["class_names"]))


def open_split(
    data_dir: str | os.PathLike, split: str, *, verify_checksums: bool = True
) -> tuple[TFRecordSource, SplitInfo]:
    """Validates the manifest (and, optionally, the shards' SHA-256), indexes the
    split's shards and checks their record counts against the manifest."""
    manifest = load_manifest(data_dir)
    info = split_info(manifest, split, data_dir)
    if verify_checksums:
        verify_split_checksums(data_dir, split, manifest)
    source = TFRecordSource(
        shard_paths(data_dir, manifest, split),
        expected_num_records=[shard["num_records"] for shard in info["shards"]],
    )
    if len(source) == 0:
        raise ValueError(f"split {split!r} in {os.fspath(data_dir)!r} has no examples")
    return source, SplitInfo(num_examples=len(source), class_names=tuple(manifest["class_names"]))


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
    backend: str

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
            image = transforms.decode_resize_center_crop(
                example[example_codec.IMAGE_ENCODED], self.image_size, backend=self.backend
            )
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
    """Decode workers leave SIGTERM to the training process.

    A scheduler's preemption signal often reaches the whole process group (SLURM,
    `kill -TERM -PGID`, container stops). A worker killed by it makes the trainer's next
    `next()` raise before the trainer has saved its preemption checkpoint; ignoring it
    here lets the trainer save and then shut its workers down itself. A signal in the
    second or so between a worker's start and this call still ends that worker, and the
    run with it: at start-up, after a restore, or while an evaluation starts its own
    workers. The run then resumes from its last checkpoint.
    """
    del worker_index, worker_count
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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
            worker_init_fn=_worker_ignores_sigterm,
        )
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
    image_backend: str = transforms.DEFAULT_BACKEND,
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
        .map(_EvalExample(source=source, num_classes=len(info.class_names), image_size=image_size,
                          backend=image_backend))
        .batch(local_batch, drop_remainder=True)
    )
    return _to_iter_dataset(ds, worker_count=worker_count, read_threads=read_threads, prefetch_buffer=prefetch_buffer)
