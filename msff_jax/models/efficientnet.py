"""EfficientNet-B0, layer for layer torchvision's `efficientnet_b0`.

- Stem: 3x3/2 conv to 32 channels, BatchNorm, SiLU.
- Seven stages of MBConv blocks (`B0_STAGES`, torchvision's table: expand ratio,
  kernel, stride, input and output width, number of blocks): 1x1 expand (skipped when
  the ratio is 1), kxk depthwise (strided in a stage's first block), squeeze-excitation,
  1x1 projection without activation; identity added when stride is 1 and widths match,
  the residual branch first dropped per sample by stochastic depth.
- SE: average pool, 1x1 conv with bias to `max(1, block_input_channels // 4)`, SiLU,
  1x1 conv with bias back, sigmoid, times the input.
- Stochastic depth: block i of all N blocks (counted over every stage, from 0) drops its
  residual branch with probability `0.2 * i / N` in training and rescales survivors by
  `1 / (1 - p)` ("row" mode); uses the 'dropout' rng.
- Last conv 1x1 to 4x the last stage width (1280), SiLU; average pool; Dropout(0.2);
  Linear(1280, classes).
- BatchNorm: torch defaults for B0 (torchvision passes no norm_layer), epsilon 1e-5,
  momentum 0.1 (flax 0.9). Padding torch's symmetric `(k - 1) // 2`.

Parameter names (for the torchvision weight converter). A flax path maps to a
state-dict key by joining with '.' and turning every `_<digits>` into `.<digits>`:
  features_0/0/kernel              <-> features.0.0.weight          (stem conv)
  features_2_1/block_0/1/scale     <-> features.2.1.block.0.1.weight (expand BN)
  features_2_1/block_2/fc1/kernel  <-> features.2.1.block.2.fc1.weight (SE)
  features_8/0/kernel              <-> features.8.0.weight          (last conv)
  classifier_1/{kernel,bias}       <-> classifier.1.{weight,bias}
`block_<i>` numbers a block's layers as torch's `Sequential` does (no expansion layer
in stage 1, so there the depthwise conv is block_0). Conv kernels are HWIO here
(depthwise (k, k, 1, C)) and OIHW in torch; dense kernels are transposed.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Sequence

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


class MBConvStage(NamedTuple):
    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int


B0_STAGES = tuple(
    MBConvStage(*row)
    for row in (
        (1, 3, 1, 32, 16, 1),
        (6, 3, 2, 16, 24, 2),
        (6, 5, 2, 24, 40, 2),
        (6, 3, 2, 40, 80, 3),
        (6, 5, 1, 80, 112, 3),
        (6, 5, 2, 112, 192, 4),
        (6, 3, 1, 192, 320, 1),
    )
)


class SqueezeExcitation(nn.Module):
    """torchvision's SE with SiLU inside and a sigmoid gate (1x1 convs with bias)."""

    squeeze_channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = functools.partial(
            nn.Conv, kernel_size=(1, 1), dtype=self.dtype, param_dtype=self.param_dtype
        )
        scale = jnp.mean(x, axis=(1, 2), keepdims=True)
        scale = nn.silu(conv(self.squeeze_channels, name="fc1")(scale))
        scale = nn.sigmoid(conv(x.shape[-1], name="fc2")(scale))
        return scale * x


def drop_residual_rows(
    module: nn.Module, x: jnp.ndarray, rate: float, deterministic: bool
) -> jnp.ndarray:
    """Stochastic depth, torchvision's "row" mode: one keep/drop draw per sample."""
    if deterministic or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(
        module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1)
    )
    return x * mask.astype(x.dtype) / jnp.asarray(keep, x.dtype)


class MBConv(nn.Module):
    conv: ModuleDef
    norm: ModuleDef
    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    stochastic_depth_rate: float
    train: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        unit = functools.partial(ConvNormAct, self.conv, self.norm, activation=nn.silu)
        expanded = make_divisible(self.input_channels * self.expand_ratio, 8)
        index = 0
        y = x
        if expanded != self.input_channels:
            y = unit(expanded, 1, name=f"block_{index}")(y)
            index += 1
        y = unit(expanded, self.kernel, self.stride, groups=expanded, name=f"block_{index}")(y)
        index += 1
        y = SqueezeExcitation(
            max(1, self.input_channels // 4),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=f"block_{index}",
        )(y)
        index += 1
        y = ConvNormAct(
            self.conv, self.norm, self.out_channels, 1, activation=None, name=f"block_{index}"
        )(y)
        if self.stride == 1 and self.input_channels == self.out_channels:
            y = drop_residual_rows(self, y, self.stochastic_depth_rate, not self.train) + x
        return y


class EfficientNet(nn.Module):
    """EfficientNet; the defaults are torchvision's B0."""

    num_classes: int
    stages: Sequence[MBConvStage] = B0_STAGES
    stochastic_depth_rate: float = 0.2
    dropout_rate: float = 0.2
    last_channel: Optional[int] = None  # None: 4x the last stage's width
    norm_momentum: float = 0.9
    norm_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        stages = [MBConvStage(*row) for row in self.stages]
        x = prepare_images(images, self.dtype)
        conv, norm = conv_and_norm(
            train=train,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            norm_momentum=self.norm_momentum,
            norm_epsilon=self.norm_epsilon,
        )
        x = ConvNormAct(
            conv, norm, stages[0].input_channels, 3, 2, activation=nn.silu, name="features_0"
        )(x)

        total_blocks = sum(stage.num_layers for stage in stages)
        block_id = 0
        for stage_index, stage in enumerate(stages, start=1):
            for layer in range(stage.num_layers):
                x = MBConv(
                    conv,
                    norm,
                    expand_ratio=stage.expand_ratio,
                    kernel=stage.kernel,
                    stride=stage.stride if layer == 0 else 1,
                    input_channels=stage.input_channels if layer == 0 else stage.out_channels,
                    out_channels=stage.out_channels,
                    stochastic_depth_rate=self.stochastic_depth_rate * block_id / total_blocks,
                    train=train,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"features_{stage_index}_{layer}",
                )(x)
                block_id += 1

        last_channel = self.last_channel or 4 * stages[-1].out_channels
        x = ConvNormAct(
            conv, norm, last_channel, 1, activation=nn.silu,
            name=f"features_{len(stages) + 1}",
        )(x)
        self.sow("intermediates", "features", x)
        x = global_average_pool(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(
            self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
            name="classifier_1",
        )(x)
        return jnp.asarray(x, jnp.float32)

