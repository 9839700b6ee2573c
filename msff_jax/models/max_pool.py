"""3x3 max-pooling (torch's `MaxPool2d(3, stride, padding=1)`) with a choice of backward.

`backward="scatter"` is `flax.linen.max_pool`: XLA's `reduce_window`, whose gradient is
XLA's `select_and_scatter`. XLA's GPU emitter runs that op as two unfused kernels: one
fills the input-shaped gradient with zeros, the other walks every output position's
window and adds its gradient into the chosen input with an atomic add (windows overlap:
3x3 at stride 1 or 2 always do), which also makes it non-deterministic (XLA refuses it
when asked to exclude non-deterministic ops). MSFF-EComNet has a pooling branch in all
eight blocks, at up to 56x56x164 per image.

`backward="gather"` computes the same function and the same gradient without a scatter.
The forward takes the nine shifted (strided) views of the padded input, their maximum,
and the index (0-8) of the first view that attains it, kept as int8 for the backward.
The backward routes each output gradient to the input position that index names: for
each of the nine offsets, the gradients whose window chose that offset, padded
(interior padding for the stride) back into input coordinates, summed. Both passes are
elementwise, pad and slice arithmetic that XLA fuses into loop kernels, and the sum has
a fixed order, so the gradient is deterministic.

Ties go to the first maximum in row-major window order, as in XLA's select-and-scatter
with `>=` (what JAX emits) and in torch's `max_pool2d`, so the two backwards agree
exactly, zeros from a ReLU included. The gather version defines only a reverse-mode
rule (`jax.custom_vjp`): forward-mode differentiation (`jax.jvp`) of it is refused.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

MAX_POOL_BACKWARDS = ("scatter", "gather")

_WINDOW = 3
_OFFSETS = tuple((dh, dw) for dh in range(_WINDOW) for dw in range(_WINDOW))


def check_backward(backward: str, field: str = "max_pool_backward") -> None:
    """Refuses an unknown backward name, naming the accepted ones."""
    if backward not in MAX_POOL_BACKWARDS:
        raise ValueError(f"{field} must be one of {MAX_POOL_BACKWARDS}; got {backward!r}")


def max_pool_3x3(x: jnp.ndarray, strides: int, backward: str) -> jnp.ndarray:
    """Max over 3x3 windows of NHWC `x`, padding 1 (counted as -inf), stride `strides`."""
    check_backward(backward, "max-pool backward")
    if backward == "gather":
        return _gather_max_pool(x, int(strides))
    return nn.max_pool(x, (3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)))


def _output_size(size: int, strides: int) -> int:
    return (size + 2 - _WINDOW) // strides + 1


def _window_views(x: jnp.ndarray, strides: int) -> list[jnp.ndarray]:
    """The nine strided views whose elementwise max is the pooled output."""
    batch, height, width, channels = x.shape
    out_h, out_w = _output_size(height, strides), _output_size(width, strides)
    low = jnp.array(-jnp.inf, x.dtype)
    padded = lax.pad(x, low, ((0, 0, 0), (1, 1, 0), (1, 1, 0), (0, 0, 0)))
    return [
        lax.slice(
            padded,
            (0, dh, dw, 0),
            (batch, dh + strides * (out_h - 1) + 1, dw + strides * (out_w - 1) + 1, channels),
            (1, strides, strides, 1),
        )
        for dh, dw in _OFFSETS
    ]


def _pool_and_argmax(x: jnp.ndarray, strides: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    views = _window_views(x, strides)
    pooled = functools.reduce(jnp.maximum, views)
    # Walking the offsets backwards leaves the first one that attains the maximum.
    first = jnp.full(pooled.shape, len(views) - 1, jnp.int8)
    for index in reversed(range(len(views) - 1)):
        first = jnp.where(views[index] == pooled, jnp.int8(index), first)
    return pooled, first


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather_max_pool_impl(x: jnp.ndarray, strides: int, input_hw: tuple[int, int]):
    del input_hw  # Only the backward needs it.
    return _pool_and_argmax(x, strides)[0]


def _gather_forward(x, strides, input_hw):
    del input_hw
    return _pool_and_argmax(x, strides)  # (output, residual: the int8 window index)


def _gather_backward(strides, input_hw, first, grad_out):
    height, width = input_hw
    out_h, out_w = grad_out.shape[1:3]
    # Sum in float32: up to nine windows can route their gradient to one input.
    accumulate = jnp.promote_types(grad_out.dtype, jnp.float32)
    zero = jnp.zeros((), accumulate)
    grad_padded = None
    for index, (dh, dw) in enumerate(_OFFSETS):
        routed = jnp.where(first == index, grad_out.astype(accumulate), zero)
        placed = lax.pad(
            routed,
            zero,
            (
                (0, 0, 0),
                (dh, height + 2 - dh - strides * (out_h - 1) - 1, strides - 1),
                (dw, width + 2 - dw - strides * (out_w - 1) - 1, strides - 1),
                (0, 0, 0),
            ),
        )
        grad_padded = placed if grad_padded is None else grad_padded + placed
    grad_in = grad_padded[:, 1 : height + 1, 1 : width + 1, :]
    return (grad_in.astype(grad_out.dtype),)


_gather_max_pool_impl.defvjp(_gather_forward, _gather_backward)


def _gather_max_pool(x: jnp.ndarray, strides: int) -> jnp.ndarray:
    if x.ndim != 4:
        raise ValueError(f"max_pool_3x3 expects NHWC input; got shape {x.shape}")
    return _gather_max_pool_impl(x, strides, (x.shape[1], x.shape[2]))
