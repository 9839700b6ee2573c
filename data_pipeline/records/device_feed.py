"""Host-local numpy batches to global `jax.Array`s on the mesh, prefetched.

Each process holds only its own slice of the global batch (`global / process_count`
examples); `jax.make_array_from_process_local_data` assembles the global array with the
batch axis split over the sharding's devices, on one host or many.

Prefetching runs the transfer for the next batches in a background thread while the
current step computes. A checkpoint must record the position of the last batch that
training *consumed*, not of the last one prefetched; grain's
`ThreadPrefetchDatasetIterator` stores the parent's state beside every buffered element
and reports the state of the element last returned, which is exactly that.
(`grain.experimental.device_put` uses `jax.device_put`, which on several hosts would
treat each host's slice as the whole batch, so it is not used here.)

The sharding always comes from the caller (the trainer's `mesh.batch_sharding`): this
package places batches where it is told and knows nothing of the mesh's axes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np


def to_global_batch(local_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Every leaf of this process's batch becomes the matching slice of a global array
    whose leading (batch) dimension is `process_count` times the local one."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


class _GlobalBatchIterator(grain.DatasetIterator):
    """Applies `to_global_batch` to each element; state is the parent's, unchanged."""

    def __init__(self, parent: Iterator, sharding: jax.sharding.Sharding):
        super().__init__(parent if isinstance(parent, grain.DatasetIterator) else ())
        self._source = parent
        self._sharding = sharding

    def __next__(self) -> dict[str, jax.Array]:
        return to_global_batch(next(self._source), self._sharding)

    def get_state(self) -> dict[str, Any]:
        return self._source.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._source.set_state(state)

    def close(self) -> None:
        super().close()
        if not self._parents and hasattr(self._source, "close"):
            self._source.close()


def prefetch_to_mesh(iterator: Iterator, sharding: jax.sharding.Sharding, size: int = 2) -> grain.DatasetIterator:
    """Iterator of global batches, `size` of them transferred ahead in a thread.

    `iterator` must offer `get_state()`/`set_state()` (any grain iterator does). The
    returned iterator's `get_state()` is the state after the last batch it *returned*,
    so saving it with the model and restoring it later resumes with the very next batch,
    whatever was sitting in the prefetch buffer. It is a `grain.DatasetIterator`, so
    `grain.checkpoint.CheckpointSave`/`CheckpointRestore` accept it directly.
    """
    if size < 1:
        raise ValueError(f"prefetch size must be >= 1, got {size}")
    return grain.experimental.ThreadPrefetchDatasetIterator(_GlobalBatchIterator(iterator, sharding), size)
