"""MobileNetV3-Large, layer for layer torchvision's `mobilenet_v3_large`.

- Stem: 3x3/2 conv to 16 channels, BatchNorm, hard-swish.
- Fifteen inverted residual blocks (`LARGE_SETTINGS`, torchvision's table): 1x1 expand
  (skipped when the expanded width equals the input width), kxk depthwise (strided),
  squeeze-excitation where marked, 1x1 projection without activation; identity added
  when stride is 1 and widths match. Activation ReLU ('RE') or hard-swish ('HS').
- SE: average pool, 1x1 conv with bias to `make_divisible(expanded // 4, 8)`, ReLU,
  1x1 conv with bias back, hard-sigmoid (`relu6(x + 3) / 6`), times the input.
- Last conv 1x1 to 6x the last block width (960), hard-swish; average pool;
  classifier Linear(960, 1280), hard-swish, Dropout(0.2), Linear(1280, classes).
- BatchNorm epsilon 0.001, torch momentum 0.01 (flax momentum 0.99).
- Padding is torch's symmetric `(k - 1) // 2`. Initialisation is flax's default.

Parameter names (for the torchvision weight converter). A flax path maps to a
state-dict key by joining with '.' and turning every `_<digits>` into `.<digits>`:
  features_0/0/kernel            <-> features.0.0.weight      (stem conv)
  features_0/1/{scale,bias}      <-> features.0.1.{weight,bias}
  features_4/block_1/0/kernel    <-> features.4.block.1.0.weight (depthwise)
  features_4/block_2/fc1/kernel  <-> features.4.block.2.fc1.weight (SE)
  features_16/0/kernel           <-> features.16.0.weight     (last conv)
  classifier_0, classifier_3     <-> classifier.0, classifier.3
`block_<i>` numbers the layers of a block as torch's `Sequential` does, so the index
of depthwise, SE and projection shifts by one in blocks without an expansion layer.
Conv kernels are HWIO here (depthwise: (k, k, 1, C)) and OIHW in torch; dense kernels
are (in, out) here and (out, in) in torch; SE convs are 1x1 `nn.Conv`s with bias.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from msff_jax.models.layers import (
    ConvNormAct,
    ModuleDef,
    conv_and_norm,
    global_average_pool,
    make_divisible,
    prepare_images,
)


class InvertedResidualSetting(NamedTuple):
    input_channels: int
    kernel: int
    expanded_channels: int
    out_channels: int
    use_se: bool
    activation: str  # 'RE' (ReLU) or 'HS' (hard-swish)
    stride: int


LARGE_SETTINGS = tuple(
    InvertedResidualSetting(*row)
    for row in (
        (16, 3, 16, 16, False, "RE", 1),
        (16, 3, 64, 24, False, "RE", 2),
        (24, 3, 72, 24, False, "RE", 1),
        (24, 5, 72, 40, True, "RE", 2),
        (40, 5, 120, 40, True, "RE", 1),
        (40, 5, 120, 40, True, "RE", 1),
        (40, 3, 240, 80, False, "HS", 2),
        (80, 3, 200, 80, False, "HS", 1),
        (80, 3, 184, 80, False, "HS", 1),
        (80, 3, 184, 80, False, "HS", 1),
        (80, 3, 480, 112, True, "HS", 1),
        (112, 3, 672, 112, True, "HS", 1),
        (112, 5, 672, 160, True, "HS", 2),
        (160, 5, 960, 160, True, "HS", 1),
        (160, 5, 960, 160, True, "HS", 1),
    )
)

ACTIVATIONS = {"RE": nn.relu, "HS": jax.nn.hard_swish}


class SqueezeExcitation(nn.Module):
    """torchvision's SE with hard-sigmoid gate (1x1 convs with bias)."""

    squeeze_channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = functools.partial(
            nn.Conv, kernel_size=(1, 1), dtype=self.dtype, param_dtype=self.param_dtype
        )
        scale = jnp.mean(x, axis=(1, 2), keepdims=True)
        scale = nn.relu(conv(self.squeeze_channels, name="fc1")(scale))
        scale = jax.nn.hard_sigmoid(conv(x.shape[-1], name="fc2")(scale))
        return scale * x


class InvertedResidual(nn.Module):
    conv: ModuleDef
    norm: ModuleDef
    setting: InvertedResidualSetting
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        s = self.setting
        if x.shape[-1] != s.input_channels:
            raise ValueError(
                f"block expects {s.input_channels} input channels, got {x.shape[-1]}"
            )
        activation = ACTIVATIONS[s.activation]
        unit = functools.partial(ConvNormAct, self.conv, self.norm)
        index = 0
        y = x
        if s.expanded_channels != s.input_channels:
            y = unit(s.expanded_channels, 1, activation=activation, name=f"block_{index}")(y)
            index += 1
        y = unit(
            s.expanded_channels,
            s.kernel,
            s.stride,
            groups=s.expanded_channels,
            activation=activation,
            name=f"block_{index}",
        )(y)
        index += 1
        if s.use_se:
            y = SqueezeExcitation(
                make_divisible(s.expanded_channels // 4, 8),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"block_{index}",
            )(y)
            index += 1
        y = unit(s.out_channels, 1, activation=None, name=f"block_{index}")(y)
        if s.stride == 1 and s.input_channels == s.out_channels:
            y = y + x
        return y


class MobileNetV3(nn.Module):
    """MobileNetV3; the defaults are torchvision's Large variant."""

    num_classes: int
    block_settings: Sequence[InvertedResidualSetting] = LARGE_SETTINGS
    last_channel: int = 1280
    dropout_rate: float = 0.2
    norm_momentum: float = 0.99  # torch momentum 0.01
    norm_epsilon: float = 1e-3
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        settings = [InvertedResidualSetting(*row) for row in self.block_settings]
        x = prepare_images(images, self.dtype)
        conv, norm = conv_and_norm(
            train=train,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            norm_momentum=self.norm_momentum,
            norm_epsilon=self.norm_epsilon,
        )
        x = ConvNormAct(
            conv, norm, settings[0].input_channels, 3, 2,
            activation=jax.nn.hard_swish, name="features_0",
        )(x)
        for i, setting in enumerate(settings, start=1):
            x = InvertedResidual(
                conv, norm, setting, self.dtype, self.param_dtype, name=f"features_{i}"
            )(x)
        x = ConvNormAct(
            conv, norm, 6 * settings[-1].out_channels, 1,
            activation=jax.nn.hard_swish, name=f"features_{len(settings) + 1}",
        )(x)
        self.sow("intermediates", "features", x)
        x = global_average_pool(x)
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        x = jax.nn.hard_swish(dense(self.last_channel, name="classifier_0")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = dense(self.num_classes, name="classifier_3")(x)
        return jnp.asarray(x, jnp.float32)

