"""MSFF-EComNet and its ablations (paper Table 2), NHWC.

Layout (PAPER.md section 2):
  stem: three 3x3 conv units (conv without bias, BatchNorm, ReLU) of widths
        `stem_widths`, the first with stride 2, then a 3x3/2 max-pool;
  four stages of MSFF blocks, `stage_sizes` blocks of widths `stage_widths`; the
        first block of stages 2-4 strides by 2;
  global average pooling, dropout, dense classifier.

An MSFF block is a mixer (`MultiScaleParallelConv`, or a single 3x3 conv unit in the
ablations without it) followed by IASM (`ResidualAttention`) when enabled. The block
carries no outer skip connection: the paper's only residual is the one inside IASM
(Eq. 2, `F_ms + M_s(M_c(F_ms)) * F_ms`, taken around the attention, after MSP-Conv),
and an outer one would need a projection wherever width or stride changes, which the
paper never mentions. Every conv is batch-normalised, so the plain chain of eight
blocks trains like a VGG/Inception-style network.

MultiScaleParallelConv: four branches of `features // 4` channels each,
  `branch_1x1`: 1x1;  `branch_3x3`: 1x1 then 3x3;  `branch_5x5`: 1x1 then two 3x3
  (a 5x5 receptive field, Inception factorisation);  `branch_pool`: 3x3 max-pool then
  1x1; concatenated on channels. A strided block strides every branch at its first
  spatial operation (the 1x1 of `branch_1x1`, the first 3x3 of the 3x3 branches, the
  max-pool), so all four outputs share one resolution.

Widths and depths. The paper gives only the total, 11.79 M parameters at 15 classes.
We keep ResNet-18's proportions (stem to 64 channels, two blocks per stage, the width
doubling each stage) and solve for the one free number, the first stage's width:
stage widths (164, 328, 656, 1312) give 11,784,491 parameters (-0.05%; checked by
tests/test_models.py). Widths must be multiples of 4 (four equal branches); the
neighbours 160 and 168 give 11.22 M (-4.8%) and 12.36 M (+4.9%). Depth stays at
ResNet-18's eight blocks because MSFF blocks have no identity skip (above) and a deeper
plain chain trains worse.

Ablation presets only flip the switches `use_msp` and `use_iasm`, so their parameter
trees differ from the full model's only in the dropped subtrees (`msp_conv` replaced by `conv_unit`,
`iasm` removed):
  msff_base    = conv unit,  no IASM
  msff_msp     = MSP-Conv,   no IASM
  msff_iasm    = conv unit,  IASM
  msff_ecomnet = MSP-Conv,   IASM (the full model)
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from msff_jax.models.attention import CHANNEL_ATTENTIONS, ResidualAttention
from msff_jax.models.layers import (
    ConvNormAct,
    ModuleDef,
    conv_and_norm,
    global_average_pool,
    prepare_images,
)
from msff_jax.models.max_pool import check_backward, max_pool_3x3


class ConvKernel(nn.Module):
    """The parameter of a bias-free `nn.Conv` (name, shape, initializer, dtype), without
    the convolution."""

    features: int
    kernel_size: int
    kernel_init: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, in_features: int) -> jnp.ndarray:
        shape = (self.kernel_size, self.kernel_size, in_features, self.features)
        return self.param("kernel", self.kernel_init, shape, self.param_dtype)


class PointwiseUnit(nn.Module):
    """A 1x1 `ConvNormAct` whose convolution its parent runs together with its siblings'.

    Same children as `ConvNormAct` (`'0'` the kernel, `'1'` the BatchNorm), so the
    parameter tree is the same whether the parent fuses or not. Children named `'0'`
    and `'1'` need a compact method (`setup` names children after attributes), and the
    parent needs every unit's kernel before any unit's output exists, hence two calls:
    `unit(in_features=C)` returns the kernel; `unit(conv_output)` normalises and
    activates that unit's part of the joint convolution.
    """

    norm: ModuleDef
    features: int
    kernel_init: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x=None, *, in_features: int | None = None) -> jnp.ndarray:
        if (x is None) == (in_features is None):
            raise TypeError("PointwiseUnit takes either in_features= (to return its kernel) "
                            "or the convolution's output, not both or neither")
        if in_features is not None:
            return ConvKernel(
                self.features, 1, self.kernel_init, self.param_dtype, name="0"
            )(in_features)
        return nn.relu(self.norm(name="1")(x))


class MultiScaleParallelConv(nn.Module):
    """MSP-Conv: 1x1, 3x3, double-3x3 and pool branches, concatenated.

    `fuse_pointwise` runs the 1x1 convolutions that read the block input (the two
    reductions, and `branch_1x1` when it does not stride) as one convolution of
    2-3x the width, then splits its output: one read of the input instead of three and
    wider GEMMs, with the same parameters and the same function.
    """

    conv: ModuleDef
    norm: ModuleDef
    features: int
    strides: int = 1
    max_pool_backward: str = "gather"
    fuse_pointwise: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.features % 4:
            raise ValueError(
                f"MultiScaleParallelConv needs features divisible by 4 (one quarter per "
                f"branch); got {self.features}"
            )
        width = self.features // 4
        unit = functools.partial(ConvNormAct, self.conv, self.norm, width)
        s = self.strides

        if self.fuse_pointwise:
            names = ("branch_1x1",) if s == 1 else ()
            names += ("branch_3x3_reduce", "branch_5x5_reduce")
            reduced = dict(zip(names, self._pointwise_together(x, names, width)))
            fine = reduced["branch_1x1"] if s == 1 else unit(1, s, name="branch_1x1")(x)
            local, wide = reduced["branch_3x3_reduce"], reduced["branch_5x5_reduce"]
        else:
            fine = unit(1, s, name="branch_1x1")(x)
            local = unit(1, name="branch_3x3_reduce")(x)
            wide = unit(1, name="branch_5x5_reduce")(x)

        local = unit(3, s, name="branch_3x3")(local)
        wide = unit(3, s, name="branch_5x5_a")(wide)
        wide = unit(3, name="branch_5x5_b")(wide)

        pooled = max_pool_3x3(x, s, self.max_pool_backward)
        pooled = unit(1, name="branch_pool")(pooled)

        return jnp.concatenate([fine, local, wide, pooled], axis=-1)

    def _pointwise_together(self, x, names, width) -> list[jnp.ndarray]:
        """The 1x1 units `names` on `x` as one convolution, split back per unit.

        Kernel initializer, parameter and computation dtypes and precision are those of
        the `conv` every other unit uses (read from an unbound instance of it), so the
        fused and separate convolutions cannot drift apart.
        """
        conv = self.conv(width, (1, 1), parent=None)
        if conv.use_bias or conv.feature_group_count != 1:
            raise ValueError("fuse_pointwise needs bias-free, ungrouped convolutions")
        units = [
            PointwiseUnit(self.norm, width, conv.kernel_init, conv.param_dtype, name=n)
            for n in names
        ]
        kernel = jnp.concatenate([u(in_features=x.shape[-1]) for u in units], axis=-1)
        x, kernel = conv.promote_dtype(x, kernel, dtype=conv.dtype)
        y = lax.conv_general_dilated(
            x,
            kernel,
            (1, 1),
            "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=conv.precision,
        )
        return [u(part) for u, part in zip(units, jnp.split(y, len(units), axis=-1))]


class MSFFBlock(nn.Module):
    """Mixer (MSP-Conv or one 3x3 conv unit), then IASM when enabled."""

    conv: ModuleDef
    norm: ModuleDef
    features: int
    strides: int
    use_msp: bool
    use_iasm: bool
    channel_attention: str
    attention_reduction: int
    spatial_kernel_size: int
    max_pool_backward: str
    fuse_pointwise: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.use_msp:
            x = MultiScaleParallelConv(
                self.conv,
                self.norm,
                self.features,
                self.strides,
                max_pool_backward=self.max_pool_backward,
                fuse_pointwise=self.fuse_pointwise,
                name="msp_conv",
            )(x)
        else:
            x = ConvNormAct(
                self.conv, self.norm, self.features, 3, self.strides, name="conv_unit"
            )(x)
        if self.use_iasm:
            x = ResidualAttention(
                channel_attention=self.channel_attention,
                reduction=self.attention_reduction,
                spatial_kernel_size=self.spatial_kernel_size,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="iasm",
            )(x)
        return x


class MSFFEComNet(nn.Module):
    """The MSFF-EComNet backbone with switches for the Table 2 ablations."""

    num_classes: int
    stem_widths: Sequence[int] = (32, 32, 64)
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    stage_widths: Sequence[int] = (164, 328, 656, 1312)
    use_msp: bool = True
    use_iasm: bool = True
    channel_attention: str = "cbam"
    attention_reduction: int = 16
    spatial_kernel_size: int = 7
    dropout_rate: float = 0.2
    norm_momentum: float = 0.9  # torch BatchNorm2d default momentum 0.1
    norm_epsilon: float = 1e-5
    # Implementation choices that change speed, not the function or the parameters
    # (checked by tests/test_speed_options.py): how max-pools are differentiated
    # (`msff_jax.models.max_pool`; 'gather' is deterministic, and on the CPU trained
    # this model 16-23% faster than XLA's select-and-scatter, BENCHMARKS.md) and
    # whether MSP-Conv runs its 1x1 convolutions on the block input as one (no gain
    # measured on the CPU; off until a GPU run says otherwise).
    max_pool_backward: str = "gather"
    fuse_pointwise: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        check_backward(self.max_pool_backward)
        if self.use_iasm and self.channel_attention not in CHANNEL_ATTENTIONS:
            raise ValueError(
                f"channel_attention must be one of {CHANNEL_ATTENTIONS}; "
                f"got {self.channel_attention!r}"
            )
        if len(self.stage_sizes) != len(self.stage_widths):
            raise ValueError(
                f"stage_sizes {tuple(self.stage_sizes)} and stage_widths "
                f"{tuple(self.stage_widths)} must have the same length"
            )
        x = prepare_images(images, self.dtype)
        conv, norm = conv_and_norm(
            train=train,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            norm_momentum=self.norm_momentum,
            norm_epsilon=self.norm_epsilon,
        )

        for i, width in enumerate(self.stem_widths):
            x = ConvNormAct(conv, norm, width, 3, 2 if i == 0 else 1, name=f"stem_{i}")(x)
        x = max_pool_3x3(x, 2, self.max_pool_backward)

        for stage, (size, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
            for block in range(size):
                x = MSFFBlock(
                    conv,
                    norm,
                    width,
                    strides=2 if stage > 0 and block == 0 else 1,
                    use_msp=self.use_msp,
                    use_iasm=self.use_iasm,
                    channel_attention=self.channel_attention,
                    attention_reduction=self.attention_reduction,
                    spatial_kernel_size=self.spatial_kernel_size,
                    max_pool_backward=self.max_pool_backward,
                    fuse_pointwise=self.fuse_pointwise,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"stage{stage + 1}_block{block}",
                )(x)

        self.sow("intermediates", "features", x)
        x = global_average_pool(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(
            self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head"
        )(x)
        return jnp.asarray(x, jnp.float32)


MSFFBase = functools.partial(MSFFEComNet, use_msp=False, use_iasm=False)
MSFFMultiScale = functools.partial(MSFFEComNet, use_msp=True, use_iasm=False)
MSFFAttention = functools.partial(MSFFEComNet, use_msp=False, use_iasm=True)
MSFFFull = functools.partial(MSFFEComNet, use_msp=True, use_iasm=True)
