"""IASM, the paper's residual channel-then-spatial attention (Eq. 2), and its parts.

Reading (PAPER.md section 2): `F1 = M_c(F) * F`, `F2 = M_s(F1) * F1`,
`out = F + F2`. The residual keeps the un-attended multi-scale features, so attention
can only add emphasis, never erase what MSP-Conv found.

- `ChannelAttentionMLP` (CBAM, default): average- and max-pooled channel descriptors
  through one shared two-layer MLP (reduction 16), summed, sigmoid.
- `EfficientChannelAttention` (ECA, option): a 1-D convolution across the channel axis
  of the average-pooled descriptor, no reduction; kernel size from the channel count as
  in the ECA paper (`|log2(C) / 2 + 1 / 2|`, rounded up to odd).
- `SpatialAttention`: channel-wise mean and max maps, concatenated, 7x7 convolution,
  sigmoid; a `(batch, h, w, 1)` map.

Mean and max descriptors come from `exact_max.mean_and_max`: one pass for both, and a
max gradient that is exact in bfloat16 (jnp.max's miscounts tied maxima there, e.g. an
all-zero channel after a ReLU). The spatial maps' pass is a single reduction kernel on a
GPU, which also counts the ties, so their backward is elementwise.

The spatial attention's 7x7 convolution maps 2 channels to 1. As an `nn.Conv` it would
be three cuDNN calls per block and step, on channel counts no fast kernel is made for;
it is a `ShiftedConv` (`models/shifted_conv.py`) instead: the same `conv/kernel`
parameter, initializer and function (so checkpoints and the PyTorch twin's weights
carry over), computed as 49 shifted multiply-adds per channel that XLA fuses into one
elementwise kernel, with a hand-written backward (one elementwise kernel for the input
gradient, one reduction for the weight gradient).

`true_channels` (every module here; None means all): the input's last axis holds
`true_channels` real channels followed by zero padding (`MSFFNet.channel_alignment`).
Parameters are those of the real channels, descriptors are taken over them only (the
padding never wins a max, and means divide by the real count), and the padding stays
zero: channel weights for it are 0, and the residual adds zeros to zeros.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from msff_jax.models.exact_max import mean_and_max
from msff_jax.models.shifted_conv import ShiftedConv

CHANNEL_ATTENTIONS = ("cbam", "eca")
SPATIAL_CONV_FORMS = ("shifted", "cudnn")


def _real_channels(x: jnp.ndarray, true_channels: int | None) -> int:
    channels = x.shape[-1]
    if true_channels is None:
        return channels
    if not 1 <= true_channels <= channels:
        raise ValueError(
            f"true_channels must be in [1, {channels}] for an input of {channels} "
            f"channels; got {true_channels}"
        )
    return true_channels


def _pad_weights(weights: jnp.ndarray, channels: int) -> jnp.ndarray:
    """`(batch, C)` weights to `(batch, 1, 1, channels)`, zeros for the padding."""
    pad = channels - weights.shape[-1]
    if pad:
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    return weights[:, None, None, :]


class ChannelAttentionMLP(nn.Module):
    """CBAM channel attention; returns `(batch, 1, 1, C)` weights in (0, 1)."""

    reduction: int = 16
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    true_channels: int | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        channels = _real_channels(x, self.true_channels)
        hidden = max(channels // self.reduction, 1)
        fc1 = nn.Dense(hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")
        fc2 = nn.Dense(channels, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")

        def shared_mlp(descriptor):
            return fc2(nn.relu(fc1(descriptor)))

        average, maximum = mean_and_max(x, axis=(1, 2))
        average, maximum = average[:, :channels], maximum[:, :channels]
        weights = nn.sigmoid(shared_mlp(average) + shared_mlp(maximum))
        return _pad_weights(weights, x.shape[-1])


def eca_kernel_size(channels: int, gamma: int = 2, beta: int = 1) -> int:
    size = int(abs((math.log2(channels) + beta) / gamma))
    return size if size % 2 else size + 1


class EfficientChannelAttention(nn.Module):
    """ECA channel attention; returns `(batch, 1, 1, C)` weights in (0, 1)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    true_channels: int | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        channels = _real_channels(x, self.true_channels)
        size = eca_kernel_size(channels)
        pad = (size - 1) // 2
        descriptor = jnp.mean(x, axis=(1, 2))[:, :channels, None]  # (batch, C, 1): C is "length"
        logits = nn.Conv(
            1,
            (size,),
            padding=((pad, pad),),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(descriptor)
        return _pad_weights(nn.sigmoid(logits[..., 0]), x.shape[-1])


class SpatialAttention(nn.Module):
    """CBAM spatial attention; returns a `(batch, h, w, 1)` map in (0, 1).

    `conv` is `nn.Conv(1, (k, k), padding=(k - 1) // 2, use_bias=False)` in parameter
    and function, computed by `ShiftedConv` (module docstring); `kernel_size` is odd.
    """

    kernel_size: int = 7
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    true_channels: int | None = None
    # "shifted" (ShiftedConv) or "cudnn" (nn.Conv, the same parameter and function): an
    # option so a GPU can measure what leaving cuDNN is worth.
    conv_form: str = "shifted"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.conv_form not in SPATIAL_CONV_FORMS:
            raise ValueError(f"iasm_spatial must be one of {SPATIAL_CONV_FORMS}; got "
                             f"{self.conv_form!r}")
        channels = _real_channels(x, self.true_channels)
        valid = channels if channels < x.shape[-1] else None
        pooled = jnp.concatenate(mean_and_max(x, axis=-1, keepdims=True, valid=valid), axis=-1)
        size = (self.kernel_size, self.kernel_size)
        if self.conv_form == "shifted":
            conv = ShiftedConv(1, size, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")
        else:
            pad = (self.kernel_size - 1) // 2
            conv = nn.Conv(1, size, padding=((pad, pad), (pad, pad)), use_bias=False,
                           dtype=self.dtype, param_dtype=self.param_dtype, name="conv")
        return nn.sigmoid(conv(pooled))


class ResidualAttention(nn.Module):
    """IASM: `F + M_s(F1) * F1` with `F1 = M_c(F) * F`.

    Sows the spatial map as `'spatial_attention'` into `'intermediates'`.
    """

    channel_attention: str = "cbam"
    reduction: int = 16
    spatial_kernel_size: int = 7
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    true_channels: int | None = None
    spatial_conv_form: str = "shifted"

    @nn.compact
    def __call__(self, features: jnp.ndarray) -> jnp.ndarray:
        _real_channels(features, self.true_channels)
        kinds = {
            "dtype": self.dtype,
            "param_dtype": self.param_dtype,
            "true_channels": self.true_channels,
        }
        if self.channel_attention == "cbam":
            channel = ChannelAttentionMLP(self.reduction, **kinds, name="channel")
        elif self.channel_attention == "eca":
            channel = EfficientChannelAttention(**kinds, name="channel")
        else:
            raise ValueError(
                f"channel_attention must be one of {CHANNEL_ATTENTIONS}; "
                f"got {self.channel_attention!r}"
            )
        channel_refined = channel(features) * features
        spatial_map = SpatialAttention(self.spatial_kernel_size, **kinds,
                                       conv_form=self.spatial_conv_form, name="spatial")(
            channel_refined
        )
        self.sow("intermediates", "spatial_attention", spatial_map)
        return features + spatial_map * channel_refined
