"""A client of an exported model that prepares images with numpy and Pillow alone,
reading every parameter from export.json's `preprocessing` block (version 3, or 2 for
an older export).

It is deliberately independent of this project: it imports neither `data_pipeline`
nor `msff_jax`, so it shows that export.json is enough to reproduce predict's pixels
(tests/test_preprocessing_parity.py runs it with those packages, OpenCV and JAX
blocked). Copy it into a serving stack that has no JAX: its output is the uint8 batch
the artifact takes.

    python tests/reference_client.py EXPORT_DIR OUT.npy IMAGE [IMAGE ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

SUPPORTED_VERSIONS = (2, 3)
_SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N")
_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def read_preprocessing(export_dir) -> dict:
    prep = json.loads((Path(export_dir) / "export.json").read_text())["preprocessing"]
    if prep.get("version") not in SUPPORTED_VERSIONS:
        raise ValueError(f"{export_dir}/export.json: preprocessing version {prep.get('version')!r}, "
                         f"this client follows versions {SUPPORTED_VERSIONS}")
    if prep["decoder"]["reduced_decode"] or not prep["resize"]["antialias"]:
        raise ValueError("this client implements full-size decoding and antialiased resizing only")
    return prep


def preprocess(path, prep: dict) -> np.ndarray:
    """uint8 (image_size, image_size, 3) RGB, following the block step by step."""
    with Image.open(path) as image:
        image.load()  # decoder: Pillow, full size, first frame
        upright = prep["version"] >= 3
        if upright and image.getexif().get(0x0112, 1) != 1:  # orientation applied first
            image = ImageOps.exif_transpose(image)
        width, height = image.size
        # color: transparency laid on white (version 3); otherwise convert('RGB'),
        # except 16-bit grey keeps its high byte.
        transparent = image.mode in _TRANSPARENT_MODES or (
            image.mode in ("P", "L", "RGB") and "transparency" in image.info)
        if upright and transparent:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        elif image.mode in _SIXTEEN_BIT_GREY:
            grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
            rgb = Image.fromarray(grey, "L").convert("RGB")
        elif image.mode in ("I", "F"):
            raise ValueError(f"{path}: pixel mode {image.mode} is refused by the preprocessing")
        else:
            rgb = image.convert("RGB")
    # crop: the centre square of the short side resized to resize_short, in float pixels.
    size, resize_short = prep["image_size"], prep["resize_short"]
    side = size * min(width, height) / resize_short
    left, top = (width - side) / 2, (height - side) / 2
    # resize: antialiased bilinear, one call, no reducing_gap.
    out = rgb.resize((size, size), Image.Resampling.BILINEAR,
                     box=(left, top, left + side, top + side), reducing_gap=None)
    return np.asarray(out, dtype=np.uint8)


def main(argv) -> int:
    export_dir, out_path, *images = argv
    prep = read_preprocessing(export_dir)
    np.save(out_path, np.stack([preprocess(path, prep) for path in images]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
