"""MSFF-EComNet in PyTorch: the twin of `msff_jax.models.msff.MSFFNet`.

It exists so the throughput comparison (`benchmarks/torch_peers.py`) can time our model
as a PyTorch user would run it. A fair comparison needs the same network, so the twin
takes its widths, depths and attention settings from the Flax module's own defaults
(`flax_defaults()`), never from a second copy of the numbers, and mirrors the Flax
parameter names: the Flax path `stage1_block0/msp_conv/branch_3x3/0/kernel` is the
torch key `stage1_block0.msp_conv.branch_3x3.0.weight`. Tests check that the parameter
counts agree and that the two give the same logits from the same weights
(`flax_variables_to_torch_state_dict`).

Reading of the paper (see the Flax module's docstring and PAPER.md section 2): a stem of
three 3x3 conv units and a 3x3/2 max-pool; four stages of MSFF blocks (MSP-Conv, then
the IASM residual attention); global average pooling, dropout and a linear head.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from msff_jax.models import msff as flax_msff


def flax_defaults() -> Dict[str, object]:
    """The Flax MSFFNet's field defaults (widths, depths, attention, BatchNorm)."""
    return {
        field.name: field.default
        for field in dataclasses.fields(flax_msff.MSFFNet)
        if field.default is not dataclasses.MISSING
    }


class ConvNormAct(nn.Sequential):
    """Conv (no bias), BatchNorm, optional ReLU; children '0' and '1' as in Flax."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        *,
        norm_momentum: float,
        norm_epsilon: float,
        activation: bool = True,
    ):
        layers = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding=(kernel_size - 1) // 2,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels, eps=norm_epsilon, momentum=norm_momentum),
        ]
        if activation:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class MultiScaleParallelConv(nn.Module):
    """1x1, 1x1-3x3, 1x1-3x3-3x3 and maxpool-1x1 branches, concatenated."""

    def __init__(self, in_channels: int, features: int, stride: int, **norm):
        super().__init__()
        if features % 4:
            raise ValueError(
                f"MultiScaleParallelConv needs features divisible by 4; got {features}"
            )
        width = features // 4
        self.stride = stride
        self.branch_1x1 = ConvNormAct(in_channels, width, 1, stride, **norm)
        self.branch_3x3_reduce = ConvNormAct(in_channels, width, 1, **norm)
        self.branch_3x3 = ConvNormAct(width, width, 3, stride, **norm)
        self.branch_5x5_reduce = ConvNormAct(in_channels, width, 1, **norm)
        self.branch_5x5_a = ConvNormAct(width, width, 3, stride, **norm)
        self.branch_5x5_b = ConvNormAct(width, width, 3, **norm)
        self.branch_pool = ConvNormAct(in_channels, width, 1, **norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fine = self.branch_1x1(x)
        local = self.branch_3x3(self.branch_3x3_reduce(x))
        wide = self.branch_5x5_b(self.branch_5x5_a(self.branch_5x5_reduce(x)))
        pooled = self.branch_pool(F.max_pool2d(x, 3, self.stride, padding=1))
        return torch.cat([fine, local, wide, pooled], dim=1)


class ChannelAttentionMLP(nn.Module):
    """CBAM channel attention: shared MLP on average and max descriptors, sigmoid."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        average = x.mean(dim=(2, 3))
        maximum = x.amax(dim=(2, 3))
        shared = lambda d: self.fc2(F.relu(self.fc1(d)))  # noqa: E731
        return torch.sigmoid(shared(average) + shared(maximum))[:, :, None, None]


def eca_kernel_size(channels: int, gamma: int = 2, beta: int = 1) -> int:
    size = int(abs((math.log2(channels) + beta) / gamma))
    return size if size % 2 else size + 1


class EfficientChannelAttention(nn.Module):
    """ECA: a 1-D convolution across channels of the average descriptor, sigmoid."""

    def __init__(self, channels: int):
        super().__init__()
        size = eca_kernel_size(channels)
        self.conv = nn.Conv1d(1, 1, size, padding=(size - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        descriptor = x.mean(dim=(2, 3))[:, None, :]  # (batch, 1, C)
        return torch.sigmoid(self.conv(descriptor))[:, 0, :, None, None]


class SpatialAttention(nn.Module):
    """CBAM spatial attention: conv over [mean, max] channel maps, sigmoid."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat(
            [x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1
        )
        return torch.sigmoid(self.conv(pooled))


class ResidualAttention(nn.Module):
    """IASM (paper Eq. 2): `F + M_s(F1) * F1` with `F1 = M_c(F) * F`."""

    def __init__(
        self, channels: int, channel_attention: str, reduction: int, spatial_kernel: int
    ):
        super().__init__()
        if channel_attention == "cbam":
            self.channel = ChannelAttentionMLP(channels, reduction)
        elif channel_attention == "eca":
            self.channel = EfficientChannelAttention(channels)
        else:
            raise ValueError(
                f"channel_attention must be 'cbam' or 'eca'; got {channel_attention!r}"
            )
        self.spatial = SpatialAttention(spatial_kernel)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        refined = self.channel(features) * features
        return features + self.spatial(refined) * refined


class MSFFBlock(nn.Module):
    """MSP-Conv (or one 3x3 conv unit in the ablations), then IASM when enabled."""

    def __init__(
        self,
        in_channels: int,
        features: int,
        stride: int,
        *,
        use_msp: bool,
        use_iasm: bool,
        channel_attention: str,
        reduction: int,
        spatial_kernel: int,
        **norm,
    ):
        super().__init__()
        self.use_msp = use_msp
        if use_msp:
            self.msp_conv = MultiScaleParallelConv(in_channels, features, stride, **norm)
        else:
            self.conv_unit = ConvNormAct(in_channels, features, 3, stride, **norm)
        self.iasm = (
            ResidualAttention(features, channel_attention, reduction, spatial_kernel)
            if use_iasm
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.msp_conv(x) if self.use_msp else self.conv_unit(x)
        return self.iasm(x) if self.iasm is not None else x


class MSFFEComNet(nn.Module):
    """The PyTorch twin; every argument left as None takes the Flax model's default."""

    def __init__(
        self,
        num_classes: int,
        stem_widths: Optional[Sequence[int]] = None,
        stage_sizes: Optional[Sequence[int]] = None,
        stage_widths: Optional[Sequence[int]] = None,
        use_msp: Optional[bool] = None,
        use_iasm: Optional[bool] = None,
        channel_attention: Optional[str] = None,
        attention_reduction: Optional[int] = None,
        spatial_kernel_size: Optional[int] = None,
        dropout_rate: Optional[float] = None,
    ):
        super().__init__()
        given = dict(
            stem_widths=stem_widths,
            stage_sizes=stage_sizes,
            stage_widths=stage_widths,
            use_msp=use_msp,
            use_iasm=use_iasm,
            channel_attention=channel_attention,
            attention_reduction=attention_reduction,
            spatial_kernel_size=spatial_kernel_size,
            dropout_rate=dropout_rate,
        )
        settings = flax_defaults()
        settings.update({k: v for k, v in given.items() if v is not None})
        if len(settings["stage_sizes"]) != len(settings["stage_widths"]):
            raise ValueError(
                f"stage_sizes {tuple(settings['stage_sizes'])} and stage_widths "
                f"{tuple(settings['stage_widths'])} must have the same length"
            )
        self.settings = settings
        norm = dict(
            # Flax's momentum weighs the old average; torch's weighs the new batch.
            norm_momentum=1.0 - settings["norm_momentum"],
            norm_epsilon=settings["norm_epsilon"],
        )

        channels = 3
        for i, width in enumerate(settings["stem_widths"]):
            self.add_module(
                f"stem_{i}", ConvNormAct(channels, width, 3, 2 if i == 0 else 1, **norm)
            )
            channels = width
        self.num_stem = len(settings["stem_widths"])
        self.block_names = []
        for stage, (size, width) in enumerate(
            zip(settings["stage_sizes"], settings["stage_widths"])
        ):
            for block in range(size):
                name = f"stage{stage + 1}_block{block}"
                self.add_module(
                    name,
                    MSFFBlock(
                        channels,
                        width,
                        2 if stage > 0 and block == 0 else 1,
                        use_msp=settings["use_msp"],
                        use_iasm=settings["use_iasm"],
                        channel_attention=settings["channel_attention"],
                        reduction=settings["attention_reduction"],
                        spatial_kernel=settings["spatial_kernel_size"],
                        **norm,
                    ),
                )
                self.block_names.append(name)
                channels = width
        self.dropout = nn.Dropout(settings["dropout_rate"])
        self.head = nn.Linear(channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`images`: float `(batch, 3, height, width)`, already normalised."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                "images must have shape (batch, 3, height, width) (NCHW, RGB); "
                f"got shape {tuple(images.shape)}"
            )
        x = images
        for i in range(self.num_stem):
            x = getattr(self, f"stem_{i}")(x)
        x = F.max_pool2d(x, 3, 2, padding=1)
        for name in self.block_names:
            x = getattr(self, name)(x)
        x = x.mean(dim=(2, 3))
        return self.head(self.dropout(x))


# The ablations of paper Table 2, as in `msff_jax.models.get_model`.
PRESETS: Dict[str, Dict[str, bool]] = {
    "msff_base": {"use_msp": False, "use_iasm": False},
    "msff_msp": {"use_msp": True, "use_iasm": False},
    "msff_iasm": {"use_msp": False, "use_iasm": True},
    "msff_ecomnet": {"use_msp": True, "use_iasm": True},
}


def build_twin(name: str, num_classes: int, **overrides) -> MSFFEComNet:
    """The twin of `get_model(name, num_classes, **overrides)` for an MSFF name."""
    if name not in PRESETS:
        raise ValueError(f"no PyTorch twin for {name!r}; known: {', '.join(PRESETS)}")
    return MSFFEComNet(num_classes, **PRESETS[name], **overrides)


def flax_variables_to_torch_state_dict(variables) -> Dict[str, torch.Tensor]:
    """Maps Flax MSFF-EComNet variables onto the twin's state-dict keys.

    Used by the tests to show the twin computes the same function; layouts: conv
    HWIO -> OIHW, 1-D conv (W, I, O) -> (O, I, W), dense (in, out) -> (out, in).
    """
    from flax.traverse_util import flatten_dict

    state = {}
    for collection in ("params", "batch_stats"):
        for path, value in flatten_dict(variables[collection]).items():
            array = np.asarray(value, dtype=np.float32)
            *module, leaf = path
            prefix = ".".join(module)
            if leaf == "kernel":
                if array.ndim == 4:
                    array = array.transpose(3, 2, 0, 1)
                elif array.ndim == 3:
                    array = array.transpose(2, 1, 0)
                else:
                    array = array.T
                name = "weight"
            else:
                name = {"scale": "weight", "bias": "bias", "mean": "running_mean",
                        "var": "running_var"}[leaf]
            state[f"{prefix}.{name}"] = torch.from_numpy(np.array(array, copy=True, order="C"))
            if leaf == "mean":
                state[f"{prefix}.num_batches_tracked"] = torch.tensor(0)
    return state
