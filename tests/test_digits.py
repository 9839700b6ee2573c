"""Real images: scikit-learn's scanned digits, through the DeepFashion shard format, the
grain reader, the train loop and the evaluation, reach >= 95% test accuracy on the CPU."""

import json
import os
import time

from configs import digits as digits_config
from data_pipeline.conversion import digits
from msff_jax.train import loop as train


def test_digits_reach_95_percent(tmp_path):
    data_dir = str(tmp_path / "digits")
    digits.write_digits_shards(data_dir, image_size=32, seed=0)
    config = digits_config.get_config()
    config.data_dir = data_dir
    start = time.monotonic()
    results = train.train_and_evaluate(config, str(tmp_path / "work"))
    elapsed = time.monotonic() - start
    on_disk = json.load(open(tmp_path / "work" / "eval_results.json"))
    assert on_disk == json.loads(json.dumps(results))
    assert results["split"] == "test"
    manifest = json.load(open(os.path.join(data_dir, "manifest.json")))
    assert results["num_examples"] == manifest["splits"]["test"]["num_examples"]
    print(f"digits: test top-1 {results['top1']:.4f}, macro-F1 {results['macro_f1']:.4f}, "
          f"{elapsed:.0f} s")
    assert results["top1"] >= 0.95, results
