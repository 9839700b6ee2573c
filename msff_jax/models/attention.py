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
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

CHANNEL_ATTENTIONS = ("cbam", "eca")


class ChannelAttentionMLP(nn.Module):
    """CBAM channel attention; returns `(batch, 1, 1, C)` weights in (0, 1)."""

    reduction: int = 16
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        channels = x.shape[-1]
        hidden = max(channels // self.reduction, 1)
        fc1 = nn.Dense(hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")
        fc2 = nn.Dense(channels, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")

        def shared_mlp(descriptor):
            return fc2(nn.relu(fc1(descriptor)))

        average = jnp.mean(x, axis=(1, 2))
        maximum = jnp.max(x, axis=(1, 2))
        weights = nn.sigmoid(shared_mlp(average) + shared_mlp(maximum))
        return weights[:, None, None, :]


def eca_kernel_size(channels: int, gamma: int = 2, beta: int = 1) -> int:
    size = int(abs((math.log2(channels) + beta) / gamma))
    return size if size % 2 else size + 1


class EfficientChannelAttention(nn.Module):
    """ECA channel attention; returns `(batch, 1, 1, C)` weights in (0, 1)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        size = eca_kernel_size(x.shape[-1])
        pad = (size - 1) // 2
        descriptor = jnp.mean(x, axis=(1, 2))[:, :, None]  # (batch, C, 1): C is "length"
        logits = nn.Conv(
            1,
            (size,),
            padding=((pad, pad),),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(descriptor)
        return nn.sigmoid(logits[..., 0])[:, None, None, :]


class SpatialAttention(nn.Module):
    """CBAM spatial attention; returns a `(batch, h, w, 1)` map in (0, 1)."""

    kernel_size: int = 7
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        pooled = jnp.concatenate(
            [jnp.mean(x, axis=-1, keepdims=True), jnp.max(x, axis=-1, keepdims=True)],
            axis=-1,
        )
        pad = (self.kernel_size - 1) // 2
        logits = nn.Conv(
            1,
            (self.kernel_size, self.kernel_size),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(pooled)
        return nn.sigmoid(logits)


class ResidualAttention(nn.Module):
    """IASM: `F + M_s(F1) * F1` with `F1 = M_c(F) * F`.

    Sows the spatial map as `'spatial_attention'` into `'intermediates'`.
    """

    channel_attention: str = "cbam"
    reduction: int = 16
    spatial_kernel_size: int = 7
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jnp.ndarray) -> jnp.ndarray:
        kinds = {"dtype": self.dtype, "param_dtype": self.param_dtype}
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
        spatial_map = SpatialAttention(self.spatial_kernel_size, **kinds, name="spatial")(
            channel_refined
        )
        self.sow("intermediates", "spatial_attention", spatial_map)
        return features + spatial_map * channel_refined
