"""BatchNorm (optionally with the ReLU that follows it) whose backward reads its input
twice, not three times.

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
The batch statistics are computed over every axis but the last, so under `jax.jit` with
the batch sharded they are global-batch statistics, as with flax's.
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


def _statistics(x):
    axes = tuple(range(x.ndim - 1))
    x32 = x.astype(jnp.float32)
    total, total_of_squares = _sums(x32, x32 * x32, axes)
    count = x.size // x.shape[-1]
    mean, mean_of_squares = total / count, total_of_squares / count
    return x32, mean, jnp.maximum(0.0, mean_of_squares - mean * mean)


def _affine(x32, mean, inverse, scale, bias, relu: bool, dtype):
    y = ((x32 - mean) * (inverse * scale) + bias).astype(dtype)
    return jnp.maximum(y, 0) if relu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def normalize_with_batch_statistics(x, scale, bias, epsilon: float, relu: bool, dtype):
    """(output, batch mean, batch variance) of BatchNorm in training mode."""
    x32, mean, var = _statistics(x)
    return _affine(x32, mean, lax.rsqrt(var + epsilon), scale, bias, relu, dtype), mean, var


def _forward(x, scale, bias, epsilon, relu, dtype):
    x32, mean, var = _statistics(x)
    inverse = lax.rsqrt(var + epsilon)
    out = _affine(x32, mean, inverse, scale, bias, relu, dtype)
    return (out, mean, var), (x, mean, inverse, scale, bias)


def _backward(epsilon, relu, dtype, residuals, cotangents):
    # The statistics feed only the running averages, which no loss depends on: their
    # cotangents are zero and ignored.
    x, mean, inverse, scale, bias = residuals
    g = cotangents[0]
    axes = tuple(range(x.ndim - 1))
    x_hat = (x.astype(jnp.float32) - mean) * inverse
    if relu:
        # flax's ReLU mask (its input, in the output dtype, above zero), applied in the
        # output dtype as autodiff does: where the incoming gradient is expensive to
        # recompute (a fused attention backward) the compiler keeps the masked gradient
        # for both passes, and in that dtype it is half the size of float32.
        g = jnp.where((x_hat * scale + bias).astype(dtype) > 0, g, jnp.zeros((), g.dtype))
    g = g.astype(jnp.float32)
    d_bias, d_scale = _sums(g, g * x_hat, axes)
    count = x.size // x.shape[-1]
    dx = (scale * inverse / count) * (count * g - d_bias - x_hat * d_scale)
    return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


normalize_with_batch_statistics.defvjp(_forward, _backward)


class BatchNorm(nn.Module):
    """`flax.linen.BatchNorm` over the last axis (same fields, parameters, statistics and
    forward), with `relu=True` applying the ReLU that follows it, and a two-pass
    backward in training."""

    use_running_average: Optional[bool] = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    relu: bool = False

    @nn.compact
    def __call__(self, x, use_running_average: Optional[bool] = None):
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
            return _affine(x.astype(jnp.float32), running_mean.value, inverse, scale, bias,
                           self.relu, dtype)
        out, mean, var = normalize_with_batch_statistics(x, scale, bias, self.epsilon,
                                                         self.relu, dtype)
        if not self.is_initializing():
            running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
            running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
        return out
