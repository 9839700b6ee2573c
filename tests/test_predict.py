"""predict: files and folders in, top-k out; unusable files named and skipped;
--explain draws IASM attention (MSFF) or Grad-CAM (baselines)."""

import io
import json
import struct
import types
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from data_pipeline.records.transforms import decode_resize_center_crop
from msff_jax.inference import explain
from msff_jax.inference import predict
from msff_jax.models.inputs import normalize_images
from msff_jax.models import TINY_OVERRIDES
from tiny_export import IMAGE_SIZE, MEAN_RGB, STDDEV_RGB, write_tiny_export

CLASS_NAMES = ["Dress", "Tee", "Blouse"]


def _photo(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _bomb_png() -> bytes:
    """A valid 1x1 PNG whose header claims 100000 x 100000 pixels (CRC fixed up), so
    only the decompression-bomb guard can stop it."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", 100_000, 100_000)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    made = {}
    for name in ("msff_ecomnet", "resnet50"):
        model, variables = write_tiny_export(root / name, name, CLASS_NAMES)
        made[name] = (root / name, model, variables)
    return made


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three good images (JPEG, PNG, in a subfolder) and four unusable files."""
    root = tmp_path_factory.mktemp("images")
    _photo(60, 40, 0).save(root / "wide.jpg", quality=95)
    _photo(30, 50, 1).save(root / "tall.png")
    (root / "sub").mkdir()
    _photo(48, 48, 2).save(root / "sub" / "square.jpg")
    (root / "notes.txt").write_text("not an image\n")
    good = io.BytesIO()
    _photo(64, 64, 3).save(good, format="JPEG")
    (root / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (root / "bomb.png").write_bytes(_bomb_png())
    (root / "empty.jpg").write_bytes(b"")
    return root


def _reference_probabilities(model, variables, path):
    image = decode_resize_center_crop(path.read_bytes(), IMAGE_SIZE)
    x = normalize_images(image[None], MEAN_RGB, STDDEV_RGB)
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    return np.asarray(jax.nn.softmax(logits[0]))


def test_folder_with_unusable_files(exports, folder, capsys):
    export_dir, model, variables = exports["msff_ecomnet"]
    status = predict.main(["--export_dir", str(export_dir), "--top_k", "2",
                           "--batch_size", "2", str(folder), str(folder / "notes.txt")])
    out, err = capsys.readouterr()
    assert status == 2  # some files skipped, the rest classified
    for bad, reason in (("notes.txt", "not an image"), ("truncated.jpg", "truncated"),
                        ("bomb.png", "decompression bomb"), ("empty.jpg", ": empty file")):
        lines = [line for line in err.splitlines() if line.startswith("skipped") and bad in line]
        assert len(lines) == 1, lines  # named once, though notes.txt was also named directly
        assert reason in lines[0], lines[0]
    assert "cannot decode image: cannot decode image" not in err
    assert "Pillow knows" not in err.split("empty.jpg")[1].splitlines()[0]
    assert "classified 3 of 7 files; skipped 4" in err
    assert "img/s" not in err and "%|" not in err  # no progress bar off a terminal
    assert "Traceback" not in err
    lines = out.strip().splitlines()
    headers = [line for line in lines if not line.startswith("  ")]
    assert sorted(h.rsplit("/", 1)[-1] for h in headers) == ["square.jpg", "tall.png", "wide.jpg"]
    assert len(lines) == 3 * (1 + 2)  # a header and top-2 lines per classified image
    # Probabilities printed are those of the model on the eval transform.
    header_index = next(i for i, line in enumerate(lines) if line.endswith("wide.jpg"))
    expected = _reference_probabilities(model, variables, folder / "wide.jpg")
    best = int(np.argmax(expected))
    assert lines[header_index + 1].split()[1] == CLASS_NAMES[best]
    assert lines[header_index + 1].endswith(f"{100 * expected[best]:6.2f}%")


def test_json_lines(exports, folder, capsys):
    export_dir, model, variables = exports["resnet50"]
    status = predict.main(["--export_dir", str(export_dir), "--json", "--top_k", "3",
                           str(folder / "tall.png"), str(folder / "wide.jpg")])
    out, _ = capsys.readouterr()
    assert status == 0
    records = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["file"].rsplit("/", 1)[-1] for r in records] == ["tall.png", "wide.jpg"]
    for record in records:
        probabilities = [p["probability"] for p in record["predictions"]]
        assert probabilities == sorted(probabilities, reverse=True)
        expected = _reference_probabilities(model, variables, folder / record["file"].rsplit("/", 1)[-1])
        got = np.zeros(len(CLASS_NAMES))
        for p in record["predictions"]:
            assert CLASS_NAMES[p["index"]] == p["class"]
            got[p["index"]] = p["probability"]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_empty_folder_and_missing_path(exports, tmp_path, capsys):
    export_dir = exports["msff_ecomnet"][0]
    (tmp_path / "empty").mkdir()
    assert predict.main(["--export_dir", str(export_dir), str(tmp_path / "empty")]) == 1
    assert "contains no files" in capsys.readouterr().err
    assert predict.main(["--export_dir", str(export_dir), str(tmp_path / "nope.jpg")]) == 1
    assert "nope.jpg: no such file or folder" in capsys.readouterr().err


def test_bad_export_dir_is_named(tmp_path, folder, capsys):
    assert predict.main(["--export_dir", str(tmp_path), str(folder / "wide.jpg")]) == 1
    err = capsys.readouterr().err
    assert "export.json is missing" in err and err.startswith("error: ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "unexpected" not in err


def test_all_files_skipped_exits_1(exports, folder, capsys):
    status = predict.main(["--export_dir", str(exports["resnet50"][0]), str(folder / "empty.jpg")])
    err = capsys.readouterr().err
    assert status == 1
    assert "skipped" in err and "empty file" in err and "classified 0 of 1" in err


@pytest.mark.parametrize("argv, message", [
    (["--top_k", "0", "x.jpg"], "--top_k"),
    (["--export_dir", "e", "--topk", "3", "x.jpg"], "topk"),
    (["--export_dir", "e"], "IMAGE_OR_FOLDER"),
    (["x.jpg"], "--export_dir"),
])
def test_command_line_mistakes_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        predict.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_explain_attention_for_msff(exports, folder, tmp_path, capsys):
    export_dir, model, variables = exports["msff_ecomnet"]
    out_dir = tmp_path / "explained"
    status = predict.main(["--export_dir", str(export_dir), "--explain", str(out_dir),
                           str(folder / "wide.jpg"), str(folder / "sub")])
    capsys.readouterr()
    assert status == 0
    pngs = sorted(p.name for p in out_dir.iterdir())
    assert pngs == ["square.png", "wide.png"]
    stage_sizes = TINY_OVERRIDES["msff_ecomnet"]["stage_sizes"]
    with Image.open(out_dir / "wide.png") as image:  # input + one panel per stage
        assert image.width > 0.8 * (1 + len(stage_sizes)) * image.height

    explainer = explain.explainer_from_export(export_dir)
    assert explainer.kind == "attention"
    image = decode_resize_center_crop((folder / "wide.jpg").read_bytes(), IMAGE_SIZE)
    (explanation,) = explainer.explain(image[None])
    # One panel per stage, the stage's last block, each stage at half the previous
    # resolution (the first block of every later stage strides by 2).
    assert [p.title.split("/")[0] for p in explanation.panels] == [
        f"stage{stage}_block{size - 1}" for stage, size in enumerate(stage_sizes, start=1)]
    sides = [p.values.shape[0] for p in explanation.panels]
    assert sides == [sides[0] // 2**i for i in range(len(sides))] and sides[-1] >= 1
    for panel in explanation.panels:  # sigmoid maps
        assert 0.0 <= panel.values.min() <= panel.values.max() <= 1.0


def test_explain_grad_cam_for_baseline(exports, folder, tmp_path, capsys):
    export_dir, model, variables = exports["resnet50"]
    out_dir = tmp_path / "explained"
    status = predict.main(["--export_dir", str(export_dir), "--explain", str(out_dir),
                           str(folder / "tall.png")])
    capsys.readouterr()
    assert status == 0 and (out_dir / "tall.png").exists()

    explainer = explain.explainer_from_export(export_dir)
    assert explainer.kind == "gradcam"
    images = np.stack([decode_resize_center_crop((folder / n).read_bytes(), IMAGE_SIZE)
                       for n in ("tall.png", "wide.jpg")])
    explanations = explainer.explain(images)
    # ResNet ends features -> global average pool -> dense, so d logit_c / dA is
    # fc_kernel[:, c] / (h * w) everywhere and Grad-CAM reduces to CAM: an independent
    # reference for the intercepted gradient.
    x = normalize_images(images, MEAN_RGB, STDDEV_RGB)
    logits, state = jax.jit(lambda v, x: model.apply(v, x, train=False,
                                                     mutable=["intermediates"]))(variables, x)
    features = np.asarray(state["intermediates"]["features"][0])
    kernel = np.asarray(variables["params"]["fc"]["kernel"])
    h, w = features.shape[1:3]
    for i, explanation in enumerate(explanations):
        top = int(jnp.argmax(logits[i]))
        assert explanation.predicted_class == top
        expected = np.maximum(features[i] @ kernel[:, top] / (h * w), 0.0)
        (panel,) = explanation.panels
        np.testing.assert_allclose(panel.values, expected, rtol=1e-4, atol=1e-6)
        assert panel.values.max() > 0


def test_pixel_limit_refuses_from_the_header(monkeypatch):
    """--max_image_pixels lowers PIL's limit; between it and twice it PIL only warns,
    which predict turns into a refusal too."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    buffer = io.BytesIO()
    _photo(40, 40, 5).save(buffer, format="PNG")  # 1600 pixels: over 1000, under 2000
    with pytest.raises(ValueError, match="decompression bomb refused"):
        predict.check_header(buffer.getvalue())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    assert predict.check_header(buffer.getvalue()) == (40, 40)


# ------------------------------------------------------------------ files that are not themselves


def _copy_export(exports, name, tmp_path):
    import shutil

    return Path(shutil.copytree(exports[name][0], tmp_path / f"{name}_copy"))


def test_an_artifact_of_another_model_is_refused_naming_the_file(exports, folder, tmp_path, capsys):
    """inference.jaxexport swapped for resnet50's (same classes, same image size): predict
    used to answer with the other model's probabilities, without a word."""
    copy = _copy_export(exports, "msff_ecomnet", tmp_path)
    (copy / "inference.jaxexport").write_bytes(
        (exports["resnet50"][0] / "inference.jaxexport").read_bytes())
    status = predict.main(["--export_dir", str(copy), str(folder / "wide.jpg")])
    out, err = capsys.readouterr()
    assert status == 1 and out == ""
    assert err.startswith(f"error: {copy / 'inference.jaxexport'} is not the artifact")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_explain_refuses_variables_of_another_model(exports, folder, tmp_path, capsys):
    """variables/ replaced by other weights of the same model: --explain would draw maps
    of other weights than those behind the artifact's answers."""
    import shutil

    copy = _copy_export(exports, "msff_ecomnet", tmp_path)
    variables = exports["msff_ecomnet"][2]
    shutil.rmtree(copy / "variables")
    from msff_jax.inference import export

    export.save_variables(copy / "variables",
                          jax.tree.map(lambda leaf: np.asarray(leaf) + 0.5, variables))
    out_dir = tmp_path / "explained"
    status = predict.main(["--export_dir", str(copy), "--explain", str(out_dir),
                           str(folder / "wide.jpg")])
    out, err = capsys.readouterr()
    assert status == 1 and out == "" and not out_dir.exists()
    assert err.startswith(f"error: {copy / 'variables'} holds other variables than")


def test_explain_proves_the_artifact_and_variables_are_one_model(exports, folder, tmp_path, capsys):
    """An export.json edited consistently (the mean in both places) passes the file checks,
    but the model with the edited normalisation no longer gives the artifact's logits."""
    copy = _copy_export(exports, "msff_ecomnet", tmp_path)
    path = copy / "export.json"
    metadata = json.loads(path.read_text())
    metadata["preprocessing"]["mean_rgb"] = [0.0, 0.0, 0.0]
    metadata["artifact"]["normalization"]["mean_rgb"] = [0.0, 0.0, 0.0]
    path.write_text(json.dumps(metadata))
    assert predict.main(["--export_dir", str(copy), str(folder / "wide.jpg")]) == 0
    capsys.readouterr()
    out_dir = tmp_path / "explained"
    status = predict.main(["--export_dir", str(copy), "--explain", str(out_dir),
                           str(folder / "wide.jpg")])
    out, err = capsys.readouterr()
    assert status == 1 and out == "" and list(out_dir.iterdir()) == []
    assert "give different logits for the same images" in err and "inference.jaxexport" in err


def test_check_same_model_tolerates_rounding_only():
    exported = types.SimpleNamespace(directory=Path("/e"), metadata={
        "dtype": "float32", "artifact": {"file": "inference.jaxexport"},
        "variables": {"dir": "variables"}})
    logits = np.array([[3.0, -1.0, 0.5]], np.float32)
    predict.check_same_model(exported, logits, logits + 1e-5)
    with pytest.raises(ValueError, match="give different logits"):
        predict.check_same_model(exported, logits, logits[:, ::-1])


def test_a_fifo_a_device_and_a_dangling_link_are_named_as_what_they_are(exports, folder, tmp_path,
                                                                        capsys):
    import os

    export_dir = exports["msff_ecomnet"][0]
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.jpg"
    zero.symlink_to("/dev/zero")
    dangling = tmp_path / "gone.jpg"
    dangling.symlink_to(tmp_path / "nowhere")
    for path, words in ((fifo, "is a FIFO (named pipe)"), (zero, "is a character device"),
                        (dangling, "is a symbolic link to nothing")):
        assert predict.main(["--export_dir", str(export_dir), str(path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path} {words}, not an image file"), err
    # Inside a folder: skipped with the reason, never opened (a FIFO would block).
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "wide.jpg").write_bytes((folder / "wide.jpg").read_bytes())
    os.mkfifo(mixed / "pipe.jpg")
    assert predict.main(["--export_dir", str(export_dir), str(mixed)]) == 2
    err = capsys.readouterr().err
    assert "skipped" in err and "pipe.jpg: a FIFO (named pipe), not a regular file" in err


def test_explain_into_a_file_is_named(exports, folder, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    status = predict.main(["--export_dir", str(exports["resnet50"][0]), "--explain", str(a_file),
                           str(folder / "tall.png")])
    err = capsys.readouterr().err
    assert status == 1 and err.startswith(f"error: {a_file} is a file, where a folder is needed")
