"""Per-image predictions of an evaluation (WORKDIR/test_predictions.npz): every image once,
in dataset order, agreeing with the confusion matrix, readable without pickle."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import linen as nn

from data_pipeline.conversion import digits
from data_pipeline.records import example_codec
from data_pipeline.records import reader
from msff_jax.train import evaluation
from msff_jax.train import loop as train
from msff_jax.train import mesh as mesh_lib
from msff_jax.train import steps
from tests.test_evaluation import echo_eval_config


class _PixelEcho(nn.Module):
    """Predicts the class written into pixel (0, 0, 0); a second class scores a little
    lower, so top-k is defined."""

    @nn.compact
    def __call__(self, images, train=False):
        del train
        self.param("unused", nn.initializers.zeros, (1,))
        label = jnp.round(images[:, 0, 0, 0]).astype(jnp.int32)
        logits = jax.nn.one_hot(label, 10) * 2.0 + jax.nn.one_hot((label + 3) % 10, 10)
        return logits


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    digits.write_digits_shards(str(out), image_size=8, seed=0)
    return str(out)


def test_predictions_in_dataset_order_over_eight_devices(digits_dir, tmp_path):
    assert jax.device_count() == 8
    config = echo_eval_config(digits_dir)
    mesh = mesh_lib.make_mesh((-1, 1))
    model = _PixelEcho()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    eval_step = steps.make_eval_step(config, model, mesh)
    # Wrong on every record whose index is a multiple of 7: answers depend on the image,
    # so a misordered file would not match the records below.
    source, _ = reader.open_split(digits_dir, "test", verify_checksums=False)
    labels = np.array([example_codec.decode_example(source[i])[example_codec.CLASS_LABEL]
                       for i in range(len(source))])
    wanted = np.where(np.arange(len(labels)) % 7 == 0, (labels + 1) % 10, labels)

    def batches():
        for batch in train.global_eval_batches(config, "test", mesh):
            index = np.asarray(batch["index"])
            answer = np.where(index < len(wanted), wanted[np.minimum(index, len(wanted) - 1)], 0)
            image = np.array(batch["image"])
            image[:, 0, 0, 0] = answer
            yield dict(batch, image=jax.device_put(image, batch["label"].sharding))

    accumulator = evaluation.evaluate(eval_step, variables, batches(), 10)
    results = evaluation.eval_results(accumulator, model="echo", split="test", step=7,
                                      class_names=[str(i) for i in range(10)], num_params=1)
    per_image = results.predictions
    assert np.array_equal(per_image["index"], np.arange(len(labels)))
    assert np.array_equal(per_image["label"], labels)
    assert np.array_equal(per_image["predicted"], wanted)
    assert np.array_equal(per_image["top_k"][:, 1], (wanted + 3) % 10)
    # The same evaluation as the confusion matrix, image by image.
    confusion = np.zeros((10, 10), int)
    np.add.at(confusion, (per_image["label"], per_image["predicted"]), 1)
    assert np.array_equal(confusion, accumulator.confusion)

    path = evaluation.write_predictions(str(tmp_path), results)
    assert path.endswith(evaluation.PREDICTIONS_FILE)
    with np.load(path, allow_pickle=False) as saved:
        assert str(saved["model"]) == "echo" and int(saved["step"]) == 7
        for key in ("index", "label", "predicted", "top_k"):
            assert np.array_equal(saved[key], per_image[key]), key
    # The JSON document is unchanged by the attribute.
    import json
    assert "predictions" not in json.loads(json.dumps(results))


def test_accumulator_sorts_by_record_index_and_refuses_duplicates():
    accumulator = evaluation.EvalAccumulator(3)
    logits = np.eye(3, dtype=np.float32)[[2, 0, 1, 1]]
    accumulator.update(logits, np.array([2, 0, 0, 1]), np.array([True, True, False, True]),
                       index=np.array([5, 1, 9, 3]))
    per_image = accumulator.per_image()
    assert per_image["index"].tolist() == [1, 3, 5]  # the masked row is dropped
    assert per_image["label"].tolist() == [0, 1, 2]
    assert per_image["predicted"].tolist() == [0, 1, 2]
    accumulator.update(logits[:1], np.array([2]), np.array([True]), index=np.array([3]))
    with pytest.raises(ValueError, match="saw an image twice"):
        accumulator.per_image()
