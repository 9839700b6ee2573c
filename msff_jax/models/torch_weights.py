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

timm state dicts (the `.safetensors` files timm publishes) are accepted too:
`resnet50` uses torchvision's module names already; `efficientnet_b0` and
`mobilenetv3_large_100` (`conv_stem`, `blocks.<stage>.<block>.conv_dw`, ...) are
renamed to torchvision's keys first (`timm_to_torchvision_keys`); `load_pretrained`
recognises them by their `conv_stem.weight`. The architectures are the same, with one
exception: timm's MobileNetV3 uses BatchNorm epsilon 1e-5 where torchvision uses 1e-3,
so build `mobilenet_v3_large` with `norm_epsilon=1e-5` for timm's exact outputs.
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
    """The state dict does not fit the model; the message lists the problems. The
    user's to fix (`user_fixable`: a program prints it as one line, not as a bug)."""

    user_fixable = True


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
    missing, mismatched, converted, loaded = [], [], {}, 0
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
            loaded += 1
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
        problems.append(f"{len(missing)} missing key(s): {_first(sorted(missing), ', ')}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected, ', ')}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): " + _first(mismatched, "; "))
    if problems:
        head_mismatch = any(line.startswith(head_prefix) for line in mismatched)
        hint = "\n  (another number of classes needs skip_head=True)" if head_mismatch else ""
        if loaded <= len(used) // 10:
            hint += (f"\n  (the file fits {loaded} of {model_name}'s {len(used)} tensors: it "
                     "holds the weights of another model)")
        raise WeightConversionError(
            f"state dict does not fit {model_name}:\n  " + ";\n  ".join(problems) + hint
        )
    extra = set(variables_template) - {"params", "batch_stats"}
    for collection in extra:
        converted[collection] = variables_template[collection]
    return converted


def _first(items, separator: str, limit: int = 5) -> str:
    """The first `limit` items, and how many more: a file of another model would
    otherwise list every one of its hundreds of keys."""
    shown = separator.join(items[:limit])
    return shown + (f"{separator}... and {len(items) - limit} more" if len(items) > limit else "")


def is_timm_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """timm's EfficientNet and MobileNetV3 call their stem `conv_stem`."""
    return "conv_stem.weight" in state_dict


def _timm_block_layers(kind: str, has_se: bool) -> Dict[str, str]:
    """timm's layer names inside one block -> torchvision's `block.<i>` names."""
    if kind == "inverted_residual":  # expand, depthwise, [SE], project
        order = [("conv_pw", "bn1"), ("conv_dw", "bn2"), "se", ("conv_pwl", "bn3")]
    else:  # depthwise separable: depthwise, [SE], project
        order = [("conv_dw", "bn1"), "se", ("conv_pw", "bn2")]
    if not has_se:
        order.remove("se")
    names = {}
    for index, layer in enumerate(order):
        if layer == "se":
            names["se.conv_reduce"] = f"block.{index}.fc1"
            names["se.conv_expand"] = f"block.{index}.fc2"
        else:
            names[layer[0]] = f"block.{index}.0"
            names[layer[1]] = f"block.{index}.1"
    return names


def timm_to_torchvision_keys(
    model_name: str, state_dict: Mapping[str, np.ndarray]
) -> Dict[str, np.ndarray]:
    """Renames a timm EfficientNet-B0 / MobileNetV3-Large state dict to torchvision's.

    Blocks are told apart by their layers (`conv_pwl`: inverted residual; `conv_dw`
    alone: depthwise separable; `conv`: the plain conv that ends MobileNetV3's body).
    EfficientNet keeps timm's stage/block numbering (`features.<stage + 1>.<block>`);
    MobileNetV3 numbers its blocks flat (`features.<n>`). Keys that fit no pattern keep
    their name and are reported as unexpected by the converter.
    """
    if model_name not in HEAD_PREFIXES:
        raise ValueError(
            f"no timm weight mapping for model {model_name!r}; "
            f"convertible models: {', '.join(CONVERTIBLE_MODELS)}"
        )
    if model_name == "resnet50":
        return dict(state_dict)
    block_pattern = re.compile(r"blocks\.(\d+)\.(\d+)\.(.+)")
    blocks: Dict[Tuple[int, int], set] = {}
    for key in state_dict:
        match = block_pattern.fullmatch(key)
        if match:
            blocks.setdefault((int(match[1]), int(match[2])), set()).add(match[3])
    flat_index = {block: i + 1 for i, block in enumerate(sorted(blocks))}

    renames = {"conv_stem": "features.0.0", "bn1": "features.0.1"}
    if model_name == "efficientnet_b0":
        last = len({stage for stage, _ in blocks}) + 1  # the 1x1 conv after the stages
        renames.update({"conv_head": f"features.{last}.0", "bn2": f"features.{last}.1",
                        "classifier": "classifier.1"})
    else:
        renames.update({"conv_head": "classifier.0", "classifier": "classifier.3"})
    for (stage, block), leaves in blocks.items():
        prefix = (f"features.{flat_index[(stage, block)]}" if model_name == "mobilenet_v3_large"
                  else f"features.{stage + 1}.{block}")
        modules = {leaf.rsplit(".", 1)[0] for leaf in leaves}
        if "conv" in modules:  # MobileNetV3's closing 1x1 conv, BN, hard-swish
            layers = {"conv": "0", "bn1": "1"}
        else:
            kind = "inverted_residual" if "conv_pwl" in modules else "depthwise_separable"
            layers = _timm_block_layers(kind, has_se="se.conv_reduce" in modules)
        for timm_name, torchvision_name in layers.items():
            renames[f"blocks.{stage}.{block}.{timm_name}"] = f"{prefix}.{torchvision_name}"

    renamed = {}
    for key, tensor in state_dict.items():
        module, leaf = key.rsplit(".", 1)
        new_key = f"{renames[module]}.{leaf}" if module in renames else key
        if new_key == "classifier.0.weight":  # timm's conv_head is a 1x1 conv
            tensor = np.asarray(tensor).reshape(tensor.shape[:2])
        renamed[new_key] = tensor
    return renamed


def load_pretrained(
    model_name: str,
    path: os.PathLike | str,
    variables: Mapping[str, Any],
    skip_head: bool,
) -> Dict[str, Any]:
    """`variables` with the baseline's weights replaced by those in a safetensors file.

    torchvision and timm state dicts are both accepted (see the module docstring).

    The entry point for training (`config.pretrained_path`): pass the freshly
    initialised variables; with `skip_head` their classifier is kept.
    """
    state_dict = load_safetensors(path)
    try:
        if is_timm_state_dict(state_dict):
            state_dict = timm_to_torchvision_keys(model_name, state_dict)
        return convert_torchvision(model_name, state_dict, variables, skip_head=skip_head)
    except WeightConversionError as error:
        raise WeightConversionError(f"{os.fspath(path)}: {error}") from error
