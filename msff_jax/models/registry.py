"""One name per model: `get_model(name, num_classes, **overrides)`.

Each name maps to a linen module class whose defaults are that architecture, or to a
`functools.partial` preset of one (the MSFF ablations). Overrides are module fields
(widths, depths, dtype, ...); a field a preset fixes (the ablation switches `use_msp`,
`use_iasm`) cannot be overridden, so an ablation name always means the variant it says.
`TINY_OVERRIDES` shrinks every model to a few thousand parameters so tests and the CPU study miniature compile in seconds at 32-64 px (the demo
has its own, wider MSFF-EComNet in `configs/demo.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from msff_jax.models.efficientnet import EfficientNet
from msff_jax.models.mobilenet_v3 import MobileNetV3
from msff_jax.models.msff import MSFFBase, MSFFEComNet, MSFFIasm, MSFFMsp
from msff_jax.models.resnet import ResNet

_PRESETS: Dict[str, Callable[..., nn.Module]] = {
    "msff_base": MSFFBase,
    "msff_msp": MSFFMsp,
    "msff_iasm": MSFFIasm,
    "msff_ecomnet": MSFFEComNet,
    "resnet50": ResNet,
    "mobilenet_v3_large": MobileNetV3,
    "efficientnet_b0": EfficientNet,
}

MODEL_NAMES: Tuple[str, ...] = tuple(_PRESETS)

# Module options that change how a model computes, not what: the same parameters, the
# same function (tests/test_speed_options.py, test_aligned_channels.py,
# test_batch_norm.py), so a checkpoint trained under any setting resumes, evaluates and
# exports under any other.
SPEED_OPTIONS: Tuple[str, ...] = ("max_pool_backward", "batch_norm_backward", "iasm_spatial",
                                  "fuse_pointwise", "channel_alignment")

# Two stages (one plain, one strided) cover every MSFF code path at half the compile
# time of four.
_TINY_MSFF = {"stem_widths": (8, 8, 16), "stage_sizes": (1, 1), "stage_widths": (16, 32)}

TINY_OVERRIDES: Dict[str, Dict[str, Any]] = {
    "msff_base": dict(_TINY_MSFF),
    "msff_msp": dict(_TINY_MSFF),
    "msff_iasm": dict(_TINY_MSFF),
    "msff_ecomnet": dict(_TINY_MSFF),
    "resnet50": {"stage_sizes": (1, 1, 1, 1), "num_filters": 8},
    # Three blocks covering every block kind: no expansion + SE, strided expansion
    # with hard-swish, and a residual block.
    "mobilenet_v3_large": {
        "block_settings": ((8, 3, 8, 8, True, "RE", 1),
                           (8, 3, 16, 16, False, "HS", 2),
                           (16, 5, 32, 16, True, "HS", 1)),
        "last_channel": 32,
    },
    # Two stages: expansion ratio 1, then a strided stage whose second block is
    # residual (with stochastic depth).
    "efficientnet_b0": {
        "stages": ((1, 3, 1, 8, 8, 1), (6, 3, 2, 8, 16, 2)),
        "last_channel": 64,
    },
}


def _freeze(value: Any) -> Any:
    """Lists (as configs deliver them) to tuples, so module fields stay hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(item) for item in value)
    return value


def get_model(name: str, num_classes: int, **overrides: Any) -> nn.Module:
    """The linen module `name` with `num_classes` outputs and `overrides` applied.

    `dtype` / `param_dtype` may be given as names ('bfloat16'), as configs hold them.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    preset = _PRESETS[name]
    module_cls = preset.func if isinstance(preset, functools.partial) else preset
    fixed: Mapping[str, Any] = preset.keywords if isinstance(preset, functools.partial) else {}
    fields = {f.name for f in dataclasses.fields(module_cls)} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown override(s) {unknown} for model {name!r}; "
            f"accepted: {sorted(fields - set(fixed) - {'num_classes'})}"
        )
    clashing = sorted(set(overrides) & set(fixed))
    if clashing:
        raise ValueError(
            f"override(s) {clashing} are fixed by model {name!r} "
            f"(they define the architecture the name stands for)"
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
    overrides = {k: _freeze(v) for k, v in overrides.items()}
    for key in ("dtype", "param_dtype"):
        if key in overrides:
            overrides[key] = jnp.dtype(overrides[key])
    return preset(num_classes=num_classes, **overrides)


def count_params(variables: Mapping[str, Any]) -> int:
    """Number of trainable parameters in `variables['params']` (arrays or shapes)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))
