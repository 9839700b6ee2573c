"""scikit-learn's digits go through the shard format intact, split 70/15/15 per class."""

import io
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from data_pipeline.conversion import digits
from data_pipeline.records import example_codec
from record_helpers import read_records


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return out, digits.write_digits_shards(out, image_size=32, seed=0)


def test_every_digit_once_with_its_label(written):
    out, manifest = written
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["class_names"] == [str(d) for d in range(10)] and manifest["image_format"] == "png"
    reference = load_digits()
    seen = {}
    for split, info in manifest["splits"].items():
        counts = [0] * 10
        for shard in info["shards"]:
            records = list(read_records(out / shard["file"]))
            assert len(records) == shard["num_records"]
            for record in records:
                example = example_codec.decode_example(record)
                index = int(example["image/filename"].split("/")[1].split(".")[0])
                assert example["image/class/label"] == reference.target[index]
                assert example["image/class/text"] == str(reference.target[index])
                image = np.asarray(Image.open(io.BytesIO(example["image/encoded"])))
                assert image.shape == (32, 32, 3) and (image[..., 0] == image[..., 2]).all()
                # Downscaled back, the stored image is the original scan (lossless storage).
                small = np.asarray(Image.fromarray(image[..., 0]).resize((8, 8), Image.BOX), dtype=np.float32)
                assert np.corrcoef(small.ravel(), reference.images[index].ravel())[0, 1] > 0.9
                seen[index] = split
                counts[example["image/class/label"]] += 1
        assert counts == info["class_counts"]
    assert sorted(seen) == list(range(1797))
    sizes = {split: info["num_examples"] for split, info in manifest["splits"].items()}
    assert abs(sizes["train"] - 0.7 * 1797) < 10 and abs(sizes["val"] - 0.15 * 1797) < 10
    for label in range(10):  # stratified: each class split like the whole
        per_class = [manifest["splits"][s]["class_counts"][label] for s in ("train", "val", "test")]
        assert abs(per_class[0] / sum(per_class) - 0.7) < 0.02


def test_same_seed_writes_identical_shards(written, tmp_path):
    _, manifest = written
    again = digits.write_digits_shards(tmp_path, image_size=32, seed=0)
    assert again["splits"] == manifest["splits"]
