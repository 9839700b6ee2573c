"""TFRecord helpers only the tests need: writing a list of records to a stream,
reading a whole file back in order, and writing a small traceable dataset. They are built on `tfrecord_format`'s framing and
checks, so the tests exercise the same code as the reader."""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import BinaryIO, Iterable, Iterator

import numpy as np
from PIL import Image

from data_pipeline.records import example_codec
from data_pipeline.records import tfrecord_format


def write_records(stream: BinaryIO, records: Iterable[bytes]) -> int:
    """Writes framed records to an open binary stream; returns how many."""
    count = 0
    for record in records:
        stream.write(tfrecord_format.frame_record(record))
        count += 1
    return count


def read_record_at(stream: BinaryIO, offset: int, length: int, *, path="<stream>", index: int = -1) -> bytes:
    """The verified data of the record whose header starts at `offset` (from
    `tfrecord_format.index_records`)."""
    stream.seek(offset + tfrecord_format.HEADER_SIZE)
    body = stream.read(length + tfrecord_format.FOOTER_SIZE)
    return tfrecord_format.check_record(body, length, path=path, index=index, offset=offset)


def read_records(path: str | os.PathLike) -> Iterator[bytes]:
    """Every record of a TFRecord file in order, both CRCs verified."""
    spans = tfrecord_format.index_records(path)
    with open(path, "rb") as stream:
        for index, (offset, length) in enumerate(spans):
            yield read_record_at(stream, offset, length, path=path, index=index)


# ------------------------------------------------------------------ a tiny dataset

NUM_EXAMPLES = 30
NUM_CLASSES = 3


def _encoded_image(example_id: int, label: int) -> bytes:
    """A flat-coloured JPEG whose red channel spells the example id (8 levels apart,
    so it survives JPEG and any crop), so batches can be traced back to records."""
    pixels = np.empty((24, 32, 3), np.uint8)
    pixels[...] = (8 * example_id, 60 * label, 128)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def example_ids(images: np.ndarray) -> list[int]:
    return [int(round(float(img[..., 0].mean()) / 8)) for img in images]


def write_dataset(data_dir, split="train", num_examples=NUM_EXAMPLES, num_shards=3, broken_image_ids=(),
                  num_classes=NUM_CLASSES):
    """Shards and manifest in the ARCHITECTURE.md format, written with the codec.
    Examples in `broken_image_ids` carry bytes that are no image (their CRCs are fine);
    with `num_classes` below NUM_CLASSES the manifest lists fewer classes than the
    records use."""
    os.makedirs(data_dir, exist_ok=True)
    shards = []
    ids = np.array_split(np.arange(num_examples), num_shards)
    for shard_index, shard_ids in enumerate(ids):
        name = f"{split}-{shard_index:05d}-of-{num_shards:05d}.tfrecord"
        records = [
            example_codec.encode_example(
                image_bytes=b"no image here" if i in broken_image_ids else _encoded_image(i, i % NUM_CLASSES),
                image_format="jpeg",
                height=24, width=32, label=i % NUM_CLASSES,
                class_text=f"class{i % NUM_CLASSES}", filename=f"img/p{i}/img_{i:08d}.jpg",
            )
            for i in shard_ids
        ]
        path = os.path.join(data_dir, name)
        with open(path, "wb") as f:
            write_records(f, records)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        shards.append({"file": name, "num_records": len(records), "sha256": digest})
    content = {
        "format_version": 1,
        "class_names": [f"class{k}" for k in range(num_classes)],
        "image_format": "jpeg",
        "splits": {split: {"num_examples": num_examples, "class_counts": [], "shards": shards}},
        "source": {"tool": "tests"},
    }
    with open(os.path.join(data_dir, "manifest.json"), "w") as f:
        json.dump(content, f)
    return content
