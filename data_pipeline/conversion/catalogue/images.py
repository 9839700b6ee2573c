"""One catalogue image: read and check it once, then turn it into a record.

`inspect` reads the file, decodes every pixel (a truncated or damaged file fails here,
named, and not hours into training), and measures what the split and the report need:
the SHA-256 of the bytes (exact duplicates), the perceptual hash (near-duplicates), the
size as stored, and whether the file can be stored as it is.

What is stored is the picture a person sees in an image viewer (`transforms.as_seen`,
which evaluation and predict apply to every image too), as 8-bit RGB JPEG:
- EXIF orientation applied (phones save portrait photos sideways with a rotation tag;
  training's crops read pixels as stored, so they are turned upright here);
- transparent areas laid on white, the usual background of catalogue photos (dropping
  alpha would show whatever colour the editing program left under it, often black);
- grey, palette, CMYK and 16-bit images converted to RGB (`transforms.to_rgb`).
A JPEG that needs none of this (RGB or grey, no rotation, no resize) keeps its original
bytes; anything else is re-encoded at quality 95.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import warnings
from typing import Optional

from PIL import Image

from data_pipeline.conversion import shard_writer
from data_pipeline.conversion.catalogue.perceptual_hash import dct_hash
from data_pipeline.records import example_codec
from data_pipeline.records import transforms

REENCODE_QUALITY = 95
_KEPT_JPEG_MODES = ("RGB", "L")


@dataclasses.dataclass(frozen=True)
class Inspection:
    """What reading one file found; `problem` is set (and the rest empty) when unusable."""

    problem: Optional[str] = None
    sha256: str = ""
    file_bytes: int = 0
    width: int = 0  # as stored: after orientation and any shrinking
    height: int = 0
    source_format: str = ""  # Pillow's name: JPEG, PNG, WEBP, BMP, ...
    source_mode: str = ""  # Pillow's mode: RGB, L, RGBA, P, ...
    rotated: bool = False  # had an EXIF orientation other than upright
    transparent: bool = False  # had an alpha channel or a transparent palette entry
    keep_bytes: bool = False  # stored as the original file
    phash: int = 0


def _upright_rgb(image: Image.Image, max_side: int) -> Image.Image:
    """The stored picture: as a person sees it (`transforms.as_seen`: orientation
    applied, transparency on white, RGB), shrunk so the long side is at most `max_side`
    (0: never)."""
    image = transforms.as_seen(image)
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def _decode(data: bytes) -> Image.Image:
    """Every pixel decoded; a decompression bomb (over Pillow's pixel limit) is refused
    like a broken file instead of filling memory."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()  # structure and checksums (PNG CRCs); does not decode
        image = Image.open(io.BytesIO(data))
        image.load()  # a truncated JPEG fails only here
    return image


def _decode_problem(err: Exception) -> str:
    if isinstance(err, Image.UnidentifiedImageError):
        return "not an image: no format Pillow knows"
    if isinstance(err, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
        return f"refused as a decompression bomb ({err})"
    return f"not a readable image ({type(err).__name__}: {err})"


def inspect(file: str, max_side: int = 0) -> Inspection:
    """Reads and checks one file; never raises for a bad image, it says what is wrong."""
    try:
        with open(file, "rb") as stream:
            data = stream.read()
    except FileNotFoundError:
        return Inspection(problem="file missing")
    except OSError as err:
        return Inspection(problem=f"cannot read the file ({err.strerror or err})")
    if not data:
        return Inspection(problem="empty file (0 bytes)")
    try:
        image = _decode(data)
        orientation = image.getexif().get(transforms.EXIF_ORIENTATION_TAG, 1)
        source_format, source_mode = image.format or "", image.mode
        transparent = transforms.has_transparency(image)
        stored = _upright_rgb(image, max_side)
    except Exception as err:  # Pillow raises many types for broken files
        return Inspection(problem=_decode_problem(err))
    rotated = orientation not in (1, None)
    keep = (source_format == "JPEG" and source_mode in _KEPT_JPEG_MODES and not rotated
            and not (max_side and max(image.size) > max_side))
    return Inspection(
        sha256=hashlib.sha256(data).hexdigest(), file_bytes=len(data), width=stored.width,
        height=stored.height, source_format=source_format, source_mode=source_mode, rotated=rotated,
        transparent=transparent, keep_bytes=keep, phash=dct_hash(stored))


@dataclasses.dataclass(frozen=True)
class RecordTask:
    """What the shard writer's worker needs to turn one inspected file into a record;
    its repr goes into the shard fingerprint, so a changed file (new SHA-256) or option
    rewrites the shard on a rerun."""

    file: str
    relative_path: str
    label: int
    class_name: str
    sha256: str
    keep_bytes: bool  # the original bytes, `width` x `height`, decoded once already
    width: int
    height: int
    max_side: int = 0


def encode_record(task: RecordTask) -> shard_writer.Encoded:
    """One `tf.train.Example`; the file must still be the one inspected."""

    def problem(text: str) -> shard_writer.Encoded:
        return shard_writer.Encoded(task.relative_path, task.label, problem=text)

    try:
        with open(task.file, "rb") as stream:
            data = stream.read()
    except OSError as err:
        return problem(f"cannot read the file any more ({err.strerror or err})")
    if hashlib.sha256(data).hexdigest() != task.sha256:
        return problem("the file changed while it was being converted; run the conversion again")
    if not task.keep_bytes:
        try:
            stored = _upright_rgb(_decode(data), task.max_side)
        except Exception as err:  # the same bytes decoded when inspected
            return problem(f"{_decode_problem(err)}, though it decoded when first read")
        buffer = io.BytesIO()
        stored.save(buffer, format="JPEG", quality=REENCODE_QUALITY)
        data = buffer.getvalue()
    record = example_codec.encode_example(
        image_bytes=data, image_format="jpeg", height=task.height, width=task.width, label=task.label,
        class_text=task.class_name, filename=task.relative_path)
    return shard_writer.Encoded(task.relative_path, task.label, record=record)
