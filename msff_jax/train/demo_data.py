"""Data for the demo: a synthetic DeepFashion miniature, converted to shards.

`configs/demo.py` sets `config.demo`; launch.py then calls `prepare_data` before
training, so `python launch.py --config configs/demo.py --workdir DIR` needs nothing but a
fresh install. The raw miniature goes to DIR/data/deepfashion (the real benchmark's file
layout, made by data_pipeline.conversion.synthetic) and the shards to DIR/data/shards, through the
same converter real data takes. A rerun finds the manifest and skips both.
"""

from __future__ import annotations

import os

from absl import logging


def prepare_data(config, workdir: str) -> str:
    """Generates and converts the miniature unless already there; sets `config.data_dir`."""
    from data_pipeline.conversion import deepfashion
    from data_pipeline.conversion import synthetic

    data_root = os.path.join(os.path.abspath(workdir), "data")
    shards_dir = config.data_dir or os.path.join(data_root, "shards")
    config.data_dir = shards_dir
    if os.path.isfile(os.path.join(shards_dir, "manifest.json")):
        logging.info("demo data already in %s", shards_dir)
        return shards_dir
    raw_dir = os.path.join(data_root, "deepfashion")
    logging.info("generating %d synthetic DeepFashion images in %s", config.demo.num_generated, raw_dir)
    synthetic.generate(raw_dir, config.demo.num_generated, seed=config.demo.seed)
    logging.info("converting them to shards in %s", shards_dir)
    deepfashion.convert(raw_dir, shards_dir, max_images=config.demo.num_images,
                        resize_to=config.demo.resize_to, seed=config.demo.seed, progress=False,
                        num_workers=config.demo.convert_workers)
    return shards_dir
