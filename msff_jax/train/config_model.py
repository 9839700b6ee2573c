"""What a config names, made concrete: the model and its computation dtype, the
smallest image that model can see, and the config itself as plain JSON data.

The config checks and the train state both need these, and neither may import the
other (the checks run before any state exists), so they live here.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# The side of the probe image `smallest_input` traces the model at: a power of two
# larger than any model's total stride, so the stride comes out exact.
_PROBE_SIZE = 256


def plain(value: Any) -> Any:
    """ConfigDicts, tuples and nested containers as plain JSON-friendly dicts and lists."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def compute_dtype(config):
    if config.dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"config.dtype={config.dtype!r} is unknown; use one of {sorted(COMPUTE_DTYPES)}.")
    return COMPUTE_DTYPES[config.dtype]


def build_model(config):
    """The model named by the config, in the config's computation dtype."""
    from msff_jax.models import get_model

    overrides = plain(config.get("model_overrides") or {})
    overrides.setdefault("dtype", compute_dtype(config))
    return get_model(config.model, config.num_classes, **overrides)


def smallest_input(config) -> int:
    """The model's total stride: the side below which its last feature map (the
    `'features'` every model sows) would be computed from less than one pixel of the
    image, that is from padding. A shape-only trace, cached per model and overrides."""
    overrides = json.dumps(plain(config.get("model_overrides") or {}), sort_keys=True)
    return _total_stride(config.model, overrides, config.dtype)


@functools.lru_cache(maxsize=None)
def _total_stride(model_name: str, overrides_json: str, dtype: str) -> int:
    from msff_jax.models import get_model

    overrides = json.loads(overrides_json)
    overrides.setdefault("dtype", COMPUTE_DTYPES[dtype])
    model = get_model(model_name, 2, **overrides)

    def features(images):
        variables = model.init(jax.random.key(0), images, train=False)
        _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
        return [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
                if "'features'" in jax.tree_util.keystr(path)]

    (feature_map,) = jax.eval_shape(
        features, jax.ShapeDtypeStruct((1, _PROBE_SIZE, _PROBE_SIZE, 3), jnp.float32))
    return max(1, _PROBE_SIZE // int(feature_map.shape[1]))
