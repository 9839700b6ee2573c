"""BatchNorm (with the residual sum and the ReLU that may follow it) whose backward reads
its input twice, not three times.

The forward, the parameters (`scale`, `bias`) and the statistics (`mean`, `var`, float32,
updated as `momentum * old + (1 - momentum) * batch`) are `flax.linen.BatchNorm`'s with
its defaults (statistics in float32, variance as E[x^2] - E[x]^2 clipped at 0, biased),
so every checkpoint loads either way. Only training's backward differs. Automatic
differentiation of BatchNorm followed by ReLU writes the masked output gradient, reads it
back for the two parameter sums, and reads it again with the input for the input
gradient. Here the backward is written by hand (`jax.custom_vjp`): one pass reads the
output gradient and the input, recomputes the ReLU mask and reduces both sums, a second
pass reads them again and writes the input gradient,

    dx = scale * rsqrt(var + eps) / n * (n * g - sum(g) - x_hat * sum(g * x_hat)),

where `g` is the output gradient after the ReLU mask and `x_hat` the normalised input.
A residual block's `relu(bn(x) + shortcut)` is one call (`residual=shortcut`), so the
mask that both the shortcut's gradient and BatchNorm's need is computed once, in the
first pass. The batch statistics are computed over every axis but the last, so under
`jax.jit` with the batch sharded they are global-batch statistics, as with flax's.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _sums(a, b, axes):
    """`(a.sum(axes), b.sum(axes))` as one variadic reduction: the compiler splits a large
    reduction into a partial and a final kernel, and two sums of one pass otherwise end
    in two final kernels."""
    zero = jnp.zeros((), a.dtype)
    return lax.reduce((a, b), (zero, zero), lambda x, y: (x[0] + y[0], x[1] + y[1]), axes)


def _at_least_float32(x):
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _statistics(x):
    axes = tuple(range(x.ndim - 1))
    x32 = _at_least_float32(x)
    total, total_of_squares = _sums(x32, x32 * x32, axes)
    count = x.size // x.shape[-1]
    mean, mean_of_squares = total / count, total_of_squares / count
    return x32, mean, jnp.maximum(0.0, mean_of_squares - mean * mean)


def _affine(x32, mean, inverse, scale, bias, dtype):
    return ((x32 - mean) * (inverse * scale) + bias).astype(dtype)


def _epilogue(y, residual, relu: bool):
    """The residual sum and the ReLU after the normalisation, in the output dtype."""
    if residual is not None:
        y = y + residual
    return jnp.maximum(y, 0) if relu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def normalize_with_batch_statistics(x, scale, bias, residual, epsilon: float, relu: bool, dtype):
    """(output, batch mean, batch variance) of BatchNorm in training mode; the output is
    `relu(normalised + residual)`, without the residual when it is None and without the
    ReLU unless `relu`."""
    x32, mean, var = _statistics(x)
    y = _affine(x32, mean, lax.rsqrt(var + epsilon), scale, bias, dtype)
    return _epilogue(y, residual, relu), mean, var


def _forward(x, scale, bias, residual, epsilon, relu, dtype):
    x32, mean, var = _statistics(x)
    inverse = lax.rsqrt(var + epsilon)
    out = _epilogue(_affine(x32, mean, inverse, scale, bias, dtype), residual, relu)
    return (out, mean, var), (x, mean, inverse, scale, bias, residual)


def _backward(epsilon, relu, dtype, residuals, cotangents):
    # The statistics feed only the running averages, which no loss depends on: their
    # cotangents are zero and ignored.
    x, mean, inverse, scale, bias, residual = residuals
    g = cotangents[0]
    axes = tuple(range(x.ndim - 1))
    x_hat = (_at_least_float32(x) - mean) * inverse
    if relu:
        # The mask autodiff applies (the ReLU's input, in the output dtype, above zero),
        # applied in the output dtype: where the incoming gradient is expensive to
        # recompute (a fused attention backward) the compiler keeps the masked gradient
        # for both passes, and in that dtype it is half the size of float32.
        x32 = _at_least_float32(x)  # The forward's own expression, so the same mask.
        pre = _epilogue(_affine(x32, mean, inverse, scale, bias, dtype), residual, relu=False)
        g = jnp.where(pre > 0, g, jnp.zeros((), g.dtype))
    d_residual = None if residual is None else g.astype(residual.dtype)
    g = _at_least_float32(g)
    d_bias, d_scale = _sums(g, g * x_hat, axes)
    count = x.size // x.shape[-1]
    dx = (scale * inverse / count) * (count * g - d_bias - x_hat * d_scale)
    return (dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype),
            d_residual)


normalize_with_batch_statistics.defvjp(_forward, _backward)


class BatchNorm(nn.Module):
    """`flax.linen.BatchNorm` over the last axis (same fields, parameters, statistics and
    forward) with a two-pass backward in training. `relu=True` applies the ReLU that
    follows it; `residual=` adds a shortcut first (before the ReLU)."""

    use_running_average: Optional[bool] = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    relu: bool = False

    @nn.compact
    def __call__(self, x, use_running_average: Optional[bool] = None, *, residual=None):
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        features = (x.shape[-1],)
        running_mean = self.variable("batch_stats", "mean",
                                     lambda s: jnp.zeros(s, jnp.float32), features)
        running_var = self.variable("batch_stats", "var",
                                    lambda s: jnp.ones(s, jnp.float32), features)
        scale = self.param("scale", nn.initializers.ones, features, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, scale, bias)
        if use_running_average:
            inverse = lax.rsqrt(running_var.value + self.epsilon)
            y = _affine(_at_least_float32(x), running_mean.value, inverse, scale, bias, dtype)
            return _epilogue(y, residual, self.relu)
        out, mean, var = normalize_with_batch_statistics(x, scale, bias, residual, self.epsilon,
                                                         self.relu, dtype)
        if not self.is_initializing():
            running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
            running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
        return out


class AutodiffBatchNorm(nn.BatchNorm):
    """flax's own BatchNorm, differentiated by JAX, with the same `relu` and `residual`
    interface: the reference `BatchNorm` is tested against, and the speed option
    `batch_norm_backward='autodiff'` that lets a GPU measure what the two-pass backward
    is worth."""

    relu: bool = False

    def __call__(self, x, use_running_average: Optional[bool] = None, *, residual=None):
        y = super().__call__(x, use_running_average)
        return _epilogue(y, residual, self.relu)


BACKWARDS = {"two_pass": BatchNorm, "autodiff": AutodiffBatchNorm}


def check_backward(name: str) -> None:
    if name not in BACKWARDS:
        raise ValueError(f"batch_norm_backward must be one of {tuple(BACKWARDS)}; got {name!r}")
