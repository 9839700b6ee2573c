"""The device mesh and the shardings the training loop places arrays with.

One mesh spans every device of every process. Axis 'data' splits the batch; axis
'model' is reserved for sharding parameters of larger models and is 1 by default, so
parameters are replicated and training is plain data parallelism.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "model")


def resolve_mesh_shape(mesh_shape, num_devices: int) -> tuple[int, int]:
    """Fills a -1 in `mesh_shape` and checks the product equals `num_devices`."""
    shape = list(mesh_shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(
            f"config.mesh_shape={tuple(mesh_shape)} must have {len(MESH_AXES)} entries, one "
            f"per axis {MESH_AXES}; e.g. --config.mesh_shape='(-1, 1)'.")
    if shape.count(-1) > 1:
        raise ValueError(f"config.mesh_shape={tuple(mesh_shape)} may contain at most one -1.")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if known <= 0 or num_devices % known:
            raise ValueError(
                f"config.mesh_shape={tuple(mesh_shape)} does not divide the {num_devices} "
                "devices; change the fixed axis sizes so they divide it.")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"config.mesh_shape={tuple(mesh_shape)} has {math.prod(shape)} devices but "
            f"{num_devices} are available; use -1 for the data axis, e.g. '(-1, 1)'.")
    return tuple(shape)


def make_mesh(mesh_shape=(-1, 1), devices=None) -> Mesh:
    """A ('data', 'model') mesh over `devices` (default: all devices of all processes).

    Built from `jax.devices()` order, which groups each process's devices together, so
    each process's slice of the batch lives on its own devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data', everything else replicated."""
    return NamedSharding(mesh, P("data"))
