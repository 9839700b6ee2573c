"""One preprocessing: the eval iterator (shards written by the real shard writer),
predict's loader and a numpy + Pillow client that reads only export.json produce the
same pixels for real photographs, and predict's probabilities match the client's
through an exported model.

The photos are scikit-learn's two sample JPEGs (china.jpg, flower.jpg), re-encoded at
sizes below the crop, odd sizes, portrait and landscape, as grey, 16-bit grey, RGBA,
palette and CMYK files, and one with an EXIF rotation."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.conversion import shard_writer
from data_pipeline.records import example_codec, reader, transforms
from msff_jax.inference import export, predict
from tiny_export import IMAGE_SIZE, write_tiny_export

CLASS_NAMES = ["Dress", "Tee", "Blouse", "Shorts"]
CLIENT = Path(__file__).with_name("reference_client.py")


def _sample_path(name: str) -> Path:
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "images" / name


def _sample_photo(name: str) -> Image.Image:
    with Image.open(_sample_path(name)) as image:
        image.load()
        return image


def _photo_files(root: Path) -> list[Path]:
    """Each case the issue names, made from real photographs."""
    china, flower = _sample_photo("china.jpg"), _sample_photo("flower.jpg")
    portrait = flower.transpose(Image.Transpose.ROTATE_90)
    files = []

    def save(name, image, **options):
        path = root / name
        image.save(path, **options)
        files.append(path)

    root.mkdir(parents=True, exist_ok=True)
    (root / "china_640x427.jpg").write_bytes(_sample_path("china.jpg").read_bytes())
    files.append(root / "china_640x427.jpg")  # the original bytes: big, landscape
    save("flower_portrait_301x451.jpg", portrait.resize((301, 451)), quality=90)
    save("china_below_crop_23x17.jpg", china.resize((23, 17)), quality=92)
    save("flower_grey_161x97.jpg", flower.resize((161, 97)).convert("L"), quality=90)
    save("china_grey_16bit_75x50.png", Image.fromarray(
        np.asarray(china.resize((75, 50)).convert("L")).astype(np.uint16) * 257))
    rgba = flower.resize((97, 131)).convert("RGBA")
    alpha = np.linspace(0, 255, 97 * 131).reshape(131, 97).astype(np.uint8)
    rgba.putalpha(Image.fromarray(alpha))
    save("flower_rgba_97x131.png", rgba)
    save("china_palette_120x80.png", china.resize((120, 80)).quantize(64))
    save("flower_cmyk_88x66.jpg", flower.resize((88, 66)).convert("CMYK"), quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display": turned upright
    save("china_exif_rotated_200x150.jpg", china.resize((200, 150)), quality=90, exif=exif)
    return files


def _encode(item) -> shard_writer.Encoded:
    path, label = item
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        fmt = image.format.lower()
    record = example_codec.encode_example(
        image_bytes=data, image_format=fmt, height=height, width=width, label=label,
        class_text=CLASS_NAMES[label], filename=Path(path).name)
    return shard_writer.Encoded(description=path, label=label, record=record)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    files = _photo_files(root / "photos")
    export_dir = root / "export"
    write_tiny_export(export_dir, "msff_ecomnet", CLASS_NAMES)
    data_dir = root / "shards"
    items = [(str(path), i % len(CLASS_NAMES)) for i, path in enumerate(files)]
    shards = shard_writer.plan_shards("test", items, estimated_bytes=2, shard_size_bytes=1)
    infos, skipped = shard_writer.write_shards(
        data_dir, shards, _encode, num_classes=len(CLASS_NAMES), options="parity",
        num_workers=1, progress=False)
    assert not skipped
    shard_writer.write_manifest(data_dir, shard_writer.build_manifest(
        CLASS_NAMES, "mixed", infos, {"tool": "tests"}))
    return files, export_dir, data_dir


@pytest.fixture(scope="module")
def client_pixels(setup, tmp_path_factory):
    """The reference client's pixels, computed in a process where this project, OpenCV,
    simplejpeg and JAX cannot be imported: numpy, Pillow and export.json only."""
    files, export_dir, _ = setup
    out = tmp_path_factory.mktemp("client") / "pixels.npy"
    blocked = ["data_pipeline", "msff_jax", "cv2", "simplejpeg", "jax", "tiny_export"]
    script = (f"import sys, runpy\nfor m in {blocked!r}: sys.modules[m] = None\n"
              f"sys.argv = {[str(CLIENT), str(export_dir), str(out)] + [str(f) for f in files]!r}\n"
              f"runpy.run_path({str(CLIENT)!r}, run_name='__main__')\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, cwd=out.parent)
    return np.load(out)


def _eval_iterator_pixels(data_dir, count):
    batches = reader.make_eval_iterator(
        str(data_dir), split="test", global_batch_size=4, image_size=IMAGE_SIZE,
        process_index=0, process_count=1)
    images = np.concatenate([b["image"][b["mask"]] for b in batches])
    assert len(images) == count
    return images


def test_eval_iterator_predict_and_client_see_the_same_pixels(setup, client_pixels):
    files, export_dir, data_dir = setup
    prep = export.load_metadata(export_dir)["preprocessing"]
    loaded = np.stack([predict.load_image(path, prep["image_size"], prep["crop_fraction"], 2**30)
                       for path in files])
    from_shards = _eval_iterator_pixels(data_dir, len(files))
    assert loaded.shape == (len(files), IMAGE_SIZE, IMAGE_SIZE, 3) and loaded.dtype == np.uint8
    for i, path in enumerate(files):
        np.testing.assert_array_equal(loaded[i], client_pixels[i], err_msg=f"predict vs client: {path.name}")
        np.testing.assert_array_equal(from_shards[i], loaded[i], err_msg=f"eval iterator vs predict: {path.name}")


def test_predict_probabilities_match_the_client(setup, client_pixels, capsys):
    files, export_dir, _ = setup
    status = predict.main(["--export_dir", str(export_dir), "--json", "--top_k", str(len(CLASS_NAMES)),
                           "--batch_size", str(len(files))] + [str(f) for f in files])
    out = capsys.readouterr().out
    assert status == 0
    by_file = {}
    for line in out.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            probabilities = np.zeros(len(CLASS_NAMES))
            for p in row["predictions"]:
                probabilities[p["index"]] = p["probability"]
            by_file[row["file"]] = probabilities
    from_predict = np.stack([by_file[str(f)] for f in files])

    loaded = export.load_export(export_dir)
    _, from_client = loaded(client_pixels)
    np.testing.assert_allclose(from_predict, np.asarray(from_client), atol=1e-4, rtol=0)

    # The check has teeth: the images get visibly different probabilities, and the
    # OpenCV reduced-decode crop predict used before moves them by more than 1e-4.
    assert np.ptp(from_predict, axis=0).max() > 1e-2
    old_style = np.stack([transforms._crop_and_resize(
        f.read_bytes(), IMAGE_SIZE, "cv2", True,
        lambda w, h: transforms.center_crop_box(w, h, IMAGE_SIZE)) for f in files])
    _, from_old = loaded(old_style)
    assert np.abs(np.asarray(from_old) - from_predict).max() > 1e-4


def test_export_json_records_the_transform(setup):
    _, export_dir, _ = setup
    prep = json.loads((export_dir / export.METADATA_FILE).read_text())["preprocessing"]
    assert prep["version"] == transforms.EVAL_PREPROCESSING_VERSION
    assert prep["resize_short"] == 37  # floor(32 / 0.875 + 0.5)
    assert prep["decoder"]["library"] == "Pillow" and prep["decoder"]["reduced_decode"] is False
    assert prep["resize"]["method"] == "bilinear" and prep["resize"]["antialias"] is True
    assert "reducing_gap=None" in prep["resize"]["call"]
    assert "not rounded" in prep["crop"]["box"]
    assert "laid on white" in prep["color"]["rule"] and "alpha_composite" in prep["color"]["transparency"]
    assert prep["decoder"]["exif_orientation"].startswith("applied")
    assert "training_image_backend" in prep


def test_an_export_of_version_2_is_read_as_it_was_written(setup, tmp_path):
    """An export written before version 3 recorded pixels as stored (EXIF orientation
    ignored, alpha dropped): predict still computes those for it, as the client does."""
    import importlib.util
    import shutil

    files, export_dir, _ = setup
    copy = Path(shutil.copytree(export_dir, tmp_path / "export"))
    metadata = json.loads((copy / export.METADATA_FILE).read_text())
    metadata["preprocessing"]["version"] = 2
    (copy / export.METADATA_FILE).write_text(json.dumps(metadata))
    prep = export.load_metadata(copy)["preprocessing"]
    spec = importlib.util.spec_from_file_location("reference_client", CLIENT)
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    client_prep = client.read_preprocessing(copy)
    changed = []
    for path in files:
        old = predict.load_image(path, prep["image_size"], prep["crop_fraction"], 2**30, prep["version"])
        np.testing.assert_array_equal(old, client.preprocess(path, client_prep), err_msg=path.name)
        if not np.array_equal(old, predict.load_image(path, prep["image_size"], prep["crop_fraction"], 2**30)):
            changed.append(path.name)
    assert sorted(changed) == ["china_exif_rotated_200x150.jpg", "flower_rgba_97x131.png"]
