"""A stride-1, same-size 2-D convolution as shifted multiply-adds, for kernels with few
input and output channels (IASM's 7x7 convolution of the 2-channel mean/max map to 1).

Compiled for a GPU, `lax.conv_general_dilated` on 1-2 channels is three cuDNN calls per
use (forward, input gradient, and a weight gradient that XLA sometimes lowers as a
forward convolution with the batch as the feature axis), on channel counts no
tensor-core kernel is made for. Here the output is the sum over the window's taps of
the zero-padded input, shifted by the tap, times the tap's weights: elementwise
arithmetic, which XLA fuses into one kernel together with the padding and the
conversions around it. The backward is written by hand (`jax.custom_vjp`), because
reverse-mode differentiation of the taps would give one reduction kernel per weight (98
for IASM): the input gradient is the same shifted sum over the padded output gradient,
with the kernel mirrored in space and its channel axes swapped (one elementwise kernel);
the weight gradient is every tap's product with the output gradient, stacked, summed
in one reduction (which XLA runs in two short kernels).

Arithmetic is float32 (or wider; cuDNN also accumulates half-precision convolutions in
float32); results and gradients come back in the input's and the kernel's dtypes. The
work per output pixel grows with taps x input channels x output channels, so this suits
small channel counts only: wide convolutions belong to cuDNN.

`ShiftedConv` is the Flax module. Its one parameter, `kernel` of shape
`(kh, kw, in, out)`, has `nn.Conv`'s name, shape, initializer and dtype handling, so
swapping it for `nn.Conv(features, (k, k), padding=(k - 1) // 2, use_bias=False)` keeps
a model's parameter tree, its checkpoints and any weight conversion. Only reverse-mode
differentiation is defined, as for `exact_max`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _accumulation(*arrays) -> jnp.dtype:
    """float32, or wider when an operand is."""
    return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def _padded_planes(x: jnp.ndarray, rows: int, cols: int, dtype) -> list[jnp.ndarray]:
    """x's channels as zero-padded `(batch, h + 2 rows, w + 2 cols)` planes in `dtype`.

    Channel by channel: when x is a concatenation (IASM's mean and max maps), XLA reads
    its parts, so the forward kernel need not wait for the concatenation; and a gradient
    built plane by plane reaches the parts without one."""
    return [
        jnp.pad(x[..., c].astype(dtype), ((0, 0), (rows, rows), (cols, cols)))
        for c in range(x.shape[-1])
    ]


def _shifted_sums(planes, weights, height: int, width: int) -> jnp.ndarray:
    """`out[..., o] = sum over taps (i, j) and planes c of planes[c][:, i:i+h, j:j+w] *
    weights[i, j, c, o]`, a `(batch, h, w, out)` array: elementwise, one expression per
    output channel."""
    kh, kw, _, out_channels = weights.shape
    outputs = []
    for o in range(out_channels):
        total = None
        for i in range(kh):
            for j in range(kw):
                for c, plane in enumerate(planes):
                    term = plane[:, i : i + height, j : j + width] * weights[i, j, c, o]
                    total = term if total is None else total + term
        outputs.append(total)
    return jnp.stack(outputs, axis=-1)


@jax.custom_vjp
def _shifted_conv(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    accumulate = _accumulation(x, kernel)
    rows, cols = (kernel.shape[0] - 1) // 2, (kernel.shape[1] - 1) // 2
    planes = _padded_planes(x, rows, cols, accumulate)
    out = _shifted_sums(planes, kernel.astype(accumulate), x.shape[1], x.shape[2])
    return out.astype(x.dtype)


def _shifted_conv_fwd(x, kernel):
    return _shifted_conv(x, kernel), (x, kernel)


def _shifted_conv_bwd(residuals, grad):
    x, kernel = residuals
    accumulate = _accumulation(x, kernel)
    kh, kw = kernel.shape[:2]
    rows, cols = (kh - 1) // 2, (kw - 1) // 2
    height, width = x.shape[1], x.shape[2]
    # Output pixel (h, w) read input pixel (h + i - rows, w + j - cols) through tap
    # (i, j); for odd kernels, padding the output gradient by the same amounts and
    # reading it through the mirrored tap collects every such contribution.
    mirrored = jnp.flip(kernel.astype(accumulate), (0, 1)).transpose(0, 1, 3, 2)
    grad_planes = _padded_planes(grad, rows, cols, accumulate)
    grad_x = _shifted_sums(grad_planes, mirrored, height, width)
    # The weight gradient: each tap's products of the shifted input with the output
    # gradient, `(batch, h, w, in, out)`, stacked along a new leading axis (XLA fuses the
    # stack into the reduction and never writes it) and summed over batch, height and
    # width by one reduction whose result has the kernel's layout. It reads x whole: a
    # stack built from x's planes would need a channel axis made by concatenation, which
    # XLA writes out once per tap.
    grad = grad.astype(accumulate)
    padded = jnp.pad(x.astype(accumulate), ((0, 0), (rows, rows), (cols, cols), (0, 0)))
    products = jnp.stack(
        [
            padded[:, i : i + height, j : j + width, :, None] * grad[:, :, :, None, :]
            for i in range(kh)
            for j in range(kw)
        ]
    )
    grad_kernel = jnp.sum(products, axis=(1, 2, 3)).reshape(kernel.shape)
    return grad_x.astype(x.dtype), grad_kernel.astype(kernel.dtype)


_shifted_conv.defvjp(_shifted_conv_fwd, _shifted_conv_bwd)


def shifted_conv(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """`lax.conv_general_dilated(x, kernel, (1, 1), [((kh - 1) // 2,) * 2,
    ((kw - 1) // 2,) * 2], dimension_numbers=('NHWC', 'HWIO', 'NHWC'))` for odd kernel
    sizes, computed in float32 (or wider) and returned in x's dtype."""
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f"expected x (batch, h, w, in) and kernel (kh, kw, in, out); got "
            f"{x.shape} and {kernel.shape}"
        )
    if kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
        raise ValueError(
            f"a same-size convolution needs odd kernel sizes; got "
            f"{kernel.shape[0]}x{kernel.shape[1]}"
        )
    for array in (x, kernel):
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise TypeError(f"expected floating-point arrays; got dtype {array.dtype}")
    return _shifted_conv(x, kernel)


class ShiftedConv(nn.Module):
    """`nn.Conv(features, kernel_size, padding=(k - 1) // 2, use_bias=False)` computed by
    `shifted_conv`, with the same `kernel` parameter."""

    features: int
    kernel_size: tuple[int, int]
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (*self.kernel_size, x.shape[-1], self.features),
            self.param_dtype,
        )
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return shifted_conv(x, kernel)

