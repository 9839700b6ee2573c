"""A product catalogue made on the fly, with the truth about it kept beside.

`make_catalogue(root)` writes `ROOT/<class>/<product>/<view>.<ext>` (products with
several views) and `ROOT/<class>/<file>` (single photos): 15 classes of uneven size,
JPEG, PNG, WebP and BMP files (some with upper-case extensions), grey, RGBA, palette and
EXIF-rotated images among them, exact duplicates (the same bytes under another name, in
another product or class), near-duplicates (a photo resized and re-encoded), a few broken
files, a text file and a hidden file. It returns a `Truth` that the tests compare the
converter's report with.

    python tests/catalogue_data.py OUT_DIR   # the data behind docs/GUIDE.md's sample report
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import sys

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ("backpack", "belt", "blouse", "boots", "cap", "dress", "gloves", "handbag",
               "jeans", "scarf", "sneakers", "socks", "sunglasses", "tee", "watch")
# Products per class: uneven, from 3 (the least a three-way split needs) to 14.
PRODUCTS_PER_CLASS = (14, 3, 9, 6, 4, 12, 3, 8, 10, 5, 7, 4, 3, 11, 6)


@dataclasses.dataclass
class Truth:
    """What the catalogue holds, by path relative to the root (posix)."""

    images: dict = dataclasses.field(default_factory=dict)  # usable image -> class
    groups: dict = dataclasses.field(default_factory=dict)  # usable image -> product folder or None
    broken: dict = dataclasses.field(default_factory=dict)  # broken file -> what is wrong
    ignored: list = dataclasses.field(default_factory=list)  # not images (by extension) or hidden
    exact_duplicates: list = dataclasses.field(default_factory=list)  # sets of paths, same bytes
    near_duplicates: list = dataclasses.field(default_factory=list)  # (original, resized copy)
    rotated: dict = dataclasses.field(default_factory=dict)  # path -> the upright picture (RGB array)
    transparent: list = dataclasses.field(default_factory=list)

    def class_counts(self) -> dict:
        counts = dict.fromkeys(CLASS_NAMES, 0)
        for name in self.images.values():
            counts[name] += 1
        return counts


def product_picture(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A made-up product photo: coloured shapes on a plain background, each product's
    arrangement its own, so distinct photos are far apart in the perceptual hash."""
    background = tuple(int(v) for v in rng.integers(150, 256, 3))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    width, height = size
    for _ in range(int(rng.integers(4, 8))):
        x0, y0 = rng.uniform(0, 0.7) * width, rng.uniform(0, 0.7) * height
        x1, y1 = x0 + rng.uniform(0.2, 0.6) * width, y0 + rng.uniform(0.2, 0.6) * height
        colour = tuple(int(v) for v in rng.integers(0, 200, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    return image


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _write(root: str, relative: str, data: bytes) -> None:
    path = os.path.join(root, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


# Formats in rotation; the special kinds each appear a few times.
_FORMATS = (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("JPG", "JPEG"), ("jpeg", "JPEG"),
            ("bmp", "BMP"), ("jpg", "JPEG"), ("PNG", "PNG"))


def _photo_bytes(rng, kind: str, ext_format: tuple[str, str], truth: Truth, relative: str) -> bytes:
    width, height = int(rng.integers(48, 112)), int(rng.integers(48, 112))
    picture = product_picture(rng, (width, height))
    ext, fmt = ext_format
    if kind == "grey":
        return _encode(picture.convert("L"), "JPEG", quality=90)
    if kind == "rgba":
        # A transparent band at the top over black pixels, as editing programs often
        # leave them: on white it must come out white, with alpha dropped it would be black.
        rgba = np.dstack([np.asarray(picture), np.full((height, width), 255, np.uint8)])
        rgba[: height // 4] = 0
        truth.transparent.append(relative)
        return _encode(Image.fromarray(rgba, "RGBA"), "PNG")
    if kind == "palette":
        return _encode(picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "PNG")
    if kind == "rotated":
        # Stored sideways with orientation 6 ("rotate 90 degrees clockwise to view").
        exif = Image.Exif()
        exif[0x0112] = 6
        truth.rotated[relative] = np.asarray(picture)
        return _encode(picture.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=exif.tobytes())
    return _encode(picture, fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def make_catalogue(root: str | os.PathLike, seed: int = 0) -> Truth:
    """Writes the catalogue under `root` (which must not exist yet) and returns its truth."""
    root = os.fspath(root)
    os.makedirs(root)
    rng = np.random.default_rng(seed)
    truth = Truth()
    special = ["grey", "rgba", "palette", "rotated"] * 3
    counter = 0
    for class_name, num_products in zip(CLASS_NAMES, PRODUCTS_PER_CLASS):
        for product in range(num_products):
            views = int(rng.integers(1, 5))
            for view in range(views):
                ext_format = _FORMATS[counter % len(_FORMATS)]
                kind = special.pop() if special and counter % 7 == 3 else "plain"
                ext = "jpg" if kind in ("grey", "rotated") else "png" if kind in ("rgba", "palette") else ext_format[0]
                if views > 1:
                    relative = f"{class_name}/item{product:02d}/view{view}.{ext}"
                    group = f"{class_name}/item{product:02d}"
                else:
                    relative = f"{class_name}/photo{product:02d}.{ext}"
                    group = None
                _write(root, relative, _photo_bytes(rng, kind, ext_format, truth, relative))
                truth.images[relative], truth.groups[relative] = class_name, group
                counter += 1
    _add_duplicates(root, truth, rng)
    _add_broken_and_ignored(root, truth)
    return truth


def _add_duplicates(root: str, truth: Truth, rng) -> None:
    """Exact copies in another product or class; resized re-encoded copies as single photos."""
    plain = sorted(p for p in truth.images if p not in truth.rotated and p not in truth.transparent)
    picks = [plain[i] for i in rng.choice(len(plain), 6, replace=False)]
    # Two copies within the class (another single photo), one in another class (a
    # mislabelled copy, which the report must show with both classes).
    for number, original in enumerate(picks[:3]):
        class_name = truth.images[original] if number < 2 else CLASS_NAMES[
            (CLASS_NAMES.index(truth.images[original]) + 1) % len(CLASS_NAMES)]
        copy = f"{class_name}/copy{number}{os.path.splitext(original)[1]}"
        shutil.copyfile(os.path.join(root, original), os.path.join(root, copy))
        truth.images[copy], truth.groups[copy] = class_name, None
        truth.exact_duplicates.append({original, copy})
    for number, original in enumerate(picks[3:]):
        with Image.open(os.path.join(root, original)) as image:
            image = image.convert("RGB")
            smaller = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.BILINEAR)
        copy = f"{truth.images[original]}/resized{number}.jpg"
        _write(root, copy, _encode(smaller, "JPEG", quality=70))
        truth.images[copy], truth.groups[copy] = truth.images[original], None
        truth.near_duplicates.append((original, copy))


def _add_broken_and_ignored(root: str, truth: Truth) -> None:
    first = next(p for p in sorted(truth.images) if p.lower().endswith(".jpg") and p not in truth.rotated)
    with open(os.path.join(root, first), "rb") as f:
        jpeg = f.read()
    broken = {
        "dress/truncated.jpg": (jpeg[: len(jpeg) // 2], "not a readable image"),
        "tee/not_an_image.png": (b"this is a text file with an image name\n", "not an image"),
        "boots/empty.webp": (b"", "empty file"),
    }
    for relative, (data, problem) in broken.items():
        _write(root, relative, data)
        truth.broken[relative] = problem
    for relative in ("dress/notes.txt", "tee/.DS_Store"):
        _write(root, relative, b"not an image")
        truth.ignored.append(relative)


if __name__ == "__main__":
    made = make_catalogue(sys.argv[1])
    print(f"{sys.argv[1]}: {len(made.images)} images in {len(CLASS_NAMES)} classes, "
          f"{len(made.broken)} broken files")
