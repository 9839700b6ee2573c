"""Class weights in the loss against class imbalance: `config.class_weights`.

Weights in the loss rather than class-balanced sampling, because:
- every training image is still seen once per epoch: no image of a rare class repeated
  many times an epoch (which augmentation only partly disguises), none of a common class
  left out;
- the data order, and with it the reader's exact resume, is untouched: the weights are
  a pure function of the manifest's training class counts, so a resumed run computes
  the same loss without any state of its own;
- the manifest already holds the per-class counts; sampling by class would first need a
  pass over every record to learn its label;
- the weighted loss stays a mean over images of weights that average 1 on the training
  set: the loss keeps its scale (the learning rate stays tuned) and gradient
  accumulation over micro-batches still equals one large batch.
The price: a rare class's few images carry large weights, so gradients are noisier;
`sqrt` is the milder choice.

    none      every image counts the same (the default)
    balanced  w_c = N / (K n_c): every class weighs the same in total (scikit-learn's rule)
    sqrt      w_c proportional to 1 / sqrt(n_c), scaled to average 1 over the images
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from data_pipeline.records import manifest as manifest_lib
from msff_jax.console import ConfigError

KINDS = ("none", "balanced", "sqrt")


def weights_from_counts(counts: Sequence[int], kind: str) -> Optional[np.ndarray]:
    """Per-class weights (float32) averaging 1 over the images counted, or None for
    `none`. A class without training images gets 0 (no image ever carries it)."""
    if kind not in KINDS:
        raise ValueError(f"class weights {kind!r} unknown; use one of {', '.join(KINDS)}")
    if kind == "none":
        return None
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    raw = np.zeros_like(counts)
    raw[present] = 1.0 / (counts[present] if kind == "balanced" else np.sqrt(counts[present]))
    return (raw * counts.sum() / (raw * counts).sum()).astype(np.float32)


def _train_counts(config, manifest: dict) -> list[int]:
    where = os.path.join(str(config.data_dir), manifest_lib.MANIFEST_NAME)
    split = manifest["splits"].get(config.train_split, {})
    counts = split.get("class_counts")
    if not isinstance(counts, list) or len(counts) != len(manifest["class_names"]):
        raise ConfigError(
            f"config.class_weights={config.class_weights!r} needs the per-class counts of split "
            f"{config.train_split!r} in {where}, which it lacks; convert the data again with a current "
            "converter, or set --config.class_weights=none.")
    return counts


def check(config, manifest: dict) -> None:
    """Before anything is written: the setting is known and the manifest can serve it."""
    kind = config.get("class_weights", "none")
    if kind not in KINDS:
        raise ConfigError(f"config.class_weights={kind!r} is unknown; use one of {', '.join(KINDS)}.")
    if kind != "none":
        _train_counts(config, manifest)


def for_config(config) -> Optional[jnp.ndarray]:
    """The weights the training loss uses, from `config.data_dir`'s manifest; None when
    every image counts the same."""
    kind = config.get("class_weights", "none")
    if kind == "none":
        return None
    counts = _train_counts(config, manifest_lib.load_manifest(config.data_dir))
    return jnp.asarray(weights_from_counts(counts, kind))


def stand_in(config) -> Optional[jnp.ndarray]:
    """Weights of the right shape for a step compiled without data (plan and benchmark
    modes): the program, and so its cost, is the same whatever the values are."""
    if config.get("class_weights", "none") == "none":
        return None
    return jnp.ones((config.num_classes,), jnp.float32)


def mean_loss(per_example: jnp.ndarray, labels: jnp.ndarray, weights: Optional[jnp.ndarray]) -> jnp.ndarray:
    """The batch's mean loss, each image's loss scaled by its class's weight."""
    if weights is None:
        return per_example.mean()
    return (per_example * weights[labels]).mean()
