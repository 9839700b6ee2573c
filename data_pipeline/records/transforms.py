"""Image ops of the input pipeline, one per function, on encoded bytes and uint8 arrays.

Images stay uint8 from decode to device (4x less host memory and transfer than float32);
the trainer normalises on the device.

Two crops, with different goals:
- Training (`decode_and_random_resized_crop`) is built for throughput. The crop window
  comes from the image size in the header alone (`header_size`, or PIL's lazy
  `Image.open`), then the image is decoded *reduced*: libjpeg decodes at 1/2, 1/4 or 1/8
  scale whenever the crop is at least twice the output size. Two backends do the pixel
  work: `cv2` (OpenCV `imdecode` with `IMREAD_REDUCED_*`, simplejpeg for full-size JPEGs
  when installed, bilinear `resize` without antialiasing; about half the CPU of `pil`,
  see BENCHMARKS.md) and `pil` (Pillow `draft` + antialiased `resize`). They differ by
  a few grey levels, which a random crop never notices.
- Evaluation and serving (`decode_resize_center_crop`) are exact instead: ONE
  computation, used by evaluation during training, `--mode eval` and predict, with no
  backend and no reduced decoding, written so that numpy and Pillow alone reproduce it
  bit for bit from the description `eval_preprocessing_spec` puts in export.json:
  Pillow full-size decode, the picture as a person sees it (`as_seen`: EXIF
  orientation applied, transparency on white, `convert("RGB")`, 16-bit grey by its
  high byte), antialiased bilinear `Image.resize` of an unrounded float crop box. On
  the DeepFashion sizes (about 300 px to 224) no reduced decode applied anyway, so
  exactness costs little.

Training's crops read pixels as stored (the crop window comes from the header's size,
as with TensorFlow's decoders). The converters store what training should see: the
catalogue converter stores every picture upright and opaque (`as_seen`), so training
and evaluation see the same picture; DeepFashion's images are stored as given (their
boxes are in stored pixels), so one carrying an EXIF rotation tag, if any, is cropped
as stored in training and shown upright in evaluation. Both decode PNG and other
formats at full size.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageOps

try:
    import cv2
except ImportError:  # OpenCV is optional; Pillow does the same work more slowly.
    cv2 = None
else:
    # Parallelism comes from the reader's workers; OpenCV's own thread pool would only
    # oversubscribe the cores.
    cv2.setNumThreads(1)

try:
    import simplejpeg
except ImportError:  # Optional: OpenCV decodes the same pixels, with more CPU.
    simplejpeg = None

DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
EVAL_CROP_FRACTION = 0.875
_CROP_ATTEMPTS = 10
BACKENDS = ("cv2", "pil")
DEFAULT_BACKEND = "cv2" if cv2 is not None else "pil"

Box = tuple[float, float, float, float]  # left, top, right, bottom in pixels


def open_image(image_bytes: bytes) -> Image.Image:
    """Opens encoded bytes lazily (header only); raises ValueError for non-images."""
    try:
        return Image.open(io.BytesIO(image_bytes))
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
        raise ValueError(f"cannot decode image ({len(image_bytes)} bytes): {err}") from err


_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # not DHT, JPG, DAC
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def header_size(image_bytes: bytes) -> tuple[int, int] | None:
    """`(width, height)` read from a JPEG's SOF segment or a PNG's IHDR without decoding
    (microseconds, where `Image.open` takes a fraction of a millisecond); None when the
    header is not one of those or is damaged, so the caller falls back to PIL."""
    if image_bytes[:8] == _PNG_SIGNATURE and image_bytes[12:16] == b"IHDR":
        width, height = int.from_bytes(image_bytes[16:20], "big"), int.from_bytes(image_bytes[20:24], "big")
        return (width, height) if width and height else None
    if image_bytes[:2] != b"\xff\xd8":
        return None
    pos, end = 2, len(image_bytes)
    while pos + 4 <= end:
        if image_bytes[pos] != 0xFF:
            return None
        marker = image_bytes[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # stand-alone markers carry no length
            pos += 2
            continue
        length = int.from_bytes(image_bytes[pos + 2:pos + 4], "big")
        if marker in _JPEG_SOF_MARKERS:
            if pos + 9 > end:
                return None
            height = int.from_bytes(image_bytes[pos + 5:pos + 7], "big")
            width = int.from_bytes(image_bytes[pos + 7:pos + 9], "big")
            return (width, height) if width and height else None
        if marker == 0xDA or length < 2:  # scan data before any frame header: malformed
            return None
        pos += 2 + length
    return None


def sample_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
) -> Box:
    """An Inception-style random crop: area fraction in `scale`, aspect ratio (w/h)
    log-uniform in `ratio`. Falls back to the largest centred crop within `ratio`."""
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return (left, top, left + w, top + h)
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return (left, top, left + w, top + h)


def _reduction(full_size: tuple[int, int], box: Box, size: int) -> int:
    """The largest JPEG scale-down (1, 2, 4 or 8) that keeps the crop >= `size` pixels
    each way."""
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    for factor in (8, 4, 2):
        if box_w / factor >= size and box_h / factor >= size:
            return factor
    return 1


def _decode_box_resized_pil(image: Image.Image, box: Box, size: int, reduced_decode: bool) -> np.ndarray:
    full_w, full_h = image.size
    factor = _reduction(image.size, box, size) if reduced_decode and image.format == "JPEG" else 1
    if factor > 1:
        # PIL picks the largest scale whose result is at least the requested size.
        image.draft("RGB", (full_w // factor, full_h // factor))
    if image.mode != "RGB":
        image = image.convert("RGB")
    sx, sy = image.size[0] / full_w, image.size[1] / full_h
    scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=scaled), dtype=np.uint8)


_CV2_FLAGS = {}
if cv2 is not None:
    _CV2_FLAGS = {1: cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION}
    for _factor, _flag in ((2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4), (8, cv2.IMREAD_REDUCED_COLOR_8)):
        # The REDUCED flags include IMREAD_COLOR (BGR), which cannot be combined with RGB.
        _CV2_FLAGS[_factor] = (_flag & ~cv2.IMREAD_COLOR) | cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION


# OpenCV refuses images over 2**30 pixels; simplejpeg has no cap, so larger headers
# (corrupt ones, say) go to OpenCV and get its refusal instead of a huge allocation.
_SIMPLEJPEG_MAX_PIXELS = 2**30


def _decode_cv2_backend(
    image_bytes: bytes, factor: int, is_jpeg: bool, pixel_count: int
) -> np.ndarray | None:
    """RGB pixels at 1/`factor` scale, or None where OpenCV rejects the data. `pixel_count`
    is the full-size pixel count from the header.

    A full-size JPEG goes to simplejpeg when installed: the same libjpeg-turbo decode
    with the same settings (the pixels are identical, tested), at about 75% of
    `cv2.imdecode`'s CPU time (0.19 against 0.25 ms for a 300-px image). Whatever
    simplejpeg refuses (truncated or corrupt data) goes to OpenCV, so bad input
    behaves the same with or without it.
    """
    if factor == 1 and is_jpeg and simplejpeg is not None and pixel_count <= _SIMPLEJPEG_MAX_PIXELS:
        try:
            return simplejpeg.decode_jpeg(image_bytes, "RGB")
        except ValueError:
            pass
    return cv2.imdecode(np.frombuffer(image_bytes, np.uint8), _CV2_FLAGS[factor])


def _decode_box_resized_cv2(image_bytes: bytes, full_size: tuple[int, int], box: Box, size: int, reduced_decode: bool) -> np.ndarray:
    full_w, full_h = full_size
    is_jpeg = image_bytes[:2] == b"\xff\xd8"
    factor = _reduction(full_size, box, size) if reduced_decode and is_jpeg else 1
    pixels = _decode_cv2_backend(image_bytes, factor, is_jpeg, full_w * full_h)
    if pixels is None:
        raise ValueError(f"cannot decode image ({len(image_bytes)} bytes): OpenCV rejected the data (truncated or corrupt)")
    expected = (math.ceil(full_h / factor), math.ceil(full_w / factor))
    if pixels.shape[:2] != expected:
        raise ValueError(
            f"cannot decode image: header says {full_w}x{full_h}, decoded {pixels.shape[1]}x{pixels.shape[0]} "
            f"at 1/{factor} scale"
        )
    sx, sy = pixels.shape[1] / full_w, pixels.shape[0] / full_h
    left, right = int(round(box[0] * sx)), int(round(box[2] * sx))
    top, bottom = int(round(box[1] * sy)), int(round(box[3] * sy))
    crop = pixels[top:max(bottom, top + 1), left:max(right, left + 1)]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown image backend {backend!r}; choose one of {BACKENDS}")
    if backend == "cv2" and cv2 is None:
        raise ValueError("backend 'cv2' needs OpenCV (pip install opencv-python-headless); or use 'pil'")


def _crop_and_resize(image_bytes: bytes, size: int, backend: str, reduced_decode: bool, choose_box) -> np.ndarray:
    """Finds the image size (header only), lets `choose_box(width, height)` pick the
    box, then decodes (at reduced scale where JPEG allows) and resamples the box to
    `size` x `size` RGB uint8."""
    _check_backend(backend)
    full_size = header_size(image_bytes) if backend == "cv2" else None
    image = None
    if full_size is None:
        image = open_image(image_bytes)
        full_size = image.size
    box = choose_box(*full_size)
    try:
        if backend == "cv2":
            return _decode_box_resized_cv2(image_bytes, full_size, box, size, reduced_decode)
        return _decode_box_resized_pil(image, box, size, reduced_decode)
    except (OSError, SyntaxError) as err:  # PIL: truncated or corrupt image data
        raise ValueError(f"cannot decode image ({len(image_bytes)} bytes): {err}") from err


def decode_and_random_resized_crop(
    image_bytes: bytes,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    reduced_decode: bool = True,
    backend: str = DEFAULT_BACKEND,
) -> np.ndarray:
    """Training crop: random box (see `sample_crop_box`) resized to `size`x`size`.
    Returns uint8 `(size, size, 3)`."""
    return _crop_and_resize(
        image_bytes, size, backend, reduced_decode,
        lambda width, height: sample_crop_box(width, height, rng, scale=scale, ratio=ratio),
    )


# Bump when anything in `decode_resize_center_crop` changes its pixels: export.json
# records it, and predict computes the version an export records (one it knows) or
# refuses it. Version 2 read pixels as stored; version 3 first turns the picture as a
# person sees it (`as_seen`).
EVAL_PREPROCESSING_VERSION = 3
KNOWN_EVAL_PREPROCESSING_VERSIONS = (2, 3)
EXIF_ORIENTATION_TAG = 0x0112
# Pillow modes whose `convert("RGB")` is the documented mapping (channel copy, alpha
# dropped, palette lookup, Pillow's CMYK/YCbCr formulas).
_CONVERTIBLE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
_SIXTEEN_BIT_GREY = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


def eval_resize_short(size: int, crop_fraction: float = EVAL_CROP_FRACTION) -> int:
    """The short side the eval crop is taken from: `size / crop_fraction` rounded half
    up (stated, not Python's half-to-even `round`; for 0.875 no tie can occur)."""
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    return int(math.floor(size / crop_fraction + 0.5))


def center_crop_box(width: int, height: int, size: int, crop_fraction: float = EVAL_CROP_FRACTION) -> Box:
    """The box that "resize the short side to `eval_resize_short`, then take the centre
    size x size" selects, in the original image's pixels: float64, never rounded (Pillow
    resamples fractional boxes exactly). export.json states this formula verbatim."""
    side = size * min(width, height) / eval_resize_short(size, crop_fraction)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB by the rule export.json states: Pillow's `convert("RGB")` (grey
    replicated, alpha dropped without compositing, as the DeepFashion converter does),
    except 16-bit grey, which Pillow would clip at 255, keeps its high byte. 32-bit
    integer and float images have no agreed 8-bit mapping and are refused."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_GREY:
        grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode not in _CONVERTIBLE_MODES:
        raise ValueError(f"cannot decode image: pixel mode {image.mode!r} has no 8-bit RGB "
                         "mapping here; convert the file to 8-bit RGB (or 16-bit grey) first")
    return image.convert("RGB")


def has_transparency(image: Image.Image) -> bool:
    """An alpha channel, or a transparent palette entry or colour key (PNG tRNS)."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info)


def as_seen(image: Image.Image) -> Image.Image:
    """The picture as an image viewer shows it, in 8-bit RGB: EXIF orientation applied
    (phones store portrait photos sideways with a rotation tag), transparent areas laid
    on white (the usual background of catalogue photos; dropping alpha would show
    whatever colour an editor left under it), then `to_rgb`. Files reach the model this
    way, however they come: the catalogue converter stores its images so, and the eval
    and serving transform (version 3) reads every image so."""
    if image.getexif().get(EXIF_ORIENTATION_TAG, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if has_transparency(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return to_rgb(image)


def decode_resize_center_crop(
    image_bytes: bytes,
    size: int,
    crop_fraction: float = EVAL_CROP_FRACTION,
    version: int = EVAL_PREPROCESSING_VERSION,
) -> np.ndarray:
    """The eval and serving transform: short side to `eval_resize_short`, centre
    `size` x `size`, as uint8 `(size, size, 3)` RGB. Deterministic, and the same pixels
    whatever the training backend: evaluation during training, `--mode eval` and
    predict all call this, and `eval_preprocessing_spec` describes it for export.json.

    Steps: Pillow decodes the whole image (first frame; no draft; ICC profile ignored),
    `as_seen` (version 3; version 2, which an older export may record, took `to_rgb`
    of the pixels as stored), then one antialiased bilinear `Image.resize` of the float
    `center_crop_box` to `size` x `size` with `reducing_gap=None`.
    """
    if version not in KNOWN_EVAL_PREPROCESSING_VERSIONS:
        raise ValueError(f"eval preprocessing version {version!r} unknown; this code computes "
                         f"{', '.join(map(str, KNOWN_EVAL_PREPROCESSING_VERSIONS))}")
    image = open_image(image_bytes)
    try:
        image.load()
        rgb = as_seen(image) if version >= 3 else to_rgb(image)
        box = center_crop_box(rgb.size[0], rgb.size[1], size, crop_fraction)
        out = rgb.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
    except (OSError, SyntaxError) as err:  # PIL: truncated or corrupt image data
        raise ValueError(f"cannot decode image ({len(image_bytes)} bytes): {err}") from err
    return np.asarray(out, dtype=np.uint8)


def eval_preprocessing_spec(size: int, crop_fraction: float = EVAL_CROP_FRACTION) -> dict:
    """What export.json records about `decode_resize_center_crop`: enough for a client
    with numpy and Pillow alone to produce the same pixels (tests/reference_client.py
    does, from this dict only). Keys are stable within one `version`."""
    import PIL
    from PIL import features

    return {
        "version": EVAL_PREPROCESSING_VERSION,
        "image_size": int(size),
        "crop_fraction": float(crop_fraction),
        "resize_short": eval_resize_short(size, crop_fraction),
        "decoder": {
            "library": "Pillow",
            "call": "PIL.Image.open(file); image.load()",
            "reduced_decode": False,
            "frames": "first frame only",
            "exif_orientation": "applied: when the EXIF orientation tag (0x0112) is not 1, "
                                "image = PIL.ImageOps.exif_transpose(image), before anything else",
            "icc_profile": "ignored (no colour management)",
            "pillow_version": PIL.__version__,
            "libjpeg_turbo_version": features.version("libjpeg_turbo"),
        },
        "color": {
            "rule": "after the orientation, before resizing: an image with transparency is "
                    "laid on white, otherwise image.convert('RGB')",
            "transparency": "modes RGBA, LA, PA, RGBa, La, or P, L, RGB with 'transparency' in "
                            "image.info: PIL.Image.alpha_composite(opaque white RGBA, "
                            "image.convert('RGBA')).convert('RGB')",
            "L": "grey copied to R, G and B",
            "P": "palette looked up",
            "CMYK, YCbCr": "Pillow's convert('RGB')",
            "I;16, I;16B, I;16L, I;16N": "high byte (value >> 8) as grey, then as L",
            "other modes (I, F, ...)": "refused",
        },
        "crop": {
            "resize_short": "floor(image_size / crop_fraction + 0.5)",
            "box": "side = image_size * min(width, height) / resize_short; "
                   "left = (width - side) / 2; top = (height - side) / 2; "
                   "box = (left, top, left + side, top + side): float64, in the decoded "
                   "image's pixels, not rounded",
        },
        "resize": {
            "method": "bilinear",
            "antialias": True,
            "call": "rgb.resize((image_size, image_size), PIL.Image.Resampling.BILINEAR, "
                    "box=box, reducing_gap=None)",
            "note": "Pillow's bilinear filter widens with the scale factor when shrinking "
                    "(antialiasing); Pillow-SIMD rounds differently",
        },
        "output": "uint8 (image_size, image_size, 3), RGB, 0..255; the artifact normalises "
                  "(x - mean_rgb) / stddev_rgb itself",
        "implementation": "data_pipeline.records.transforms.decode_resize_center_crop",
    }


def random_horizontal_flip(image: np.ndarray, rng: np.random.Generator, probability: float = 0.5) -> np.ndarray:
    """Mirrors `image` (H, W, C) left-right with the given probability.

    The result is always C-contiguous: a reversed-stride view would make the batch
    `np.stack` copy 3 bytes at a time, which costs more than the decode."""
    if rng.random() >= probability:
        return image
    if cv2 is not None and image.ndim == 3 and image.shape[2] <= 4:
        return cv2.flip(image, 1)
    return np.ascontiguousarray(image[:, ::-1])
