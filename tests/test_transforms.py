"""Image ops: output contract, crop geometry, draft-mode decoding of training crops,
the exact (Pillow-only, full-size) eval transform, bad bytes."""

import io

import numpy as np
import pytest
from PIL import Image

from data_pipeline.records import transforms


def _gradient(width, height):
    x = np.linspace(0, 255, width)[None, :]
    y = np.linspace(0, 255, height)[:, None]
    return np.stack([np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)),
                     np.full((height, width), 90.0)], axis=-1).astype(np.uint8)


def _encode(pixels, fmt, mode=None):
    image = Image.fromarray(pixels)
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


JPEG = _encode(_gradient(60, 40), "JPEG")
BIG_JPEG = _encode(_gradient(400, 320), "JPEG")
backends = pytest.mark.parametrize("backend", transforms.BACKENDS)


@pytest.mark.parametrize("image_bytes", [
    JPEG,
    _encode(_gradient(60, 40), "PNG"),
    _encode(_gradient(60, 40), "PNG", mode="RGBA"),
    _encode(_gradient(60, 40), "JPEG", mode="L"),
], ids=["jpeg", "png", "png_rgba", "jpeg_gray"])
@backends
def test_both_crops_give_uint8_rgb_of_the_requested_size(image_bytes, backend):
    rng = np.random.default_rng(0)
    train = transforms.decode_and_random_resized_crop(image_bytes, 24, rng, backend=backend)
    evaluation = transforms.decode_resize_center_crop(image_bytes, 24)
    for out in (train, evaluation):
        assert out.shape == (24, 24, 3)
        assert out.dtype == np.uint8


def test_random_crop_box_respects_scale_and_ratio():
    rng = np.random.default_rng(1)
    for _ in range(200):
        left, top, right, bottom = transforms.sample_crop_box(300, 200, rng, scale=(0.25, 0.5), ratio=(0.75, 4 / 3))
        assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200
        area = (right - left) * (bottom - top) / (300 * 200)
        assert 0.23 <= area <= 0.52  # rounding to whole pixels
        assert 0.7 <= (right - left) / (bottom - top) <= 1.4


def test_impossible_ratio_falls_back_to_a_centred_crop():
    rng = np.random.default_rng(0)
    box = transforms.sample_crop_box(400, 40, rng, scale=(0.9, 1.0), ratio=(1.0, 1.0))
    assert box == (180, 0, 220, 40)


def test_scale_range_is_validated():
    with pytest.raises(ValueError, match="scale"):
        transforms.sample_crop_box(10, 10, np.random.default_rng(0), scale=(0.5, 0.1))


@backends
def test_train_crop_is_a_function_of_the_rng_state(backend):
    a = transforms.decode_and_random_resized_crop(JPEG, 24, np.random.default_rng(7), backend=backend)
    b = transforms.decode_and_random_resized_crop(JPEG, 24, np.random.default_rng(7), backend=backend)
    c = transforms.decode_and_random_resized_crop(JPEG, 24, np.random.default_rng(8), backend=backend)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_eval_crop_is_deterministic_and_centred():
    a = transforms.decode_resize_center_crop(JPEG, 24)
    np.testing.assert_array_equal(a, transforms.decode_resize_center_crop(JPEG, 24))
    # Short side 40 -> round(24 / 0.875) = 27, so the 60-px side becomes 40.5 and the
    # centre crop keeps the middle 24 / 40.5 of it: the red gradient is centred on 127.5.
    assert abs(float(a[..., 0].mean()) - 127.5) < 4


def test_center_crop_box_matches_resize_then_crop():
    left, top, right, bottom = transforms.center_crop_box(400, 300, 224)
    factor = 256 / 300
    assert right - left == pytest.approx(224 / factor)
    assert bottom - top == pytest.approx(224 / factor)
    assert (left + right) / 2 == pytest.approx(200) and (top + bottom) / 2 == pytest.approx(150)


def test_resize_short_rounds_half_up_as_export_json_states():
    assert transforms.eval_resize_short(224) == 256
    assert transforms.eval_resize_short(32) == 37  # 36.57
    assert transforms.eval_resize_short(1, 0.4) == 3  # a tie: 2.5 -> 3 (Python's round gives 2)
    with pytest.raises(ValueError, match="crop_fraction"):
        transforms.eval_resize_short(32, 1.5)


def _pillow_eval(image: Image.Image, size: int, on_white: bool = True) -> np.ndarray:
    """The eval transform spelled out with Pillow calls, as export.json states it (version
    3; `on_white=False`: version 2, alpha dropped)."""
    side = size * min(image.size) / transforms.eval_resize_short(size)
    left, top = (image.size[0] - side) / 2, (image.size[1] - side) / 2
    if on_white and image.mode == "RGBA":
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return np.asarray(image.convert("RGB").resize(
        (size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side), reducing_gap=None))


@pytest.mark.parametrize("fmt,mode", [("JPEG", None), ("JPEG", "L"), ("PNG", "RGBA"), ("PNG", "P")],
                         ids=["jpeg", "jpeg_gray", "png_rgba", "png_palette"])
@pytest.mark.parametrize("size", [16, 32, 64])
def test_eval_crop_is_exactly_the_stated_pillow_computation(fmt, mode, size):
    """Full-size decode (no draft even where the crop is over 8x the output),
    transparency laid on white and convert('RGB') before resizing (so RGBA is not
    alpha-premultiplied), float box; version 2 dropped alpha instead."""
    pixels = _gradient(400, 320)
    pixels[::7] = 255 - pixels[::7]  # detail, so any resampling difference shows
    image = Image.fromarray(pixels)
    if mode == "RGBA":
        image.putalpha(Image.fromarray(np.linspace(0, 255, 400 * 320).reshape(320, 400).astype(np.uint8)))
    elif mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    data = buffer.getvalue()
    expected = _pillow_eval(Image.open(io.BytesIO(data)), size)
    np.testing.assert_array_equal(transforms.decode_resize_center_crop(data, size), expected)
    as_stored = _pillow_eval(Image.open(io.BytesIO(data)), size, on_white=False)
    np.testing.assert_array_equal(transforms.decode_resize_center_crop(data, size, version=2), as_stored)
    assert (mode == "RGBA") == (not np.array_equal(expected, as_stored))


def _jpeg_with_orientation(pixels, orientation):
    exif = Image.Exif()
    exif[transforms.EXIF_ORIENTATION_TAG] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation,transpose", [
    (3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_eval_crop_turns_a_photo_by_its_exif_orientation(orientation, transpose):
    """A phone's portrait photo stored sideways with a rotation tag is seen upright, as an
    image viewer (and the catalogue converter) shows it; version 2 read it as stored."""
    pixels = _gradient(90, 60)
    pixels[:10, :10] = 0  # a dark corner, so a wrong turn shows
    data = _jpeg_with_orientation(pixels, orientation)
    upright = Image.open(io.BytesIO(data)).transpose(transpose)
    np.testing.assert_array_equal(transforms.decode_resize_center_crop(data, 32), _pillow_eval(upright, 32))
    as_stored = transforms.decode_resize_center_crop(data, 32, version=2)
    np.testing.assert_array_equal(as_stored, _pillow_eval(Image.open(io.BytesIO(data)), 32))
    assert np.abs(as_stored.astype(int) - transforms.decode_resize_center_crop(data, 32)).max() > 50
    # Orientation 1 is upright already: the same pixels as no tag at all.
    np.testing.assert_array_equal(transforms.decode_resize_center_crop(_jpeg_with_orientation(pixels, 1), 32),
                                  _pillow_eval(Image.open(io.BytesIO(_encode(pixels, "JPEG"))), 32))


def test_eval_crop_refuses_an_unknown_version():
    with pytest.raises(ValueError, match="version 4 unknown"):
        transforms.decode_resize_center_crop(JPEG, 16, version=4)


def test_eval_crop_keeps_the_high_byte_of_16_bit_grey():
    grey = (np.arange(40 * 30).reshape(30, 40) * 50 % 65536).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, "PNG")
    out = transforms.decode_resize_center_crop(buffer.getvalue(), 16)
    expected = _pillow_eval(Image.fromarray((grey >> 8).astype(np.uint8), "L"), 16)
    np.testing.assert_array_equal(out, expected)
    assert out.max() < 255  # Pillow's own convert('RGB') would clip most of it at 255


def test_eval_crop_refuses_float_images_naming_the_mode():
    buffer = io.BytesIO()
    Image.fromarray(np.ones((20, 20), np.float32)).save(buffer, "TIFF")
    with pytest.raises(ValueError, match="pixel mode 'F'"):
        transforms.decode_resize_center_crop(buffer.getvalue(), 8)


def test_eval_preprocessing_spec_is_json_and_versioned():
    import json

    spec = json.loads(json.dumps(transforms.eval_preprocessing_spec(32)))
    assert spec["version"] == transforms.EVAL_PREPROCESSING_VERSION
    assert spec["resize_short"] == 37 and spec["image_size"] == 32
    assert spec["decoder"]["reduced_decode"] is False and spec["resize"]["antialias"] is True


@backends
def test_reduced_decode_keeps_size_and_nearly_the_pixels(backend):
    def run(reduced):
        return transforms.decode_and_random_resized_crop(
            BIG_JPEG, 32, np.random.default_rng(3), scale=(0.9, 1.0), reduced_decode=reduced, backend=backend)

    full, draft = run(False), run(True)
    assert draft.shape == full.shape == (32, 32, 3)
    assert np.abs(full.astype(int) - draft.astype(int)).mean() < 4


def test_backends_agree_closely():
    pil = transforms.decode_and_random_resized_crop(BIG_JPEG, 64, np.random.default_rng(5), backend="pil")
    opencv = transforms.decode_and_random_resized_crop(BIG_JPEG, 64, np.random.default_rng(5), backend="cv2")
    assert np.abs(pil.astype(int) - opencv.astype(int)).mean() < 4


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown image backend"):
        transforms.decode_and_random_resized_crop(JPEG, 16, np.random.default_rng(0), backend="magick")


def test_cv2_decodes_big_jpegs_at_reduced_scale(monkeypatch):
    decoded_shapes = []
    original_decode = transforms._decode_cv2_backend

    def spying_decode(image_bytes, factor, is_jpeg, pixel_count):
        pixels = original_decode(image_bytes, factor, is_jpeg, pixel_count)
        decoded_shapes.append(pixels.shape)
        return pixels

    monkeypatch.setattr(transforms, "_decode_cv2_backend", spying_decode)
    # A box over 90% of the area: at least 293 px each way.
    for size in (32, 224):
        transforms.decode_and_random_resized_crop(BIG_JPEG, size, np.random.default_rng(0),
                                                  scale=(0.9, 1.0), backend="cv2")
    assert decoded_shapes == [(40, 50, 3), (320, 400, 3)]


def _noise_jpeg(mode=None, **options):
    pixels = np.random.default_rng(0).integers(0, 256, size=(37, 61, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    image = image.convert(mode) if mode else image
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **{"quality": 90, **options})
    return buffer.getvalue()


@pytest.mark.parametrize("image_bytes", [
    _noise_jpeg(),
    _noise_jpeg("L"),
    _noise_jpeg("CMYK"),
    _noise_jpeg(progressive=True),
    _noise_jpeg(quality=100, subsampling=0),
], ids=["rgb_420", "gray", "cmyk", "progressive", "rgb_444"])
def test_simplejpeg_decodes_the_same_pixels_as_opencv(image_bytes, monkeypatch):
    assert transforms.simplejpeg is not None, "simplejpeg is in requirements.txt"
    with_simplejpeg = transforms._decode_cv2_backend(image_bytes, 1, True, 37 * 61)
    monkeypatch.setattr(transforms, "simplejpeg", None)
    opencv_only = transforms._decode_cv2_backend(image_bytes, 1, True, 37 * 61)
    assert with_simplejpeg.dtype == np.uint8 and with_simplejpeg.shape == (37, 61, 3)
    np.testing.assert_array_equal(with_simplejpeg, opencv_only)


def test_data_simplejpeg_refuses_goes_to_opencv(monkeypatch):
    calls = []
    original_imdecode = transforms.cv2.imdecode
    monkeypatch.setattr(transforms.cv2, "imdecode", lambda *a: calls.append(1) or original_imdecode(*a))
    transforms._decode_cv2_backend(_noise_jpeg(), 1, True, 37 * 61)
    assert calls == []  # A good JPEG never reaches OpenCV.
    truncated = JPEG[: len(JPEG) // 2]
    transforms._decode_cv2_backend(truncated, 1, True, 60 * 40)
    assert calls == [1]  # simplejpeg refused it; OpenCV had the last word.
    transforms._decode_cv2_backend(_noise_jpeg(), 1, True, 2**30 + 1)
    assert calls == [1, 1]  # A header claiming over 2**30 pixels: OpenCV's cap applies.


def test_pil_draft_decodes_big_jpegs_at_reduced_scale_for_training_only(monkeypatch):
    from PIL import JpegImagePlugin

    decoded_sizes = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spying_draft(self, mode, size):
        result = original_draft(self, mode, size)
        decoded_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spying_draft)
    for size in (32, 224):  # >= 293-px box: 1/8 suffices for 32, no draft for 224
        transforms.decode_and_random_resized_crop(BIG_JPEG, size, np.random.default_rng(0),
                                                  scale=(0.9, 1.0), backend="pil")
    assert decoded_sizes == [(50, 40)]
    transforms.decode_resize_center_crop(BIG_JPEG, 32)  # 276-px box, yet decoded at full size
    assert decoded_sizes == [(50, 40)]


def test_flip_mirrors_with_the_given_probability():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(transforms.random_horizontal_flip(image, rng, probability=1.0), image[:, ::-1])
    np.testing.assert_array_equal(transforms.random_horizontal_flip(image, rng, probability=0.0), image)
    flips = [transforms.random_horizontal_flip(image, rng)[0, 0, 0] != image[0, 0, 0] for _ in range(400)]
    assert 150 < sum(flips) < 250


@backends
@pytest.mark.parametrize("bad", [b"not an image at all", JPEG[: len(JPEG) // 2]], ids=["garbage", "truncated"])
def test_undecodable_bytes_raise_value_error(bad, backend):
    with pytest.raises(ValueError, match="cannot decode image"):
        transforms.decode_and_random_resized_crop(bad, 16, np.random.default_rng(0), backend=backend)
    with pytest.raises(ValueError, match="cannot decode image"):
        transforms.decode_resize_center_crop(bad, 16)


@pytest.mark.parametrize("image_bytes", [
    _encode(_gradient(61, 37), "JPEG"),
    _encode(_gradient(61, 37), "JPEG", mode="L"),
    _encode(_gradient(61, 37), "PNG"),
], ids=["jpeg", "jpeg_gray", "png"])
def test_header_size_matches_pil(image_bytes):
    assert transforms.header_size(image_bytes) == Image.open(io.BytesIO(image_bytes)).size == (61, 37)


def test_header_size_of_progressive_jpeg():
    buffer = io.BytesIO()
    Image.fromarray(_gradient(45, 30)).save(buffer, "JPEG", progressive=True)
    assert transforms.header_size(buffer.getvalue()) == (45, 30)


@pytest.mark.parametrize("bad", [b"", b"GIF89a....", JPEG[:20]], ids=["empty", "gif", "cut_before_frame"])
def test_header_size_is_none_when_unknown(bad):
    assert transforms.header_size(bad) is None


def test_training_crops_read_pixels_as_stored():
    """Training's crops ignore the EXIF orientation (their window comes from the header's
    size); the converters store pictures upright (`as_seen`) where that matters."""
    image = Image.fromarray(_gradient(80, 40))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif)
    data = buffer.getvalue()
    stored = Image.open(io.BytesIO(data))
    assert stored.size == (80, 40)
    np.testing.assert_array_equal(transforms.decode_resize_center_crop(data, 32, version=2),
                                  _pillow_eval(stored, 32))
    pil, opencv = (transforms.decode_and_random_resized_crop(data, 32, np.random.default_rng(2), backend=b)
                   for b in ("pil", "cv2"))
    assert np.abs(pil.astype(int) - opencv.astype(int)).mean() < 4
    # Landscape pixels as stored: the red gradient runs along the output's width.
    assert pil[:, -1, 0].mean() > pil[:, 0, 0].mean() + 60
