"""Flax linen image classifiers: MSFF-EComNet, its ablations and three baselines.

`get_model(name, num_classes, **overrides)` is the only entry point other packages need.
"""

from msff_jax.models.registry import (
    MODEL_NAMES,
    SPEED_OPTIONS,
    TINY_OVERRIDES,
    count_params,
    get_model,
)

__all__ = ["MODEL_NAMES", "SPEED_OPTIONS", "TINY_OVERRIDES", "count_params", "get_model"]
