"""Building blocks shared by every model family.

Convolution and BatchNorm are handed to blocks as `functools.partial`s made once per
forward pass (`conv_and_norm`), so dtype, BatchNorm momentum and epsilon are decided in
one place per model, as in flax's ImageNet example.

Padding follows torchvision, symmetric `(k - 1) // 2` on every side, not TensorFlow's
'SAME' (which pads asymmetrically when striding an even-sized input); with it a strided
layer sees exactly the pixels its torchvision counterpart sees, which the weight
converter relies on.

`ConvNormAct` mirrors torchvision's `Conv2dNormActivation`, a `Sequential(conv, norm,
act)`; its children are named `'0'` (conv) and `'1'` (norm) so the parameter path
matches the state-dict key (`features.0.0.weight` <-> `features_0/0/kernel`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from msff_jax.models import batch_norm

ModuleDef = Any
Activation = Callable[[jnp.ndarray], jnp.ndarray]


def torch_padding(kernel_size: int, dilation: int = 1) -> Tuple[Tuple[int, int], ...]:
    """Symmetric padding of torchvision's conv layers: `(k - 1) // 2 * dilation`."""
    pad = (kernel_size - 1) // 2 * dilation
    return ((pad, pad), (pad, pad))


def conv_and_norm(
    *,
    train: bool,
    dtype: Any,
    param_dtype: Any,
    norm_momentum: float,
    norm_epsilon: float,
    batch_norm_backward: str = "two_pass",
) -> Tuple[ModuleDef, ModuleDef]:
    """Returns (conv, norm) partials for one forward pass.

    `norm_momentum` is flax's convention (weight of the old running average), i.e.
    `1 - torch_momentum`: torch's default 0.1 is flax's 0.9.
    BatchNorm has no `axis_name`: under `jax.jit` with the batch sharded over a mesh,
    its mean and variance are already computed over the global batch. It is
    `batch_norm.BatchNorm` (flax's, with a two-pass backward; `batch_norm_backward=
    'autodiff'` gives flax's own, for measuring the difference); `norm(relu=True)`
    applies the ReLU that follows it inside the same backward.
    """
    batch_norm.check_backward(batch_norm_backward)
    conv = functools.partial(
        nn.Conv, use_bias=False, dtype=dtype, param_dtype=param_dtype
    )
    norm = functools.partial(
        batch_norm.BACKWARDS[batch_norm_backward],
        use_running_average=not train,
        momentum=norm_momentum,
        epsilon=norm_epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
    )
    return conv, norm


class ConvNormAct(nn.Module):
    """Convolution without bias, BatchNorm, then an optional activation.

    Children `'0'` (conv) and `'1'` (norm), as in torchvision's Conv2dNormActivation.
    """

    conv: ModuleDef
    norm: ModuleDef
    features: int
    kernel_size: int = 3
    strides: int = 1
    groups: int = 1
    activation: Optional[Activation] = nn.relu

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        k = self.kernel_size
        x = self.conv(
            self.features,
            (k, k),
            strides=(self.strides, self.strides),
            padding=torch_padding(k),
            feature_group_count=self.groups,
            name="0",
        )(x)
        if self.activation is nn.relu:  # Folded into BatchNorm's backward.
            return self.norm(name="1", relu=True)(x)
        x = self.norm(name="1")(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def global_average_pool(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.mean(x, axis=(1, 2))


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """torchvision's `_make_divisible`: a multiple of `divisor`, at most 10% below `value`."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def check_images(images: jnp.ndarray) -> None:
    """Refuses anything but a batch of RGB images in NHWC layout."""
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(
            "images must have shape (batch, height, width, 3) (NHWC, RGB); "
            f"got shape {shape}"
        )


def prepare_images(images: jnp.ndarray, dtype: Any) -> jnp.ndarray:
    """Checks the input contract and casts to the computation dtype."""
    check_images(images)
    return jnp.asarray(images, dtype)
