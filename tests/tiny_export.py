"""A tiny model exported for the export/predict tests: no training needed, the export
path is the same for trained and freshly initialised variables. BatchNorm statistics are
randomised so a wrongly applied normalisation or stale statistics would change logits."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from msff_jax import export
from msff_jax.models import TINY_OVERRIDES, get_model

IMAGE_SIZE = 32
MEAN_RGB = (123.0, 116.0, 103.0)
STDDEV_RGB = (58.0, 57.0, 57.0)


def tiny_model_and_variables(name: str, num_classes: int):
    model = get_model(name, num_classes, **TINY_OVERRIDES[name])
    images = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images)
    rng = np.random.default_rng(0)

    def randomise(path, leaf):
        kind = jax.tree_util.keystr(path[-1:])
        if "var" in kind:
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        return rng.normal(0.0, 0.3, leaf.shape).astype(np.float32)

    variables = dict(variables)
    variables["batch_stats"] = jax.tree_util.tree_map_with_path(randomise, variables["batch_stats"])
    return model, variables


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
