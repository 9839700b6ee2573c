"""Export: the artifact reproduces the model, runs alone at any batch size, and a broken
export directory fails naming the file."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from data_pipeline.records import transforms
from msff_jax.inference import export
from msff_jax.models.inputs import normalize_images
from tiny_export import IMAGE_SIZE, MEAN_RGB, STDDEV_RGB, write_tiny_export

CLASS_NAMES = ["Dress", "Tee", "Blouse", "Shorts"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("run") / "export"
    # The shipped default: one artifact for CPU and CUDA, lowered here without a GPU.
    model, variables = write_tiny_export(out_dir, "msff_ecomnet", CLASS_NAMES,
                                         platforms=export.DEFAULT_PLATFORMS)
    return out_dir, model, variables


def _images(batch, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def _model_logits(model, variables, images):
    """The training-time model's eval logits (jitted: eager flax compiles op by op)."""
    apply = jax.jit(lambda v, x: model.apply(v, normalize_images(x, MEAN_RGB, STDDEV_RGB),
                                             train=False))
    return np.asarray(apply(variables, images))


def test_artifact_equals_model_at_two_batch_sizes(exported):
    out_dir, model, variables = exported
    loaded = export.load_export(out_dir)
    for batch in (1, 5):
        images = _images(batch, seed=batch)
        logits, probabilities = loaded(images)
        assert logits.shape == (batch, len(CLASS_NAMES))
        np.testing.assert_allclose(logits, _model_logits(model, variables, images),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(probabilities).sum(-1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(probabilities, jax.nn.softmax(logits), rtol=1e-5, atol=1e-7)


def test_artifact_runs_without_project_or_flax_code(exported, tmp_path):
    out_dir, model, variables = exported
    images = _images(3, seed=7)
    np.save(tmp_path / "images.npy", images)
    script = (
        "import sys; sys.modules['msff_jax'] = None; sys.modules['flax'] = None\n"
        "import jax, numpy as np\n"
        f"exp = jax.export.deserialize(bytearray(open({str(out_dir / export.ARTIFACT_FILE)!r}, 'rb').read()))\n"
        f"logits, _ = exp.call(np.load({str(tmp_path / 'images.npy')!r}))\n"
        f"np.save({str(tmp_path / 'logits.npy')!r}, np.asarray(logits))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"),
                               _model_logits(model, variables, images), rtol=1e-5, atol=1e-5)


def test_metadata_and_variables(exported):
    out_dir, _, variables = exported
    metadata = json.loads((out_dir / export.METADATA_FILE).read_text())
    assert metadata["model"] == "msff_ecomnet"
    assert metadata["class_names"] == CLASS_NAMES
    assert metadata["num_classes"] == 4 and metadata["step"] == 3
    assert metadata["preprocessing"]["image_size"] == IMAGE_SIZE
    assert metadata["preprocessing"]["mean_rgb"] == list(MEAN_RGB)
    assert metadata["preprocessing"]["input_dtype"] == "uint8"
    assert metadata["format_version"] == export.FORMAT_VERSION == 3
    # The transform itself, from the module that runs it (its wording is tested there).
    assert {k: v for k, v in metadata["preprocessing"].items()
            if k not in ("mean_rgb", "stddev_rgb", "input_dtype", "layout", "channel_order",
                         "training_image_backend", "training_crops")} == \
        transforms.eval_preprocessing_spec(IMAGE_SIZE, 0.875)
    assert set(metadata["artifact"]["platforms"]) == {"cpu", "cuda"}
    assert metadata["variables"]["collections"] == ["batch_stats", "params"]

    _, restored = export.load_model_and_variables(out_dir)
    assert set(restored) == {"params", "batch_stats"}
    for want, got in zip(jax.tree.leaves(variables), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(want), np.asarray(got))


@pytest.mark.parametrize("missing", [export.METADATA_FILE, export.ARTIFACT_FILE])
def test_missing_file_is_named(exported, tmp_path, missing):
    copy = shutil.copytree(exported[0], tmp_path / "export")
    (copy / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        export.load_export(copy)


def test_missing_variables_are_named(exported, tmp_path):
    copy = shutil.copytree(exported[0], tmp_path / "export")
    shutil.rmtree(copy / export.VARIABLES_DIR)
    with pytest.raises(FileNotFoundError, match=export.VARIABLES_DIR):
        export.load_model_and_variables(copy)


def _edit_metadata(directory, **changes):
    path = directory / export.METADATA_FILE
    metadata = json.loads(path.read_text())
    metadata.update(changes)
    path.write_text(json.dumps(metadata))


def test_json_disagreeing_with_artifact(exported, tmp_path):
    copy = shutil.copytree(exported[0], tmp_path / "export")
    _edit_metadata(copy, num_classes=5, class_names=CLASS_NAMES + ["Tank"])
    with pytest.raises(export.ExportError,
                       match=r"export.json says num_classes=5 but .*inference.jaxexport outputs 4"):
        export.load_export(copy)


def test_json_disagreeing_with_checkpoint(exported, tmp_path):
    copy = shutil.copytree(exported[0], tmp_path / "export")
    _edit_metadata(copy, num_classes=5, class_names=CLASS_NAMES + ["Tank"])
    with pytest.raises(export.ExportError, match=r"variables does not match .*head.*\(\d+, 5\).*\(\d+, 4\)"):
        export.load_model_and_variables(copy)


def test_inconsistent_class_names(exported, tmp_path):
    copy = shutil.copytree(exported[0], tmp_path / "export")
    _edit_metadata(copy, class_names=CLASS_NAMES[:3])
    with pytest.raises(export.ExportError, match="export.json: 3 class_names for num_classes=4"):
        export.load_export(copy)


def test_training_backend_is_recorded():
    metadata = export.build_metadata(
        model_name="resnet50", model_overrides={}, num_classes=2, class_names=["a", "b"],
        dtype="float32", image_size=64, crop_fraction=0.875, mean_rgb=MEAN_RGB,
        stddev_rgb=STDDEV_RGB, step=None, ema=False, class_names_source="test",
        image_backend="pil")
    assert metadata["preprocessing"]["training_image_backend"] == "pil"
    assert metadata["preprocessing"]["resize_short"] == 73


def _edit_preprocessing(directory, **changes):
    path = directory / export.METADATA_FILE
    metadata = json.loads(path.read_text())
    metadata["preprocessing"].update(changes)
    path.write_text(json.dumps(metadata))


@pytest.mark.parametrize("changes,message", [
    ({"version": 1}, r"export.json: preprocessing.version 1 is not one this code computes \(2, 3\).*Export again"),
    ({"resize_short": 36}, r"export.json: preprocessing.resize_short is 36 but .* = 37"),
    ({"crop_fraction": 0}, r"export.json: preprocessing.crop_fraction must be in \(0, 1\], got 0"),
    ({"image_size": "32"}, r"export.json: preprocessing.image_size must be a positive integer"),
    ({"stddev_rgb": [58.0, 0.0, 57.0]}, r"export.json: preprocessing.stddev_rgb must be positive"),
    ({"mean_rgb": [1.0, 2.0]}, r"export.json: preprocessing.mean_rgb must be 3 numbers"),
], ids=["old_version", "resize_short", "crop_fraction", "image_size", "stddev", "mean"])
def test_preprocessing_that_predict_cannot_reproduce_is_refused(exported, tmp_path, changes, message):
    copy = shutil.copytree(exported[0], tmp_path / "export")
    _edit_preprocessing(copy, **changes)
    with pytest.raises(export.ExportError, match=message):
        export.load_metadata(copy)


def _format_2(metadata: dict) -> dict:
    """export.json as format 2 wrote it: no SHA-256s, no record of the normalisation."""
    metadata = json.loads(json.dumps(metadata))
    metadata["format_version"] = 2
    del metadata["artifact"]["sha256"], metadata["artifact"]["normalization"]
    del metadata["variables"]["sha256"]
    return metadata


def test_export_of_an_older_format_asks_for_a_new_export(exported, tmp_path):
    """A format 1 export.json (its preprocessing block as that version wrote it), and one
    of format 2, which recorded no SHA-256: both are refused with what to run."""
    copy = shutil.copytree(exported[0], tmp_path / "export")
    path = copy / export.METADATA_FILE
    metadata = json.loads(path.read_text())
    path.write_text(json.dumps(_format_2(metadata)))
    with pytest.raises(export.ExportError,
                       match="export.json: format_version 2 is not the supported 3; run launch.py --mode export"):
        export.load_export(copy)
    metadata["format_version"] = 1
    metadata["preprocessing"] = {
        key: metadata["preprocessing"][key]
        for key in ("image_size", "crop_fraction", "mean_rgb", "stddev_rgb", "input_dtype",
                    "layout", "channel_order")}
    path.write_text(json.dumps(metadata))
    with pytest.raises(export.ExportError,
                       match="export.json: format_version 1 is not the supported 3; run launch.py --mode export"):
        export.load_metadata(copy)
    metadata["format_version"] = 3
    path.write_text(json.dumps(metadata))
    with pytest.raises(export.ExportError,
                       match=r"missing keys \['preprocessing.version', 'preprocessing.resize_short'\]"):
        export.load_metadata(copy)


def test_without_flatbuffers_reading_and_writing_say_what_to_install(exported, monkeypatch, tmp_path):
    """jax.export needs `flatbuffers`, which JAX does not install (TensorFlow usually
    brings it): a machine without it gets one line naming the package, not an
    ImportError from deep inside JAX."""
    import importlib.util

    from msff_jax.console import UserError, describe_exception

    out_dir, model, variables = exported
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flatbuffers" else real_find_spec(name, *a))
    with pytest.raises(UserError, match="pip install flatbuffers") as read_error:
        export.load_export(out_dir)
    assert str(out_dir / export.ARTIFACT_FILE) in str(read_error.value)
    with pytest.raises(UserError, match="pip install flatbuffers"):
        export.write_export(tmp_path / "again", model=model, variables=variables,
                            metadata=export.load_metadata(out_dir))
    assert not (tmp_path / "again").exists()
    message, status = describe_exception(read_error.value)
    assert "unexpected" not in message and status == 1


def test_a_broken_export_is_a_user_error_not_an_unexpected_one(exported, tmp_path):
    from msff_jax.console import describe_exception

    broken = tmp_path / "export"
    shutil.copytree(exported[0], broken)
    (broken / export.METADATA_FILE).write_text("{not json")
    with pytest.raises(export.ExportError) as error:
        export.load_export(broken)
    message, _ = describe_exception(error.value)
    assert message.startswith(str(broken / export.METADATA_FILE)) and "unexpected" not in message


# ------------------------------------------------------------------ an export proves itself


def test_export_json_records_what_proves_the_files(exported):
    out_dir, _, variables = exported
    metadata = json.loads((out_dir / export.METADATA_FILE).read_text())
    import hashlib

    artifact = (out_dir / export.ARTIFACT_FILE).read_bytes()
    assert metadata["artifact"]["sha256"] == hashlib.sha256(artifact).hexdigest()
    assert metadata["variables"]["sha256"] == export.variables_sha256(variables)
    assert metadata["artifact"]["normalization"] == {"mean_rgb": list(MEAN_RGB),
                                                     "stddev_rgb": list(STDDEV_RGB)}
    assert (metadata["model"], metadata["step"], metadata["num_classes"]) == ("msff_ecomnet", 3, 4)
    # The variables Orbax restores hash the same as those written.
    _, restored = export.load_model_and_variables(out_dir)
    assert export.variables_sha256(restored) == metadata["variables"]["sha256"]


def test_a_damaged_artifact_is_named(exported, tmp_path):
    copy = shutil.copytree(exported[0], tmp_path / "export")
    data = bytearray((copy / export.ARTIFACT_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / export.ARTIFACT_FILE).write_bytes(bytes(data))
    with pytest.raises(export.ExportError,
                       match=rf"{export.ARTIFACT_FILE} is not the artifact .*export.json was written "
                             r"with: its SHA-256 .*\(of msff_ecomnet, step 3, 4 classes\)"):
        export.load_export(copy)


def test_other_variables_are_named(exported, tmp_path):
    copy = shutil.copytree(exported[0], tmp_path / "export")
    _, variables = export.load_model_and_variables(copy)
    changed = jax.tree.map(lambda leaf: np.asarray(leaf) * 1.01, variables)
    shutil.rmtree(copy / export.VARIABLES_DIR)
    export.save_variables(copy / export.VARIABLES_DIR, changed)
    export.load_export(copy)  # The artifact itself is intact.
    with pytest.raises(export.ExportError, match=rf"{export.VARIABLES_DIR} holds other variables "
                                                 r"than .*export.json records"):
        export.load_model_and_variables(copy)


@pytest.mark.parametrize("key, value", [
    ("file", "/etc/passwd"), ("file", "../../../../etc/passwd"), ("file", "sub/../../x"),
])
def test_paths_in_export_json_stay_inside_the_export(exported, tmp_path, key, value):
    copy = shutil.copytree(exported[0], tmp_path / "export")
    (tmp_path / "x").write_bytes((copy / export.ARTIFACT_FILE).read_bytes())  # Readable outside.
    path = copy / export.METADATA_FILE
    metadata = json.loads(path.read_text())
    metadata["artifact"][key] = value
    path.write_text(json.dumps(metadata))
    with pytest.raises(export.ExportError, match=rf"artifact.file '{value}' points outside the "
                                                 "export directory"):
        export.load_export(copy)
    metadata["artifact"]["file"] = export.ARTIFACT_FILE
    metadata["variables"]["dir"] = str(tmp_path)
    path.write_text(json.dumps(metadata))
    with pytest.raises(export.ExportError, match="variables.dir .* points outside"):
        export.load_model_and_variables(copy)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(class_names=[1, 2, 3, 4]), r"class_names must be a list of strings, got \[1, 2"),
    (lambda m: m.update(num_classes="4"), r"num_classes must be a positive integer, got \"4\""),
    (lambda m: m.update(dtype="float8"), r"dtype must be one of"),
    (lambda m: m["artifact"].update(sha256="abc"), r"artifact.sha256 must be 64 hexadecimal digits"),
    (lambda m: m["artifact"].pop("normalization"), r"artifact.normalization is missing; run launch.py"),
    (lambda m: m.update(variables=["variables"]), r"variables must be an object"),
    (lambda m: m.update(preprocessing=5), r"preprocessing must be an object, got 5"),
], ids=["class_names", "num_classes", "dtype", "sha256", "normalization", "variables", "preprocessing"])
def test_a_bad_key_is_named(exported, tmp_path, change, message):
    copy = shutil.copytree(exported[0], tmp_path / "export")
    path = copy / export.METADATA_FILE
    metadata = json.loads(path.read_text())
    change(metadata)
    path.write_text(json.dumps(metadata))
    with pytest.raises(export.ExportError, match=message):
        export.load_metadata(copy)


def test_export_json_that_is_not_an_object(exported, tmp_path):
    copy = shutil.copytree(exported[0], tmp_path / "export")
    (copy / export.METADATA_FILE).write_text(json.dumps([1, 2]))
    with pytest.raises(export.ExportError, match="must hold a JSON object .* got a list"):
        export.load_metadata(copy)


@pytest.mark.parametrize("key", ["mean_rgb", "stddev_rgb"])
def test_normalisation_that_disagrees_with_the_artifact_is_refused(exported, tmp_path, key):
    """The artifact normalises its uint8 input itself: an edited mean or standard
    deviation would change nothing but make export.json contradict it."""
    copy = shutil.copytree(exported[0], tmp_path / "export")
    _edit_preprocessing(copy, **{key: [100.0, 100.0, 100.0]})
    with pytest.raises(export.ExportError,
                       match=rf"preprocessing.{key} \[100.0, 100.0, 100.0\] disagrees with "
                             rf"artifact.normalization.{key}"):
        export.load_export(copy)
