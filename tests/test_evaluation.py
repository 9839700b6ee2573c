"""Evaluation measures agree with scikit-learn, and every example counts exactly once."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from sklearn import metrics as sk

from data_pipeline.conversion import digits
from msff_jax.train import evaluation
from msff_jax.train import loop as train
from msff_jax.train import mesh as mesh_lib
from msff_jax.train import steps


def _random_eval(num_classes=7, n=203, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    logits = rng.normal(size=(n, num_classes))
    logits[np.arange(n), labels] += rng.uniform(0, 2.5, n)  # Better than chance, not perfect.
    return logits.astype(np.float32), labels


def test_measures_agree_with_sklearn():
    num_classes = 7
    logits, labels = _random_eval(num_classes)
    labels[labels == 6] = 5  # Class 6 absent from the labels: zero support.
    accumulator = evaluation.EvalAccumulator(num_classes)
    # Feed in uneven batches with padding rows (mask False) that must be ignored.
    for start in range(0, len(labels), 50):
        chunk = slice(start, start + 50)
        pad = 50 - len(labels[chunk])
        accumulator.update(np.concatenate([logits[chunk], np.zeros((pad, num_classes))]),
                           np.concatenate([labels[chunk], np.zeros(pad, int)]),
                           np.concatenate([np.ones(len(labels[chunk]), bool), np.zeros(pad, bool)]))
    results = evaluation.eval_results(accumulator, model="m", split="val", step=3,
                                      class_names=[str(i) for i in range(num_classes)], num_params=1)
    predictions = logits.argmax(-1)
    everything = list(range(num_classes))
    precision, recall, f1, support = sk.precision_recall_fscore_support(
        labels, predictions, labels=everything, zero_division=0)
    np.testing.assert_allclose(results["per_class"]["precision"], precision, atol=1e-12)
    np.testing.assert_allclose(results["per_class"]["recall"], recall, atol=1e-12)
    np.testing.assert_allclose(results["per_class"]["f1"], f1, atol=1e-12)
    assert results["per_class"]["support"] == support.tolist()
    for name, average in (("macro_precision", precision), ("macro_recall", recall), ("macro_f1", f1)):
        assert results[name] == pytest.approx(average.mean(), abs=1e-12)
    assert results["macro_f1"] == pytest.approx(
        sk.f1_score(labels, predictions, labels=everything, average="macro", zero_division=0))
    assert results["top1"] == pytest.approx(sk.accuracy_score(labels, predictions))
    assert results["top5"] == pytest.approx(
        sk.top_k_accuracy_score(labels, logits, k=5, labels=everything))
    assert results["confusion_matrix"] == sk.confusion_matrix(labels, predictions, labels=everything).tolist()
    assert results["num_examples"] == len(labels)


def test_confusion_matrix_png_and_report(tmp_path):
    confusion = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 4]])
    image = evaluation.plot_confusion_matrix(confusion, ["Dress", "Tee", "Jeans"], str(tmp_path / "cm.png"))
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    with open(tmp_path / "cm.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    path = evaluation.write_eval_results(str(tmp_path), {"top1": 0.5})
    assert json.load(open(path)) == {"top1": 0.5}


class _LabelEcho(nn.Module):
    """Logits that put all mass on the class written into pixel (0, 0, 0) by the test."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, images, train=False):
        scale = self.param("scale", nn.initializers.ones, ())
        return jax.nn.one_hot(jnp.round(images[:, 0, 0, 0]).astype(jnp.int32), self.num_classes) * scale


def echo_eval_config(digits_dir):
    """An evaluation of the 8 px digits shards in batches of 64, raw pixels in (the echo
    models read a label off a pixel); also used by tests/test_eval_predictions.py."""
    return ml_collections.ConfigDict(dict(
        data_dir=digits_dir, eval_batch_size=64, image_size=8, dtype="float32", num_classes=10,
        mean_rgb=(0.0, 0.0, 0.0), stddev_rgb=(1.0, 1.0, 1.0), model="echo",
        data=dict(worker_count=0, read_threads=1, prefetch_buffer=1, verify_checksums=True)))


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    digits.write_digits_shards(str(out), image_size=8, seed=0)
    return str(out)


def test_eval_counts_every_example_once_over_eight_devices(digits_dir):
    """The test split (270 examples) is not a multiple of the batch (64): the reader pads,
    the eval step runs sharded over 8 devices, and the padding is dropped."""
    assert jax.device_count() == 8
    manifest = json.load(open(os.path.join(digits_dir, "manifest.json")))
    split = manifest["splits"]["test"]
    assert split["num_examples"] % 64 != 0
    config = echo_eval_config(digits_dir)
    mesh = mesh_lib.make_mesh((-1, 1))
    model = _LabelEcho()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    eval_step = steps.make_eval_step(config, model, mesh)
    seen = evaluation.EvalAccumulator(10)
    for batch in train.global_eval_batches(config, "test", mesh):
        # Write each example's label into its pixel (0, 0, 0) so the model predicts it.
        image = np.array(batch["image"])
        image[:, 0, 0, 0] = np.array(batch["label"])
        batch = dict(batch, image=jax.device_put(image, batch["label"].sharding))
        out = eval_step(variables, batch)
        assert np.asarray(out["mask"]).sum() <= 64
        seen.update(out["logits"], out["label"], out["mask"])
    assert seen.count == split["num_examples"]
    confusion = seen.confusion
    assert np.array_equal(np.diag(confusion), split["class_counts"])  # All correct, once each.
    assert confusion.sum() == np.trace(confusion)
