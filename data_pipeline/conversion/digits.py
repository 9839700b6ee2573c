"""Real images through the real shard format: scikit-learn's 1,797 handwritten digits.

Synthetic data can only show that the code runs; these 8x8 scans, made by people for
another purpose, show that the pipeline and the model actually learn.
They are upscaled to `image_size`, copied to three channels and stored as lossless PNG
in the same TFRecord shards and manifest the DeepFashion converter writes, so the
reader, the training loop and the evaluation run unchanged.

    msff-digits --output_dir DIR [--image_size 32] [--seed 0]
    (or python -m data_pipeline.conversion.digits ...)
"""

from __future__ import annotations

import functools
import io
import os
import sys
from typing import Optional, Sequence

import numpy as np
from absl import flags
from PIL import Image

from data_pipeline.records import example_codec
from data_pipeline.conversion import shard_writer
from data_pipeline.records.manifest import describe
from msff_jax import console

CLASS_NAMES = [str(d) for d in range(10)]
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target


def encode_digit(item: tuple[int, int]) -> shard_writer.Encoded:
    """One digit as a 3-channel PNG record; `item` is `(index into load_digits, image_size)`."""
    index, image_size = item
    images, targets = _digits()
    pixels = np.round(images[index] * (255 / 16)).astype(np.uint8)  # the scans hold 0..16
    image = Image.fromarray(pixels).resize((image_size, image_size), Image.BILINEAR).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    label = int(targets[index])
    record = example_codec.encode_example(
        image_bytes=buffer.getvalue(), image_format="png", height=image_size, width=image_size,
        label=label, class_text=CLASS_NAMES[label], filename=f"digits/{index:04d}.png")
    return shard_writer.Encoded(f"digit {index}", label, record=record)


def stratified_splits(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """70/15/15 of every class, shuffled with `seed`."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {name: [] for name in SPLIT_FRACTIONS}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_train = round(SPLIT_FRACTIONS["train"] * len(members))
        n_val = round(SPLIT_FRACTIONS["val"] * len(members))
        parts["train"] += members[:n_train].tolist()
        parts["val"] += members[n_train:n_train + n_val].tolist()
        parts["test"] += members[n_train + n_val:].tolist()
    return {name: rng.permutation(np.asarray(indices)) for name, indices in parts.items()}


def write_digits_shards(output_dir: str | os.PathLike, image_size: int = 32, seed: int = 0, *,
                        shard_size_mb: float = 1.0, progress: bool = False) -> dict:
    """Writes shards and `manifest.json` under `output_dir`; returns the manifest."""
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 (the scans are 8x8), got {image_size}")
    _, targets = _digits()
    shards = []
    for split, indices in stratified_splits(targets, seed).items():
        items = [(int(i), image_size) for i in indices]
        estimated = len(items) * (image_size * image_size + 400)
        shards += shard_writer.plan_shards(split, items, estimated, int(shard_size_mb * 2**20))
    infos, _ = shard_writer.write_shards(output_dir, shards, encode_digit, num_classes=10, options="digits",
                                         num_workers=1, progress=progress)
    source = {"tool": "data_pipeline.conversion.digits", "dataset": "sklearn.datasets.load_digits",
              "args": {"image_size": image_size, "seed": seed, "split": "70:15:15 stratified"}}
    manifest = shard_writer.build_manifest(CLASS_NAMES, "png", infos, source)
    shard_writer.write_manifest(output_dir, manifest)
    return manifest


PROGRAM = "msff-digits"

FLAGS = flags.FlagValues()
flags.DEFINE_string("output_dir", None, "Gets the shards and manifest.json.", flag_values=FLAGS)
flags.DEFINE_integer("image_size", 32, "Side in pixels (at least 8).", lower_bound=8, flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Split seed.", flag_values=FLAGS)
flags.mark_flag_as_required("output_dir", flag_values=FLAGS)
console.define_common_flags(FLAGS)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """argv without the program name; returns the exit status."""

    def body() -> int:
        manifest = write_digits_shards(FLAGS.output_dir, FLAGS.image_size, FLAGS.seed,
                                       progress=sys.stderr.isatty())
        print(f"wrote {FLAGS.output_dir}/manifest.json: {describe(manifest)}")
        return 0

    return console.run_program(FLAGS, argv, body, program=PROGRAM, doc=__doc__.split("\n\n")[0])


def run() -> None:
    """Console entry point: `msff-digits`."""
    console.entry_point(main)


if __name__ == "__main__":
    run()
