"""The optimizer step on a few flat buffers instead of a few kernels per parameter.

MSFF-EComNet has 219 parameter arrays, ResNet-50 161. Applied leaf by leaf, the global
gradient norm, the non-finite guard, weight decay, momentum and the update each launch
one or more kernels per array: about 700 of the MSFF step's 1,850 kernels did no work of
the network (the plan, `--mode plan`, counts them). Here the step packs the gradients,
parameters, optimizer moments, EMA and BatchNorm statistics into a handful of
contiguous vectors, runs the norm, the guard and the optax update on those, and unpacks
the results; the compiler fuses the unpacking with the update, so the whole
bookkeeping is a few dozen kernels.

What is stored does not change: `TrainState` keeps its trees, so checkpoints, export and
evaluation see the same parameters and optimizer state as before, and the update is the
one optax computes leaf by leaf (the same arithmetic, elementwise).

Weight decay's mask (`optimizers.decay_mask`: decay tensors of rank > 1) knows packed
parameters by their groups: the decayed one and the others.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

DECAYED, OTHERS = "decayed", "others"


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """Where each leaf of a tree lives in its packed form: `{group: flat array}`."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    groups: tuple[tuple[str, tuple[int, ...]], ...]  # (group, leaf indices in order)

    @classmethod
    def of(cls, tree, group_of) -> "FlatLayout":
        """The layout of `tree` (arrays or shape structs); `group_of(leaf)` names the
        group each leaf is packed in."""
        leaves, treedef = jax.tree.flatten(tree)
        members: dict[str, list[int]] = {}
        for index, leaf in enumerate(leaves):
            members.setdefault(group_of(leaf), []).append(index)
        for group, indices in members.items():
            kinds = {jnp.dtype(leaves[i].dtype) for i in indices}
            if len(kinds) > 1:
                raise ValueError(f"group {group!r} mixes dtypes {sorted(map(str, kinds))}")
        return cls(treedef, tuple(tuple(leaf.shape) for leaf in leaves),
                   tuple(jnp.dtype(leaf.dtype) for leaf in leaves),
                   tuple((group, tuple(indices)) for group, indices in members.items()))

    @classmethod
    def for_parameters(cls, params) -> "FlatLayout":
        """Decayed tensors (rank > 1, as `optimizers.decay_mask`) apart from the rest."""
        return cls.of(params, lambda leaf: DECAYED if len(leaf.shape) > 1 else OTHERS)

    @classmethod
    def single(cls, tree) -> "FlatLayout":
        return cls.of(tree, lambda leaf: OTHERS)

    def pack(self, tree) -> dict[str, jax.Array]:
        leaves = self.treedef.flatten_up_to(tree)
        packed = {}
        for group, indices in self.groups:
            # (1, n): the compiler fuses the unpacking of a row into a few kernels, where
            # the unpacking of a flat vector took one kernel per leaf.
            packed[group] = jnp.concatenate([jnp.ravel(leaves[i]) for i in indices])[None, :]
        return packed

    def unpack(self, packed: dict[str, jax.Array]):
        leaves: list[Any] = [None] * len(self.shapes)
        for group, indices in self.groups:
            flat = jnp.ravel(packed[group])
            offset = 0
            for i in indices:
                size = math.prod(self.shapes[i])
                leaves[i] = flat[offset:offset + size].reshape(self.shapes[i]).astype(self.dtypes[i])
                offset += size
        return self.treedef.unflatten(leaves)

    def _is_tree(self, node) -> bool:
        return jax.tree.structure(node) == self.treedef

    def _is_packed(self, node) -> bool:
        return (isinstance(node, dict) and set(node) == {g for g, _ in self.groups}
                and all(isinstance(v, jax.Array) for v in node.values()))

    def pack_state(self, state):
        """An optimizer state with every parameter-shaped subtree (moments) packed."""
        return jax.tree.map(lambda node: self.pack(node) if self._is_tree(node) else node,
                            state, is_leaf=self._is_tree)

    def unpack_state(self, state):
        return jax.tree.map(lambda node: self.unpack(node) if self._is_packed(node) else node,
                            state, is_leaf=self._is_packed)


def is_packed_parameters(tree) -> bool:
    """Whether `tree` is a `FlatLayout.for_parameters` packing."""
    return isinstance(tree, dict) and bool(tree) and set(tree) <= {DECAYED, OTHERS}


def where(condition, new, old):
    """`new` where `condition` (a scalar) holds, else `old`, leaf by leaf."""
    return jax.tree.map(lambda n, o: jnp.where(condition, n, o), new, old)


def global_norm(packed: dict[str, jax.Array]) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(v.astype(jnp.float32))) for v in packed.values()))
