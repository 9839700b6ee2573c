"""Max (and mean) reductions whose gradient is exact in any dtype, for IASM's pooling.

`jnp.max` differentiates by marking every position equal to the maximum and dividing
the cotangent by their count, and it counts in the input's dtype. In bfloat16 that
count saturates (eight significant bits), so over a 56x56 map of equal values, such as
an all-zero channel after a ReLU, the gradient of the maximum sums to about 3 instead of
1. The functions here take the same convention, the cotangent split equally among tied
maxima (what `jnp.max` does in float32, so float32 results are unchanged), but count
the ties in int32 and divide in float32, then cast back.

`mean_and_max` returns both IASM descriptors from one reduction pass (XLA fuses the sum
and the max of the same input) and differentiates both in one elementwise pass, after
one reduction that counts the ties. Its `valid` argument serves channel padding
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
    mask = _valid_mask(x, axes, valid)
    if mask is None:
        candidates, summands = x, x
    else:
        candidates = jnp.where(mask, x, jnp.array(-jnp.inf, x.dtype))
        summands = jnp.where(mask, x, jnp.zeros((), x.dtype))
    maximum = jnp.max(candidates, axis=axes)
    if not with_mean:
        return None, maximum
    # jnp.mean's own arithmetic: a float32 (or wider) sum divided by the count.
    accumulate = jnp.promote_types(x.dtype, jnp.float32)
    total = jnp.sum(summands, axis=axes, dtype=accumulate)
    mean = lax.div(total, jnp.array(_count(x, axes, valid), accumulate))
    return mean.astype(x.dtype), maximum


def _backward(axes, valid, x, maximum, grad_mean, grad_max):
    accumulate = jnp.promote_types(x.dtype, jnp.float32)
    mask = _valid_mask(x, axes, valid)
    kept = tuple(a for a in range(x.ndim) if a not in axes)

    def spread(v):  # Reduced shape back to x's shape.
        return lax.broadcast_in_dim(v, x.shape, kept)

    winners = x == spread(maximum)
    if mask is not None:
        winners = winners & mask
    ties = jnp.sum(winners, axis=axes, dtype=jnp.int32).astype(accumulate)
    share = grad_max.astype(accumulate) / ties
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
    return _forward_values(x, axes, valid, with_mean=False)[1]


def _max_fwd(x, axes, valid):
    maximum = _forward_values(x, axes, valid, with_mean=False)[1]
    return maximum, (x, maximum)


def _max_bwd(axes, valid, residuals, grad_max):
    x, maximum = residuals
    return (_backward(axes, valid, x, maximum, None, grad_max),)


_max_impl.defvjp(_max_fwd, _max_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _mean_max_impl(x, axes, valid):
    return _forward_values(x, axes, valid, with_mean=True)


def _mean_max_fwd(x, axes, valid):
    mean, maximum = _forward_values(x, axes, valid, with_mean=True)
    return (mean, maximum), (x, maximum)


def _mean_max_bwd(axes, valid, residuals, grads):
    x, maximum = residuals
    grad_mean, grad_max = grads
    return (_backward(axes, valid, x, maximum, grad_mean, grad_max),)


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
