"""Converts the DeepFashion Category benchmark into TFRecord shards and a manifest.

    msff-convert --deepfashion_dir DIR --output_dir OUT
    (or python -m data_pipeline.conversion.deepfashion ...; --help lists the flags)

DIR holds `Anno/` (or `Anno_coarse/`), `Eval/` and `Img/` as downloaded by hand from
the DeepFashion site. The defaults reproduce our reading of the paper's protocol: the
15 most frequent categories, 50,000 images drawn class-balanced, an 8:1:1 split grouped
by product folder. Records keep the original JPEG bytes unless a crop or resize is
asked for. Every listed image is fully decoded once, so a broken file fails here, named
with its annotation line, and not hours into training.
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
from typing import Optional, Sequence

from absl import flags
from PIL import Image

from data_pipeline.records import example_codec
from data_pipeline.records.manifest import describe
from msff_jax import console
from data_pipeline.conversion import selection
from data_pipeline.conversion import shard_writer
from data_pipeline.conversion.annotations import load_annotations

_REENCODE_QUALITY = 95


@dataclasses.dataclass(frozen=True)
class ImageTask:
    """Everything a worker needs to turn one listed image into one record."""

    file: str  # absolute path on disk
    relative_path: str  # as in the list files, stored as image/filename
    label: int
    class_name: str
    source: str  # annotation file and line, for messages
    bbox: Optional[tuple[int, int, int, int]] = None
    bbox_margin: float = 0.0
    resize_to: int = 0  # long side in pixels, 0 keeps the size


def _crop_box(bbox, margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = bbox
    dx, dy = margin * (x2 - x1), margin * (y2 - y1)
    box = (max(0, round(x1 - dx)), max(0, round(y1 - dy)), min(width, round(x2 + dx)), min(height, round(y2 + dy)))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"bounding box {bbox} lies outside the {width}x{height} image")
    return box


def encode_image_task(task: ImageTask) -> shard_writer.Encoded:
    """Reads, fully decodes and (if asked) crops or resizes one image; never raises for a
    bad image, it reports the problem so the writer can apply the user's policy."""
    description = f"{task.relative_path} ({task.source})"

    def problem(text: str) -> shard_writer.Encoded:
        return shard_writer.Encoded(description, task.label, problem=text)

    try:
        with open(task.file, "rb") as stream:
            data = stream.read()
    except FileNotFoundError:
        return problem(f"image file missing: {task.file}")
    except OSError as err:
        return problem(f"cannot read {task.file}: {err}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        image = Image.open(io.BytesIO(data))
        image.load()  # verify() does not decode pixels; a truncated JPEG fails only here
        image_format = (image.format or "").lower()
    except Exception as err:  # PIL raises many types for broken files
        return problem(f"not a readable image ({type(err).__name__}: {err})")
    width, height = image.size
    try:
        if task.bbox is not None:
            image = image.crop(_crop_box(task.bbox, task.bbox_margin, width, height))
    except ValueError as err:
        return problem(str(err))
    if task.resize_to and max(image.size) != task.resize_to:
        scale = task.resize_to / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    if task.bbox is not None or task.resize_to or image_format != "jpeg":
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=_REENCODE_QUALITY)
        data = buffer.getvalue()
    record = example_codec.encode_example(
        image_bytes=data, image_format="jpeg", height=image.height, width=image.width,
        label=task.label, class_text=task.class_name, filename=task.relative_path)
    return shard_writer.Encoded(description, task.label, record=record)


def _estimated_bytes(tasks: Sequence[ImageTask]) -> int:
    total = 0
    for task in tasks:
        try:
            size = os.path.getsize(task.file)
        except OSError:
            size = 0  # reported properly when the worker reads it
        if task.resize_to:
            size = size * min(4.0, (task.resize_to / 300) ** 2)
        total += int(size) + 300  # framing and the other features
    return total


def convert(
    deepfashion_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    categories: Optional[Sequence[str]] = None,
    max_images: int = 50000,
    sampling: str = "balanced",
    split: str = "8:1:1",
    seed: int = 0,
    crop_to_bbox: bool = False,
    bbox_margin: float = 0.1,
    resize_to: int = 0,
    shard_size_mb: float = 128,
    on_bad_image: str = "error",
    num_workers: Optional[int] = None,
    progress: bool = True,
) -> dict:
    """Converts, writes `output_dir/manifest.json` last, and returns the manifest."""
    arguments = dict(
        categories=list(categories) if categories else None, max_images=max_images, sampling=sampling, split=split,
        seed=seed, crop_to_bbox=crop_to_bbox, bbox_margin=bbox_margin if crop_to_bbox else None,
        resize_to=resize_to, shard_size_mb=shard_size_mb, on_bad_image=on_bad_image)
    annotations = load_annotations(deepfashion_dir, need_partition=split == "official", need_bboxes=crop_to_bbox)
    class_names, selected = selection.select(
        annotations, categories=categories, max_images=max_images, sampling=sampling, split=split, seed=seed)
    shards = []
    for split_name in selection.SPLITS:
        tasks = [
            ImageTask(
                file=str(annotations.image_file(s.image.path)), relative_path=s.image.path, label=s.label,
                class_name=s.class_name, source=str(s.image.source),
                bbox=_bbox_tuple(annotations, s.image.path) if crop_to_bbox else None,
                bbox_margin=bbox_margin if crop_to_bbox else 0.0, resize_to=resize_to)
            for s in selected if s.split == split_name
        ]
        shards += shard_writer.plan_shards(split_name, tasks, _estimated_bytes(tasks), int(shard_size_mb * 2**20))
    infos, skipped = shard_writer.write_shards(
        output_dir, shards, encode_image_task, num_classes=len(class_names),
        options=f"deepfashion|{os.path.abspath(deepfashion_dir)}", on_bad_image=on_bad_image,
        num_workers=num_workers, progress=progress)
    source = {
        "tool": "data_pipeline.conversion.deepfashion",
        "deepfashion_dir": os.path.abspath(deepfashion_dir),
        "annotation_dir": annotations.annotation_dir,
        "args": arguments,
        "num_selected": len(selected),
        "num_skipped": len(skipped),
        "skipped": skipped,
    }
    manifest = shard_writer.build_manifest(class_names, "jpeg", infos, source)
    shard_writer.write_manifest(output_dir, manifest)
    if skipped:
        print(f"skipped {len(skipped)} bad image(s) of {len(selected)}; listed in {output_dir}/manifest.json "
              "under source.skipped", file=sys.stderr)
    return manifest


def _bbox_tuple(annotations, path: str) -> tuple[int, int, int, int]:
    box = annotations.bboxes.get(path)
    if box is None:
        raise selection.SelectionError(f"{path} has no bounding box in {annotations.annotation_dir}/list_bbox.txt")
    return (box.x1, box.y1, box.x2, box.y2)


PROGRAM = "msff-convert"

# Its own FlagValues: the converters' flags never clash with each other's in one process.
FLAGS = flags.FlagValues()
flags.DEFINE_string("deepfashion_dir", None, "Folder holding Anno/ (or Anno_coarse/), Eval/, Img/.",
                    flag_values=FLAGS)
flags.DEFINE_string("output_dir", None, "Gets the shards and manifest.json; shard-named files of "
                    "other runs there are replaced.", flag_values=FLAGS)
flags.DEFINE_string("categories", None, "Comma-separated category names, in label order "
                    "(default: the 15 most frequent).", flag_values=FLAGS)
flags.DEFINE_integer("max_images", 50000, "Total images; 0: all with proportional sampling, as "
                     "many as balance allows with balanced.", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_enum("sampling", "balanced", ("balanced", "proportional"), "balanced: equal images "
                  "per class (error if one lacks them); proportional: as in the data.",
                  flag_values=FLAGS)
flags.DEFINE_string("split", "8:1:1", "train:val:test ratios grouped by product folder, or "
                    "'official'.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Sampling and split seed.", flag_values=FLAGS)
flags.DEFINE_bool("crop_to_bbox", False, "Crop to list_bbox.txt's box (re-encodes JPEG).",
                  flag_values=FLAGS)
flags.DEFINE_float("bbox_margin", 0.1, "Margin around the box, fraction of its size.",
                   flag_values=FLAGS)
flags.DEFINE_integer("resize_to", 0, "Resize so the long side is N px (re-encodes JPEG).",
                     lower_bound=0, flag_values=FLAGS)
flags.DEFINE_float("shard_size_mb", 128, "Target shard size.", lower_bound=0.001, flag_values=FLAGS)
flags.DEFINE_enum("on_bad_image", "error", ("error", "skip"), "skip: leave out missing or broken "
                  "images, count them and list them in the manifest.", flag_values=FLAGS)
flags.DEFINE_integer("num_workers", None, "Image workers (default: every core).", lower_bound=1,
                     flag_values=FLAGS)
flags.mark_flags_as_required(["deepfashion_dir", "output_dir"], flag_values=FLAGS)
console.define_common_flags(FLAGS)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """argv without the program name; returns the exit status (a mistake in the data or
    the flags is one `error:` line)."""

    def body() -> int:
        try:
            manifest = convert(
                FLAGS.deepfashion_dir, FLAGS.output_dir,
                categories=([c.strip() for c in FLAGS.categories.split(",") if c.strip()]
                            if FLAGS.categories else None),
                max_images=FLAGS.max_images, sampling=FLAGS.sampling, split=FLAGS.split,
                seed=FLAGS.seed, crop_to_bbox=FLAGS.crop_to_bbox, bbox_margin=FLAGS.bbox_margin,
                resize_to=FLAGS.resize_to, shard_size_mb=FLAGS.shard_size_mb,
                on_bad_image=FLAGS.on_bad_image, num_workers=FLAGS.num_workers,
                progress=sys.stderr.isatty())
        except ValueError as err:  # AnnotationError, SelectionError, BadImageError
            raise console.UserError(str(err)) from err
        print(f"wrote {FLAGS.output_dir}/manifest.json: {describe(manifest)}")
        return 0

    return console.run_program(FLAGS, argv, body, program=PROGRAM, doc=__doc__.split("\n\n")[0])


def run() -> None:
    """Console entry point: `msff-convert`."""
    console.entry_point(main)


if __name__ == "__main__":
    run()
