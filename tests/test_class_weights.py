"""Class weights in the loss (config.class_weights): the weights, the loss they make, and
the checks before training. Their determinism across a resume is tested on a converted
catalogue in tests/test_catalogue_training.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from msff_jax.console import ConfigError
from msff_jax.train import class_weights, steps

COUNTS = [10, 30, 60]


def test_balanced_weights_give_every_class_the_same_total_and_average_one():
    weights = class_weights.weights_from_counts(COUNTS, "balanced")
    np.testing.assert_allclose(weights * COUNTS, [100 / 3] * 3, rtol=1e-6)
    np.testing.assert_allclose(np.dot(weights, COUNTS) / sum(COUNTS), 1.0, rtol=1e-6)
    mild = class_weights.weights_from_counts(COUNTS, "sqrt")
    np.testing.assert_allclose(mild * np.sqrt(COUNTS), mild[0] * np.sqrt(10), rtol=1e-6)
    np.testing.assert_allclose(np.dot(mild, COUNTS) / sum(COUNTS), 1.0, rtol=1e-6)
    assert weights[0] > mild[0] > 1 > mild[2] > weights[2]
    empty_class = class_weights.weights_from_counts([10, 0, 30], "balanced")
    assert empty_class[1] == 0 and np.isclose(np.dot(empty_class, [10, 0, 30]), 40)
    assert class_weights.weights_from_counts(COUNTS, "none") is None


class _FixedLogits:
    """A model whose logits are its only parameter: the loss alone is under test."""

    def apply(self, variables, images, train, mutable, rngs):
        return variables["params"]["logits"], {}


def _config(tmp_path, kind, counts=COUNTS):
    total = sum(COUNTS)
    manifest = {"format_version": 1, "class_names": ["a", "b", "c"], "image_format": "jpeg",
                "splits": {"train": {"num_examples": total, "shards": [
                    {"file": "train-00000-of-00001.tfrecord", "num_records": total, "sha256": "0"}]}}}
    if counts is not None:
        manifest["splits"]["train"]["class_counts"] = counts
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    config = default.get_config()
    config.num_classes, config.dtype, config.data_dir = 3, "float32", str(tmp_path)
    config.class_weights = kind
    return config, manifest


def _loss(config, logits, labels):
    loss_fn = steps.make_loss_fn(config, _FixedLogits(), class_weights.for_config(config))
    images = np.zeros((len(labels), 2, 2, 3), np.uint8)
    scaled, (loss, _, _) = loss_fn({"logits": jnp.asarray(logits)}, {}, images, jnp.asarray(labels),
                                   jax.random.PRNGKey(0), 1.0)
    return float(loss)


def test_loss_weighs_each_image_by_its_class(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 2, 2, 1, 2, 0], np.int32)
    config, _ = _config(tmp_path, "balanced")
    targets = optax.smooth_labels(jax.nn.one_hot(labels, 3), config.label_smoothing)
    per_image = np.asarray(optax.softmax_cross_entropy(logits, targets))
    weights = class_weights.weights_from_counts(COUNTS, "balanced")
    np.testing.assert_allclose(_loss(config, logits, labels), np.mean(per_image * weights[labels]), rtol=1e-6)
    config.class_weights = "none"  # unchanged from before the option existed
    np.testing.assert_allclose(_loss(config, logits, labels), per_image.mean(), rtol=1e-6)
    # A mean of per-image terms: two half batches average to the whole batch, so gradient
    # accumulation over micro-batches equals one large batch with weights too.
    config.class_weights = "balanced"
    halves = [_loss(config, logits[i::2], labels[i::2]) for i in range(2)]
    np.testing.assert_allclose(np.mean(halves), np.mean(per_image * weights[labels]), rtol=1e-6)


def test_checks_name_the_field_and_the_manifest(tmp_path):
    config, manifest = _config(tmp_path, "inverse")
    with pytest.raises(ConfigError, match=r"config.class_weights='inverse' is unknown; use one of none, "):
        class_weights.check(config, manifest)
    config, manifest = _config(tmp_path, "balanced", counts=None)
    with pytest.raises(ConfigError, match=rf"per-class counts of split 'train' in {tmp_path}/manifest.json"):
        class_weights.check(config, manifest)
    config.class_weights = "none"
    class_weights.check(config, manifest)  # nothing needed from the manifest


def test_an_unknown_kind_is_refused_with_the_other_names_before_any_data():
    """A typo is found with the config rules (exit 2), not after the demo data is made
    and the manifest read."""
    from msff_jax.console import ConfigValueError
    from msff_jax.train import config_checks

    config = default.get_config()
    config.class_weights = "balnced"
    with pytest.raises(ConfigValueError, match=r"config.class_weights='balnced' is unknown; use one of "
                                               r"\('none', 'balanced', 'sqrt'\)"):
        config_checks.check_fields(config)
