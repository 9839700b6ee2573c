"""Max (and mean) reductions whose gradient is exact in any dtype, for IASM's pooling.

`jnp.max` differentiates by marking every position equal to the maximum and dividing
the cotangent by their count, and it counts in the input's dtype. In bfloat16 that
count saturates (eight significant bits), so over a 56x56 map of equal values, such as
an all-zero channel after a ReLU, the gradient of the maximum sums to about 3 instead of
1. The functions here take the same convention, the cotangent split equally among tied
maxima (what `jnp.max` does in float32, so float32 results are unchanged), but count
the ties in int32 and divide in float32, then cast back.

`mean_and_max` returns both IASM descriptors from one reduction pass and differentiates
both in one elementwise pass. Over the last axis (the spatial attention's maps, a mean
and a max over channels) the pass is a single variadic reduction that carries the sum,
the maximum and the int32 count of its ties, so the backward needs no reduction at all:
compiled for a GPU, a plain `jnp.sum` and `jnp.max` over that axis stay two kernels,
each reading the whole input. Over other axes (the channel attention's descriptors,
over height and width) XLA merges a plain sum and max into one kernel by itself, while a
three-output reduction there would be preceded by a kernel writing its operands out in
full; so there the ties are counted in the backward, in a reduction XLA merges with the
backward's own over the same axes. Its `valid` argument serves channel padding
(`MSFFNet.channel_alignment`): only the first `valid` entries along the reduced axis
are real; the mean divides by `valid` and the padding never takes part in the maximum,
nor receives gradient.

Only reverse-mode differentiation is defined (`jax.custom_vjp`): forward mode
(`jax.jvp`) through these functions is refused, as for the gather max-pool.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Axis = int | Sequence[int]


def _normalise_axes(axis: Axis, ndim: int) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    normalised = tuple(sorted({a % ndim for a in axes}))
    if len(normalised) != len(axes) or any(not -ndim <= a < ndim for a in axes):
        raise ValueError(f"invalid reduction axes {axis!r} for an array of rank {ndim}")
    return normalised


def _valid_mask(x: jnp.ndarray, axes: tuple[int, ...], valid: int | None):
    """Boolean mask, broadcastable to `x`, of the real entries; None when all are."""
    if valid is None:
        return None
    if len(axes) != 1:
        raise ValueError(f"valid= needs a single reduction axis; got axes {axes}")
    (axis,) = axes
    if not 1 <= valid <= x.shape[axis]:
        raise ValueError(f"valid must be in [1, {x.shape[axis]}]; got {valid}")
    if valid == x.shape[axis]:
        return None
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return lax.broadcasted_iota(jnp.int32, shape, axis) < valid


def _count(x, axes, valid) -> int:
    """How many real entries each reduction covers."""
    if valid is not None:
        return valid
    count = 1
    for a in axes:
        count *= x.shape[a]
    return count


def _forward_values(x, axes, valid, with_mean):
    """`(mean or None, maximum, ties or None)`.

    Over the last axis (IASM's spatial descriptors): one variadic reduction carrying a
    float32 (or wider) sum, the maximum and the int32 count of the entries equal to it,
    so the backward needs no reduction. Over other axes (the channel descriptors): a sum
    and a max that XLA merges into one kernel, ties left to the backward (None). XLA's
    GPU compiler fuses the producer of a three-output reduction along the minor axis,
    but across the others it writes the widened input and the counts out in full first;
    and there the backward's tie count joins the backward's own reduction over the same
    axes, so counting it in the forward would save nothing.
    """
    mask = _valid_mask(x, axes, valid)
    if axes == (x.ndim - 1,):
        return _minor_axis_values(x, axes, valid, mask, with_mean)
    if mask is None:
        candidates, summands = x, x
    else:
        candidates = jnp.where(mask, x, jnp.array(-jnp.inf, x.dtype))
        summands = jnp.where(mask, x, jnp.zeros((), x.dtype))
    maximum = jnp.max(candidates, axis=axes)
    if not with_mean:
        return None, maximum, None
    # jnp.mean's own arithmetic: a float32 (or wider) sum divided by the count.
    accumulate = jnp.promote_types(x.dtype, jnp.float32)
    total = jnp.sum(summands, axis=axes, dtype=accumulate)
    mean = lax.div(total, jnp.array(_count(x, axes, valid), accumulate))
    return mean.astype(x.dtype), maximum, None


def _minor_axis_values(x, axes, valid, mask, with_mean):
    accumulate = jnp.promote_types(x.dtype, jnp.float32)
    # XLA's reduce takes one floating precision across its operands: the maximum runs in
    # `accumulate` too, which is exact (widening changes no value and no order).
    wide = x.astype(accumulate)
    # Each entry enters with a count of 1, made from x itself: a constant array of ones
    # is one XLA may write out in full instead of fusing it (`wide == wide` is False only
    # for NaN, which only a NaN maximum equals, and a NaN maximum has no winners).
    counts = wide == wide
    if mask is None:
        candidates, summands = wide, wide
    else:
        candidates = jnp.where(mask, wide, jnp.array(-jnp.inf, accumulate))
        summands = jnp.where(mask, wide, jnp.zeros((), accumulate))
        counts = counts & mask
    counts = counts.astype(jnp.int32)
    init_max, init_count = jnp.array(-jnp.inf, accumulate), jnp.zeros((), jnp.int32)
    if not with_mean:
        maximum, ties = lax.reduce(
            (candidates, counts), (init_max, init_count), _max_and_ties, axes
        )
        return None, maximum, ties
    total, maximum, ties = lax.reduce(
        (summands, candidates, counts),
        (jnp.zeros((), accumulate), init_max, init_count),
        _sum_max_and_ties,
        axes,
    )
    mean = lax.div(total, jnp.array(_count(x, axes, valid), accumulate))
    return mean.astype(x.dtype), maximum, ties


def _max_and_ties(left, right):
    """Reducer over (maximum, how many entries equal it); padding enters with count 0."""
    (max_left, ties_left), (max_right, ties_right) = left, right
    maximum = lax.max(max_left, max_right)
    ties = jnp.where(max_left == maximum, ties_left, 0) + jnp.where(
        max_right == maximum, ties_right, 0
    )
    return maximum, ties


def _sum_max_and_ties(left, right):
    maximum, ties = _max_and_ties(left[1:], right[1:])
    return left[0] + right[0], maximum, ties


def _backward(axes, valid, x, maximum, ties, grad_mean, grad_max):
    """Elementwise when the forward counted the ties; otherwise one reduction counts them."""
    accumulate = jnp.promote_types(x.dtype, jnp.float32)
    mask = _valid_mask(x, axes, valid)
    kept = tuple(a for a in range(x.ndim) if a not in axes)

    def spread(v):  # Reduced shape back to x's shape.
        return lax.broadcast_in_dim(v, x.shape, kept)

    winners = x == spread(maximum)
    if mask is not None:
        winners = winners & mask
    if ties is None:
        ties = jnp.sum(winners, axis=axes, dtype=jnp.int32)
    share = grad_max.astype(accumulate) / ties.astype(accumulate)
    grad = jnp.where(winners, spread(share), jnp.zeros((), accumulate))
    if grad_mean is not None:
        count = jnp.array(_count(x, axes, valid), accumulate)
        from_mean = spread(grad_mean.astype(accumulate) / count)
        if mask is not None:
            from_mean = jnp.where(mask, from_mean, jnp.zeros((), accumulate))
        grad = from_mean + grad
    return grad.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_impl(x, axes, valid):
    return _forward_values(x, axes, valid, with_mean=False)[1].astype(x.dtype)


def _max_fwd(x, axes, valid):
    _, maximum, ties = _forward_values(x, axes, valid, with_mean=False)
    return maximum.astype(x.dtype), (x, maximum, ties)


def _max_bwd(axes, valid, residuals, grad_max):
    x, maximum, ties = residuals
    return (_backward(axes, valid, x, maximum, ties, None, grad_max),)


_max_impl.defvjp(_max_fwd, _max_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _mean_max_impl(x, axes, valid):
    mean, maximum, _ = _forward_values(x, axes, valid, with_mean=True)
    return mean, maximum.astype(x.dtype)


def _mean_max_fwd(x, axes, valid):
    mean, maximum, ties = _forward_values(x, axes, valid, with_mean=True)
    return (mean, maximum.astype(x.dtype)), (x, maximum, ties)


def _mean_max_bwd(axes, valid, residuals, grads):
    x, maximum, ties = residuals
    grad_mean, grad_max = grads
    return (_backward(axes, valid, x, maximum, ties, grad_mean, grad_max),)


_mean_max_impl.defvjp(_mean_max_fwd, _mean_max_bwd)


def _check_float(x: jnp.ndarray) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"expected a floating-point array; got dtype {x.dtype}")


def _keep(v: jnp.ndarray, axes: tuple[int, ...], keepdims: bool) -> jnp.ndarray:
    return jnp.expand_dims(v, axes) if keepdims else v


def exact_max(x: jnp.ndarray, axis: Axis, keepdims: bool = False) -> jnp.ndarray:
    """`jnp.max(x, axis)`; the gradient splits each cotangent equally among the tied
    maxima (jnp.max's float32 convention), counted without saturation in any dtype."""
    _check_float(x)
    axes = _normalise_axes(axis, x.ndim)
    return _keep(_max_impl(x, axes, None), axes, keepdims)


def mean_and_max(
    x: jnp.ndarray, axis: Axis, keepdims: bool = False, valid: int | None = None
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`(jnp.mean(x, axis), jnp.max(x, axis))` in one pass, with `exact_max`'s gradient.

    `valid` (one reduction axis only): the number of leading entries along that axis
    that are real; the rest are padding, left out of both the mean (which divides by
    `valid`) and the maximum, and given zero gradient.
    """
    _check_float(x)
    axes = _normalise_axes(axis, x.ndim)
    mean, maximum = _mean_max_impl(x, axes, valid)
    return _keep(mean, axes, keepdims), _keep(maximum, axes, keepdims)
