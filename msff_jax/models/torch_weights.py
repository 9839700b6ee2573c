"""ImageNet weights for the Flax baselines, from torchvision state dicts, without torch.

Users fine-tune ResNet-50, MobileNetV3-Large and EfficientNet-B0 from ImageNet weights.
Those weights are published as PyTorch state dicts; we read them from `.safetensors`
files (plain tensors, no pickle, so a file from a stranger cannot run code) with numpy
and map them onto the Flax variables `{'params', 'batch_stats'}`.

The mapping needs no table per model: the baselines name their parameters after
torchvision's modules (see the docstrings of `resnet.py`, `mobilenet_v3.py`,
`efficientnet.py`), and a Flax path becomes a state-dict key by joining the path with
'.' and turning each `_<digits>` into `.<digits>`:

    layer2_0/downsample_1/scale   <->  layer2.0.downsample.1.weight
    features_4/block_2/fc1/kernel <->  features.4.block.2.fc1.weight

Leaves: conv `kernel` HWIO <- OIHW (a depthwise kernel `(k, k, 1, C)` <- `(C, 1, k, k)`,
the same transpose); dense `kernel` `(in, out)` <- `(out, in)`; BatchNorm `scale`,
`bias`, `mean`, `var` <- `weight`, `bias`, `running_mean`, `running_var`;
`num_batches_tracked` has no Flax counterpart and is ignored.

The conversion is strict, because a silently half-loaded network trains but never
reaches the published accuracy: every Flax leaf is filled exactly once, every tensor of
the file is used (the head's may be left out with `skip_head`), and every problem is
reported at once by key, with both shapes.

timm: its `resnet50` uses torchvision's module names, so its state dicts convert as
`resnet50` unchanged. Its `efficientnet_b0` and `mobilenetv3_large_100` name their
modules differently (`conv_stem`, `blocks.*`) and are not mapped.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Mapping, Tuple

import numpy as np
from flax import traverse_util

# The classifier layer that fine-tuning replaces, by model: its torch key prefix.
HEAD_PREFIXES: Dict[str, str] = {
    "resnet50": "fc.",
    "mobilenet_v3_large": "classifier.3.",
    "efficientnet_b0": "classifier.1.",
}
CONVERTIBLE_MODELS: Tuple[str, ...] = tuple(HEAD_PREFIXES)

_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_IGNORED_SUFFIXES = (".num_batches_tracked",)


class WeightConversionError(ValueError):
    """The state dict does not fit the model; the message lists every problem."""


def load_safetensors(path: os.PathLike | str) -> Dict[str, np.ndarray]:
    """Reads every tensor of a `.safetensors` file into numpy arrays (no torch)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    try:
        return dict(load_file(path))
    except (SafetensorError, OSError, TypeError, ValueError) as error:
        raise WeightConversionError(
            f"{path}: cannot read as a .safetensors file "
            f"(convert a torch checkpoint with safetensors.torch.save_file): {error}"
        ) from error


def torch_key(collection: str, path: Tuple[str, ...]) -> str:
    """The state-dict key of one Flax leaf, e.g. ('layer1_0', 'bn1', 'scale')."""
    *modules, leaf = path
    if (collection, leaf) not in _LEAF_NAMES:
        raise WeightConversionError(
            f"no torch counterpart for Flax leaf {collection}/{'/'.join(path)}"
        )
    module = ".".join(re.sub(r"_(\d+)", r".\1", name) for name in modules)
    return f"{module}.{_LEAF_NAMES[(collection, leaf)]}"


def _to_flax_layout(leaf: str, tensor: np.ndarray, flax_ndim: int) -> np.ndarray:
    """Torch layout to Flax layout; shapes are checked by the caller."""
    if leaf != "kernel":
        return tensor
    if tensor.ndim == 4 and flax_ndim == 4:  # conv, depthwise included: OIHW -> HWIO
        return tensor.transpose(2, 3, 1, 0)
    if tensor.ndim == 2 and flax_ndim == 2:  # linear: (out, in) -> (in, out)
        return tensor.T
    return tensor  # rank mismatch: reported by the shape check


def _torch_layout_shape(leaf: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """A Flax shape written the way torch stores it, for error messages."""
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def convert_torchvision(
    model_name: str,
    state_dict: Mapping[str, np.ndarray],
    variables_template: Mapping[str, Any],
    skip_head: bool = False,
) -> Dict[str, Any]:
    """Flax variables for `model_name` holding the torchvision `state_dict`.

    `variables_template` gives the tree, shapes and dtypes (concrete variables from
    `module.init`, or `jax.eval_shape` structs when `skip_head` is False). With
    `skip_head`, the classifier keeps the template's (freshly initialised) values, so a
    1000-class ImageNet checkpoint fine-tunes a model with another number of classes.
    """
    if model_name not in HEAD_PREFIXES:
        raise ValueError(
            f"no torchvision weight mapping for model {model_name!r}; "
            f"convertible models: {', '.join(CONVERTIBLE_MODELS)}"
        )
    head_prefix = HEAD_PREFIXES[model_name]
    missing, mismatched, converted = [], [], {}
    used = set()
    for collection in ("params", "batch_stats"):
        if collection not in variables_template:
            raise WeightConversionError(
                f"variables template has no {collection!r} collection; pass the "
                f"variables of {model_name}'s module.init"
            )
        flat = traverse_util.flatten_dict(variables_template[collection])
        leaves = {}
        for path, template_leaf in flat.items():
            key = torch_key(collection, path)
            if key in used:
                raise WeightConversionError(f"two Flax leaves map to torch key {key!r}")
            used.add(key)
            if skip_head and key.startswith(head_prefix):
                leaves[path] = template_leaf
                continue
            if key not in state_dict:
                missing.append(key)
                continue
            tensor = np.asarray(state_dict[key])
            shape = tuple(template_leaf.shape)
            value = _to_flax_layout(path[-1], tensor, len(shape))
            if value.shape != shape:
                mismatched.append(
                    f"{key}: checkpoint {tuple(tensor.shape)}, model expects "
                    f"{_torch_layout_shape(path[-1], shape)} (torch layout; Flax {shape})"
                )
                continue
            leaves[path] = np.asarray(value, dtype=template_leaf.dtype)
        converted[collection] = traverse_util.unflatten_dict(leaves)

    unexpected = sorted(
        key
        for key in state_dict
        if key not in used
        and not key.endswith(_IGNORED_SUFFIXES)
        and not (skip_head and key.startswith(head_prefix))
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(sorted(missing))}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched))
    if problems:
        head_mismatch = any(line.startswith(head_prefix) for line in mismatched)
        hint = "\n  (another number of classes needs skip_head=True)" if head_mismatch else ""
        raise WeightConversionError(
            f"state dict does not fit {model_name}:\n  " + "\n  ".join(problems) + hint
        )
    extra = set(variables_template) - {"params", "batch_stats"}
    for collection in extra:
        converted[collection] = variables_template[collection]
    return converted


def load_pretrained(
    model_name: str,
    path: os.PathLike | str,
    variables: Mapping[str, Any],
    skip_head: bool,
) -> Dict[str, Any]:
    """`variables` with the baseline's weights replaced by those in a safetensors file.

    The entry point for training (`config.pretrained_path`): pass the freshly
    initialised variables; with `skip_head` their classifier is kept.
    """
    state_dict = load_safetensors(path)
    try:
        return convert_torchvision(model_name, state_dict, variables, skip_head=skip_head)
    except WeightConversionError as error:
        raise WeightConversionError(f"{os.fspath(path)}: {error}") from error
