"""A tiny model exported for the export/predict tests: no training needed, the export
path is the same for trained and random variables. BatchNorm statistics are random too,
so a wrongly applied normalisation or stale statistics would change the logits."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from msff_jax.inference import export
from msff_jax.models import TINY_OVERRIDES, get_model

IMAGE_SIZE = 32
MEAN_RGB = (123.0, 116.0, 103.0)
STDDEV_RGB = (58.0, 57.0, 57.0)


def tiny_model_and_variables(name: str, num_classes: int):
    """Variables drawn with numpy from the model's abstract shapes: compiling
    `model.init` costs tens of CPU seconds, a shape-only trace almost nothing.
    Kernels are He-scaled so activations stay O(1) through the network."""
    model = get_model(name, num_classes, **TINY_OVERRIDES[name])
    images = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        kind = jax.tree_util.keystr(path[-1:])
        if "kernel" in kind:
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape)
        elif "var" in kind:
            value = rng.uniform(0.5, 2.0, leaf.shape)
        elif "scale" in kind:
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:  # biases, BatchNorm means
            value = rng.normal(0.0, 0.3, leaf.shape)
        return value.astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    return model, {k: variables[k] for k in ("params", "batch_stats")}


def write_tiny_export(out_dir: Path, name: str, class_names, platforms=("cpu",)):
    model, variables = tiny_model_and_variables(name, len(class_names))
    metadata = export.build_metadata(
        model_name=name, model_overrides=TINY_OVERRIDES[name], num_classes=len(class_names),
        class_names=class_names, dtype="float32", image_size=IMAGE_SIZE, crop_fraction=0.875,
        mean_rgb=MEAN_RGB, stddev_rgb=STDDEV_RGB, step=3, ema=False,
        class_names_source="test")
    export.write_export(out_dir, model=model, variables=variables, metadata=metadata,
                        platforms=platforms)
    return model, variables
