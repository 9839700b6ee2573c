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

Channel alignment (`channel_alignment`, default 1 = off). The branch widths
`features // 4` of the stage widths above are 41, 82, 164 and 328 channels, three of
them not multiples of 8, which can keep cuDNN's bfloat16 convolutions off tensor-core
kernels. With an alignment `a > 1` each block computes on channel counts padded up to
multiples of `a`, inside the forward and with the true parameters: kernels get zero
input rows and output columns (`jnp.pad` at call time), BatchNorm and the ReLU run on
the true channels (a slice of the convolution's output; running statistics keep their
shapes), their output is padded with zeros again, IASM is told the true channel count
(means over true channels, padding masked out of every max) and the block returns its
true channels. So the parameter tree, the function and the gradients are those of
alignment 1 (up to float summation order; tests/test_aligned_channels.py) and a
checkpoint loads under any setting. The costs: the block input is padded (a copy with
the padded channel count, which the pool branch's max-pool also reads), the padded
channels are computed and carried through MSP-Conv and IASM, the concatenation drops
each branch's padding and appends the block's, and the block output is a slice of
IASM's (an elementwise copy XLA can fuse into IASM's last pass, or into the
concatenation when IASM is off). The stem is left alone (its widths, 32/32/64, are
multiples of 8). Whether any of this is faster is for a GPU to measure.

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
    torch_padding,
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


def round_up(count: int, multiple: int) -> int:
    """The least multiple of `multiple` that is at least `count`."""
    return -(-count // multiple) * multiple


def _pad_channels(x: jnp.ndarray, channels: int) -> jnp.ndarray:
    """`x` with zeros appended on its last axis up to `channels` (a no-op if there)."""
    extra = channels - x.shape[-1]
    if extra < 0:
        raise ValueError(f"cannot pad {x.shape[-1]} channels down to {channels}")
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)]) if extra else x


def _true_channels(x: jnp.ndarray, channels: int) -> jnp.ndarray:
    """The first `channels` channels of `x` (a no-op if that is all of them)."""
    return x[..., :channels] if x.shape[-1] != channels else x


def _pad_kernel(kernel: jnp.ndarray, in_channels: int, out_channels: int) -> jnp.ndarray:
    """An HWIO kernel with zero input rows and output columns up to the given counts."""
    _, _, ci, co = kernel.shape
    if (ci, co) == (in_channels, out_channels):
        return kernel
    return jnp.pad(kernel, ((0, 0), (0, 0), (0, in_channels - ci), (0, out_channels - co)))


def _unbound_conv(conv: ModuleDef, features: int, kernel_size: int) -> nn.Conv:
    """An unbound instance of the `conv` partial, to read its settings from, refusing the
    settings the hand-run convolutions below do not reproduce."""
    instance = conv(features, (kernel_size, kernel_size), parent=None)
    if (
        instance.use_bias
        or instance.feature_group_count != 1
        or instance.mask is not None
        or instance.input_dilation not in (None, 1)
        or instance.kernel_dilation not in (None, 1)
    ):
        raise ValueError(
            "fuse_pointwise and channel_alignment need bias-free, ungrouped, "
            "undilated, unmasked convolutions"
        )
    return instance


def _run_conv(conv: nn.Conv, x: jnp.ndarray, kernel: jnp.ndarray, strides: int,
              kernel_size: int) -> jnp.ndarray:
    """What `nn.Conv` computes for an NHWC input, torchvision padding and `kernel`."""
    x, kernel = conv.promote_dtype(x, kernel, dtype=conv.dtype)
    return lax.conv_general_dilated(
        x,
        kernel,
        (strides, strides),
        torch_padding(kernel_size),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=conv.precision,
    )


class AlignedConvNormAct(nn.Module):
    """`ConvNormAct` (conv without bias, BatchNorm, ReLU; children `'0'` and `'1'` with
    the same parameters and statistics) computed on channel-padded tensors.

    Takes `x` whose first `in_features` channels are real and the rest zero; returns
    `round_up(features, alignment)` channels, the first `features` real and the rest
    exactly zero. The kernel is zero-padded at call time; BatchNorm and the ReLU run on
    the true channels only, so statistics and their updates are those of
    `ConvNormAct`.
    """

    conv: ModuleDef
    norm: ModuleDef
    features: int
    kernel_size: int = 3
    strides: int = 1
    alignment: int = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, in_features: int) -> jnp.ndarray:
        k = self.kernel_size
        conv = _unbound_conv(self.conv, self.features, k)
        kernel = ConvKernel(self.features, k, conv.kernel_init, conv.param_dtype, name="0")(
            in_features
        )
        kernel = _pad_kernel(kernel, x.shape[-1], round_up(self.features, self.alignment))
        y = _run_conv(conv, x, kernel, self.strides, k)
        y = self.norm(name="1", relu=True)(_true_channels(y, self.features))
        return _pad_channels(y, round_up(self.features, self.alignment))


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
        return self.norm(name="1", relu=True)(x)


class MultiScaleParallelConv(nn.Module):
    """MSP-Conv: 1x1, 3x3, double-3x3 and pool branches, concatenated.

    `fuse_pointwise` runs the 1x1 convolutions that read the block input (the two
    reductions, and `branch_1x1` when it does not stride) as one convolution of
    2-3x the width, then splits its output: one read of the input instead of three and
    wider GEMMs, with the same parameters and the same function.

    `channel_alignment` > 1 (module docstring): the input (true channels) is zero-padded
    to a multiple of it, every branch computes on `round_up(features // 4, alignment)`
    channels (`AlignedConvNormAct`), and the output holds the `features` true channels
    followed by zeros up to `round_up(features, alignment)`.
    """

    conv: ModuleDef
    norm: ModuleDef
    features: int
    strides: int = 1
    max_pool_backward: str = "gather"
    fuse_pointwise: bool = False
    channel_alignment: int = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.features % 4:
            raise ValueError(
                f"MultiScaleParallelConv needs features divisible by 4 (one quarter per "
                f"branch); got {self.features}"
            )
        width = self.features // 4
        s = self.strides
        align = self.channel_alignment
        in_features = x.shape[-1]

        if align == 1:
            unit = functools.partial(ConvNormAct, self.conv, self.norm, width)
        else:
            x = _pad_channels(x, round_up(in_features, align))

            def unit(kernel_size, strides=1, *, name):
                aligned = AlignedConvNormAct(
                    self.conv, self.norm, width, kernel_size, strides, align, name=name
                )
                # 1x1 units read the block input, the others a branch's padded output.
                real = in_features if kernel_size == 1 else width
                return functools.partial(aligned, in_features=real)

        if self.fuse_pointwise:
            names = ("branch_1x1",) if s == 1 else ()
            names += ("branch_3x3_reduce", "branch_5x5_reduce")
            reduced = self._pointwise_together(x, names, width, in_features)
            reduced = dict(zip(names, reduced))
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

        branches = [fine, local, wide, pooled]
        if align == 1:
            return jnp.concatenate(branches, axis=-1)
        # True channels first, then the padding: the layout IASM and the block expect.
        joined = jnp.concatenate([_true_channels(b, width) for b in branches], axis=-1)
        return _pad_channels(joined, round_up(self.features, align))

    def _pointwise_together(self, x, names, width, in_features) -> list[jnp.ndarray]:
        """The 1x1 units `names` on `x` as one convolution, split back per unit.

        Kernel initializer, parameter and computation dtypes and precision are those of
        the `conv` every other unit uses (read from an unbound instance of it), so the
        fused and separate convolutions cannot drift apart. With channel alignment each
        unit's kernel is padded (`AlignedConvNormAct`'s layout) before they are joined.
        """
        conv = _unbound_conv(self.conv, width, 1)
        units = [
            PointwiseUnit(self.norm, width, conv.kernel_init, conv.param_dtype, name=n)
            for n in names
        ]
        padded_width = round_up(width, self.channel_alignment)
        kernel = jnp.concatenate(
            [
                _pad_kernel(u(in_features=in_features), x.shape[-1], padded_width)
                for u in units
            ],
            axis=-1,
        )
        y = _run_conv(conv, x, kernel, 1, 1)
        return [
            _pad_channels(u(_true_channels(part, width)), padded_width)
            for u, part in zip(units, jnp.split(y, len(units), axis=-1))
        ]


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
    iasm_spatial: str
    max_pool_backward: str
    fuse_pointwise: bool
    dtype: Any
    param_dtype: Any
    channel_alignment: int = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        align = self.channel_alignment
        if self.use_msp:
            x = MultiScaleParallelConv(
                self.conv,
                self.norm,
                self.features,
                self.strides,
                max_pool_backward=self.max_pool_backward,
                fuse_pointwise=self.fuse_pointwise,
                channel_alignment=align,
                name="msp_conv",
            )(x)
        elif align == 1:
            x = ConvNormAct(
                self.conv, self.norm, self.features, 3, self.strides, name="conv_unit"
            )(x)
        else:
            in_features = x.shape[-1]
            x = AlignedConvNormAct(
                self.conv, self.norm, self.features, 3, self.strides, align, name="conv_unit"
            )(_pad_channels(x, round_up(in_features, align)), in_features=in_features)
        if self.use_iasm:
            x = ResidualAttention(
                channel_attention=self.channel_attention,
                reduction=self.attention_reduction,
                spatial_kernel_size=self.spatial_kernel_size,
                spatial_conv_form=self.iasm_spatial,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                true_channels=self.features if align > 1 else None,
                name="iasm",
            )(x)
        return _true_channels(x, self.features)


class MSFFNet(nn.Module):
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
    # (tests/test_speed_options.py; measurements in BENCHMARKS.md): how max-pools are
    # differentiated (`msff_jax.models.max_pool`) and whether MSP-Conv runs its 1x1
    # convolutions on the block input as one.
    max_pool_backward: str = "gather"
    # BatchNorm's backward: "two_pass" (batch_norm.BatchNorm) or "autodiff" (flax's own),
    # the same function; an option so a GPU can measure the difference.
    batch_norm_backward: str = "two_pass"
    # IASM's 7x7 spatial convolution: "shifted" (multiply-adds XLA fuses) or "cudnn".
    iasm_spatial: str = "shifted"
    fuse_pointwise: bool = False
    # Computes MSP-Conv and IASM on channel counts padded to multiples of this (1: no
    # padding), for accelerators whose fast low-precision convolutions want aligned
    # channel counts; same parameters and function (module docstring; checked by
    # tests/test_aligned_channels.py).
    channel_alignment: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        check_backward(self.max_pool_backward)
        if (
            not isinstance(self.channel_alignment, int)
            or isinstance(self.channel_alignment, bool)
            or self.channel_alignment < 1
        ):
            raise ValueError(
                f"channel_alignment must be a positive int; got {self.channel_alignment!r}"
            )
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
            batch_norm_backward=self.batch_norm_backward,
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
                    iasm_spatial=self.iasm_spatial,
                    max_pool_backward=self.max_pool_backward,
                    fuse_pointwise=self.fuse_pointwise,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    channel_alignment=self.channel_alignment,
                    name=f"stage{stage + 1}_block{block}",
                )(x)

        self.sow("intermediates", "features", x)
        x = global_average_pool(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(
            self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head"
        )(x)
        return jnp.asarray(x, jnp.float32)


# One preset per registry name (msff_base, msff_msp, msff_iasm, msff_ecomnet).
MSFFBase = functools.partial(MSFFNet, use_msp=False, use_iasm=False)
MSFFMsp = functools.partial(MSFFNet, use_msp=True, use_iasm=False)
MSFFIasm = functools.partial(MSFFNet, use_msp=False, use_iasm=True)
MSFFEComNet = functools.partial(MSFFNet, use_msp=True, use_iasm=True)
