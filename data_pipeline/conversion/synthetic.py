"""A miniature DeepFashion, in exactly the real on-disk format, with learnable images.

    msff-synthetic --output_dir DIR --num_images N [--seed S] [--image_size 300]
    (or python -m data_pipeline.conversion.synthetic ...)

The real benchmark cannot be downloaded by code, so the demo and the tests use this.
The files mimic the real ones down to the awkward parts: a count on line 1 and column
names on line 2, columns padded with runs of spaces, 1-based labels into the real list
of 50 categories, four categories with no images, `img_00000001.jpg` repeated in many
product folders, bounding boxes, and an official partition that spreads a product over
train, val and test.

Images are 300 px on the long side. Each category has its own garment silhouette,
colour and fabric texture, drawn at a random scale and position over a cluttered
background, so a classifier has to find the product (the paper's two difficulties:
scale variation and background clutter) but can still learn in a few CPU minutes at
32-64 px. The 15 categories the paper's protocol picks by default are the most
frequent ones here too, in the real frequency order, for `num_images >= 120`.
"""

from __future__ import annotations

import colorsys
import os
import pathlib
import zlib
from typing import Optional, Sequence

import numpy as np
from absl import flags
from PIL import Image, ImageDraw

from msff_jax import console

# The 50 categories of list_category_cloth.txt, in file order, with their types
# (1 upper-body, 2 lower-body, 3 full-body).
CATEGORIES = (
    [(n, 1) for n in ("Anorak Blazer Blouse Bomber Button-Down Cardigan Flannel Halter Henley Hoodie Jacket Jersey "
                      "Parka Peacoat Poncho Sweater Tank Tee Top Turtleneck").split()]
    + [(n, 2) for n in ("Capris Chinos Culottes Cutoffs Gauchos Jeans Jeggings Jodhpurs Joggers Leggings Sarong "
                        "Shorts Skirt Sweatpants Sweatshorts Trunks").split()]
    + [(n, 3) for n in ("Caftan Cape Coat Coverup Dress Jumpsuit Kaftan Kimono Nightdress Onesie Robe Romper "
                        "Shirtdress Sundress").split()]
)
EMPTY_CATEGORIES = ("Cape", "Nightdress", "Shirtdress", "Sundress")
# The 15 most frequent categories of the real benchmark, most frequent first.
DEFAULT_15 = ("Dress", "Tee", "Blouse", "Shorts", "Tank", "Skirt", "Cardigan", "Sweater", "Jacket", "Top",
              "Blazer", "Romper", "Jeans", "Jumpsuit", "Leggings")

# Silhouettes as polygons in a unit box (x right, y down), with the box's width/height.
_SHAPES = {
    "tee": (1.0, [(.3, 0), (.7, 0), (1, .2), (.88, .38), (.78, .3), (.78, 1), (.22, 1), (.22, .3), (.12, .38), (0, .2)]),
    "blouse": (1.0, [(.32, 0), (.68, 0), (.85, .15), (1, .75), (.86, .8), (.76, .35), (.8, 1), (.2, 1), (.24, .35),
                     (.14, .8), (0, .75), (.15, .15)]),
    "tank": (0.6, [(.2, 0), (.32, 0), (.38, .22), (.62, .22), (.68, 0), (.8, 0), (.85, .3), (.9, 1), (.1, 1), (.15, .3)]),
    "top": (1.5, [(.25, 0), (.75, 0), (1, .35), (.85, .6), (.8, .45), (.8, 1), (.2, 1), (.2, .45), (.15, .6), (0, .35)]),
    "sweater": (0.95, [(.3, 0), (.7, 0), (.95, .1), (1, .95), (.85, .95), (.78, .3), (.78, 1), (.22, 1), (.22, .3),
                       (.15, .95), (0, .95), (.05, .1)]),
    "dress": (0.6, [(.35, 0), (.65, 0), (.68, .35), (1, 1), (0, 1), (.32, .35)]),
    "romper": (0.8, [(.3, 0), (.7, 0), (.72, .55), (.85, 1), (.55, 1), (.5, .75), (.45, 1), (.15, 1), (.28, .55)]),
    "jumpsuit": (0.45, [(.25, 0), (.75, 0), (.72, .4), (.8, 1), (.56, 1), (.5, .5), (.44, 1), (.2, 1), (.28, .4)]),
    "shorts": (1.2, [(0, 0), (1, 0), (1, .9), (.58, 1), (.5, .45), (.42, 1), (0, .9)]),
    "jeans": (0.5, [(.1, 0), (.9, 0), (.95, 1), (.58, 1), (.5, .3), (.42, 1), (.05, 1)]),
    "leggings": (0.35, [(.15, 0), (.85, 0), (.7, 1), (.56, 1), (.5, .3), (.44, 1), (.3, 1)]),
    "skirt": (1.0, [(.3, 0), (.7, 0), (1, 1), (0, 1)]),
}
_TEXTURES = ("plain", "hstripes", "vstripes", "dots", "checks", "diagonal")
_DETAILS = ("none", "buttons", "zip", "lapels")
# (shape, hue in [0, 1), texture, detail) for the default 15; hues 1/15 apart, shuffled
# so that similar silhouettes get distant colours.
_DEFAULT_STYLES = {
    "Dress": ("dress", 0 / 15, "plain", "none"),
    "Tee": ("tee", 8 / 15, "plain", "none"),
    "Blouse": ("blouse", 3 / 15, "dots", "none"),
    "Shorts": ("shorts", 11 / 15, "plain", "none"),
    "Tank": ("tank", 6 / 15, "hstripes", "none"),
    "Skirt": ("skirt", 13 / 15, "checks", "none"),
    "Cardigan": ("sweater", 1 / 15, "vstripes", "buttons"),
    "Sweater": ("sweater", 9 / 15, "hstripes", "none"),
    "Jacket": ("sweater", 4 / 15, "plain", "zip"),
    "Top": ("top", 14 / 15, "diagonal", "none"),
    "Blazer": ("sweater", 12 / 15, "plain", "lapels"),
    "Romper": ("romper", 7 / 15, "dots", "none"),
    "Jeans": ("jeans", 10 / 15, "vstripes", "none"),
    "Jumpsuit": ("jumpsuit", 2 / 15, "checks", "none"),
    "Leggings": ("leggings", 5 / 15, "plain", "none"),
}
_WORDS = ("Sheer Pleated-Front Floral Striped Classic Cropped Relaxed Slim Lace-Trimmed Knit Boxy Ruffled Denim "
          "Hooded Belted Printed Embroidered Longline Drapey Fitted Chiffon Cotton Quilted Mesh Satin Tie-Front "
          "Wrap Open-Front Zippered Textured").split()
_SIZES = ((300, 300), (205, 300), (225, 300), (300, 240), (300, 200), (240, 300))


def _style(name: str, kind: int) -> tuple[str, float, str, str]:
    if name in _DEFAULT_STYLES:
        return _DEFAULT_STYLES[name]
    h = zlib.crc32(name.encode())
    shapes = {1: ("tee", "sweater", "blouse", "top", "tank"), 2: ("jeans", "shorts", "skirt", "leggings"),
              3: ("dress", "romper", "jumpsuit")}[kind]
    return shapes[h % len(shapes)], (h >> 8) % 360 / 360, _TEXTURES[(h >> 16) % 6], _DETAILS[(h >> 20) % 4]


def category_counts(num_images: int, rng: np.random.Generator) -> dict[str, int]:
    """Images per category: the default 15 strictly in their real frequency order (from
    120 images up), a tenth of the images (from 150 up) spread thinly over the others."""
    num_other = num_images // 10 if num_images >= 150 else 0
    num_top = num_images - num_other
    step = max(1, num_top // 1000) if num_top >= 120 else 0
    extras = [(14 - i) * step for i in range(15)]
    base, remainder = divmod(num_top - sum(extras), 15)
    counts = {name: base + extra + (i < remainder) for i, (name, extra) in enumerate(zip(DEFAULT_15, extras))}
    others = [n for n, _ in CATEGORIES if n not in DEFAULT_15 and n not in EMPTY_CATEGORIES]
    others = [others[i] for i in rng.permutation(len(others))]
    for name in others:
        counts[name] = 0
    for i in range(num_other):
        counts[others[i % len(others)]] += 1
    return counts


def _color(hue: float, rng: np.random.Generator, jitter: float = 0.02) -> tuple[int, int, int]:
    h = (hue + rng.uniform(-jitter, jitter)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(0.55, 0.95), rng.uniform(0.55, 0.95))
    return int(r * 255), int(g * 255), int(b * 255)


def _clutter(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A busy background: a tinted gradient, then boxes, blobs and lines of low saturation."""
    width, height = size
    top, bottom = rng.integers(90, 235, size=(2, 3))
    t = np.linspace(0, 1, height)[:, None, None]
    gradient = (top * (1 - t) + bottom * t).astype(np.uint8)
    canvas = Image.fromarray(np.broadcast_to(gradient, (height, width, 3)).copy())
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(6, 16))):
        r, g, b = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.45), rng.uniform(0.3, 1.0))
        fill = (int(r * 255), int(g * 255), int(b * 255))
        x, y = rng.uniform(-0.2, 1.0, size=2) * (width, height)
        w, h = rng.uniform(0.05, 0.45, size=2) * (width, height)
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle([x, y, x + w, y + h], fill=fill)
        elif kind == 1:
            draw.ellipse([x, y, x + w, y + h], fill=fill)
        else:
            draw.line([x, y, x + w, y + h], fill=fill, width=int(rng.integers(2, 9)))
    return canvas


def _texture(size: tuple[int, int], base, accent, texture: str, period: int) -> Image.Image:
    layer = Image.new("RGB", size, base)
    draw = ImageDraw.Draw(layer)
    width, height = size
    half = max(1, period // 2)
    if texture == "hstripes":
        for y in range(0, height, period):
            draw.rectangle([0, y, width, y + half - 1], fill=accent)
    elif texture == "vstripes":
        for x in range(0, width, period):
            draw.rectangle([x, 0, x + half - 1, height], fill=accent)
    elif texture == "checks":
        for y in range(0, height, period):
            for x in range((y // period % 2) * period, width, 2 * period):
                draw.rectangle([x, y, x + period - 1, y + period - 1], fill=accent)
    elif texture == "dots":
        for y in range(half, height, period):
            for x in range(half, width, period):
                draw.ellipse([x - half / 2, y - half / 2, x + half / 2, y + half / 2], fill=accent)
    elif texture == "diagonal":
        for d in range(-height, width, period):
            draw.line([d, 0, d + height, height], fill=accent, width=half)
    return layer


def _draw_product(canvas: Image.Image, style, product: dict, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Draws one garment; returns its bounding box (x1, y1, x2, y2) in pixels."""
    shape, _, texture, detail = style
    aspect, polygon = _SHAPES[shape]
    width, height = canvas.size
    box_h = rng.uniform(0.35, 0.92) * height
    box_w = box_h * aspect * rng.uniform(0.9, 1.1)
    if box_w > 0.95 * width:
        box_h *= 0.95 * width / box_w
        box_w = 0.95 * width
    x0 = rng.uniform(0, width - box_w)
    y0 = rng.uniform(0, height - box_h)
    w, h = max(2, int(box_w)), max(2, int(box_h))
    points = [(x * (w - 1), y * (h - 1)) for x, y in polygon]
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)
    layer = _texture((w, h), product["base"], product["accent"], texture, max(4, int(h * product["period"])))
    detail_draw = ImageDraw.Draw(layer)
    if detail == "buttons":
        for y in np.linspace(0.12, 0.9, 5) * h:
            detail_draw.ellipse([w / 2 - h / 40 - 1, y - h / 40 - 1, w / 2 + h / 40 + 1, y + h / 40 + 1], fill=(245, 245, 235))
    elif detail == "zip":
        detail_draw.line([w / 2, 0, w / 2, h], fill=(30, 30, 30), width=max(2, w // 30))
    elif detail == "lapels":
        detail_draw.polygon([(w * .3, 0), (w / 2, h * .45), (w * .7, 0)], fill=(240, 240, 240))
    left, top = int(x0), int(y0)
    canvas.paste(layer, (left, top), mask)
    ImageDraw.Draw(canvas).polygon([(x + left, y + top) for x, y in points], outline=product["outline"])
    return left, top, min(width - 1, left + w - 1), min(height - 1, top + h - 1)


def _write_list(path: pathlib.Path, header: str, rows: Sequence[Sequence[str]], widths: Sequence[int]) -> None:
    """A list file in the real layout: count, column names, rows padded to fixed widths."""
    lines = [str(len(rows)), header]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths)] + [row[-1]]
        lines.append("".join(cells))
    path.write_text("\n".join(lines) + "\n")


def generate(output_dir: str | os.PathLike, num_images: int, seed: int = 0, *, image_size: int = 300,
             annotation_dir: str = "Anno") -> pathlib.Path:
    """Writes the miniature under `output_dir` (which gets Anno/, Eval/, Img/) and returns it.

    `image_size` is the long side in pixels (300 like the real images; smaller is faster).
    `annotation_dir` may be "Anno_coarse", the name newer releases use.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    sizes = [(round(w * image_size / 300), round(h * image_size / 300)) for w, h in _SIZES]
    root = pathlib.Path(output_dir)
    rng = np.random.default_rng(seed)
    counts = category_counts(num_images, rng)
    (root / annotation_dir).mkdir(parents=True, exist_ok=True)
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    labels, partitions, boxes = [], [], []
    used_folders: set[str] = set()
    for label, (name, kind) in enumerate(CATEGORIES, start=1):
        style = _style(name, kind)
        remaining = counts.get(name, 0)
        while remaining:
            words = rng.choice(len(_WORDS), size=2, replace=False)
            folder = f"{_WORDS[words[0]]}_{_WORDS[words[1]]}_{name}"
            suffix = 2
            while folder in used_folders:
                folder, suffix = f"{_WORDS[words[0]]}_{_WORDS[words[1]]}_No{suffix}_{name}", suffix + 1
            used_folders.add(folder)
            (root / "Img" / "img" / folder).mkdir(parents=True, exist_ok=True)
            product = {
                "base": _color(style[1], rng), "accent": _color(style[1] + 0.5, rng, 0.05),
                "outline": tuple(int(c) for c in rng.integers(0, 60, size=3)), "period": rng.uniform(0.06, 0.12),
            }
            for number in range(1, min(remaining, int(rng.integers(1, 7))) + 1):
                relative = f"img/{folder}/img_{number:08d}.jpg"
                canvas = _clutter(sizes[rng.integers(len(sizes))], rng)
                box = _draw_product(canvas, style, product, rng)
                canvas.save(root / "Img" / relative, format="JPEG", quality=90)
                labels.append((relative, str(label)))
                partitions.append((relative, str(rng.choice(["train", "val", "test"], p=[0.7, 0.15, 0.15]))))
                boxes.append((relative, *(f"{v:03d}" for v in box)))
                remaining -= 1
    width = max(len(r[0]) for r in labels) + 4
    _write_list(root / annotation_dir / "list_category_cloth.txt", "category_name  category_type",
                [(n, str(k)) for n, k in CATEGORIES], [28])
    _write_list(root / annotation_dir / "list_category_img.txt", "image_name  category_label", labels, [width])
    _write_list(root / "Eval" / "list_eval_partition.txt", "image_name  evaluation_status", partitions, [width])
    _write_list(root / annotation_dir / "list_bbox.txt", "image_name  x_1  y_1  x_2  y_2", boxes,
                [width, 4, 4, 4])
    return root


PROGRAM = "msff-synthetic"

FLAGS = flags.FlagValues()
flags.DEFINE_string("output_dir", None, "Gets Anno/, Eval/ and Img/.", flag_values=FLAGS)
flags.DEFINE_integer("num_images", None, "How many images.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=FLAGS)
flags.DEFINE_integer("image_size", 300, "Long side in pixels (real images: 300).", lower_bound=8,
                     flag_values=FLAGS)
flags.mark_flags_as_required(["output_dir", "num_images"], flag_values=FLAGS)
console.define_common_flags(FLAGS)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """argv without the program name; returns the exit status."""

    def body() -> int:
        root = generate(FLAGS.output_dir, FLAGS.num_images, FLAGS.seed, image_size=FLAGS.image_size)
        print(f"wrote a synthetic DeepFashion of {FLAGS.num_images} images to {root}")
        return 0

    return console.run_program(FLAGS, argv, body, program=PROGRAM, doc=__doc__.split("\n\n")[0])


def run() -> None:
    """Console entry point: `msff-synthetic`."""
    console.entry_point(main)


if __name__ == "__main__":
    run()
