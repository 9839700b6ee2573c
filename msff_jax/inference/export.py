"""`--mode export`: a trained workdir turned into a directory a user can ship.

`WORKDIR/export/` holds three things:
- `inference.jaxexport`: the serialised `jax.export` artifact of
  `uint8 images (b, s, s, 3) -> (logits, probabilities)`, normalisation included, with the
  variables closed over as constants and the batch size `b` symbolic. It runs from this
  file alone (`jax.export.deserialize(...).call(images)`), without this project's model
  code, on every platform listed in export.json (CPU and CUDA by default: JAX lowers for
  a platform without needing its hardware).
- `variables/`: an Orbax checkpoint of the inference variables only (`params`, the EMA
  parameters when the run kept an EMA, and `batch_stats`), for users who do have the
  model code (fine-tuning, `predict --explain`).
- `export.json`: the model name and overrides, the class names, the step, the format
  version, and a `preprocessing` block (from `transforms.eval_preprocessing_spec`) that
  states the eval transform exactly: decoder, no reduced decode, colour conversion, crop
  arithmetic, resize filter and antialiasing, the training backend. Evaluation, `--mode
  eval` and predict all run that one transform, and numpy + Pillow reproduce it from the
  JSON alone (tests/reference_client.py), so the artifact takes its output as input.
  It also records what proves the other two files are the ones exported from that model,
  step and class count: `artifact.sha256` (of the file), `variables.sha256` (of the
  arrays, `variables_sha256`), and `artifact.normalization`, the mean and standard
  deviation the artifact applies to its uint8 input.

`load_export` reads the directory back and checks the parts against each other before
any image is classified: export.json's keys and their types, the files it names staying
inside the directory, the artifact's SHA-256, preprocessing's mean and standard
deviation against the artifact's own record, the class count and image size against the
artifact; `load_model_and_variables` (for `--explain`) checks the variables' SHA-256 and
shapes. Each error names the file or key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from msff_jax.console import UserError

EXPORT_DIRNAME = "export"
METADATA_FILE = "export.json"
ARTIFACT_FILE = "inference.jaxexport"
VARIABLES_DIR = "variables"
# 2: `preprocessing` states the exact eval transform (version 1 described an
# OpenCV pipeline whose pixels clients could not reproduce). 3: the SHA-256 of the
# artifact and of the variables, and the normalisation the artifact applies.
FORMAT_VERSION = 3
DEFAULT_PLATFORMS = ("cpu", "cuda")
_REQUIRED_KEYS = ("format_version", "model", "model_overrides", "num_classes", "class_names",
                  "dtype", "preprocessing", "artifact", "variables")
_REQUIRED_PREPROCESSING = ("version", "image_size", "crop_fraction", "resize_short",
                           "mean_rgb", "stddev_rgb")
_DTYPES = ("float32", "bfloat16", "float16")


class ExportError(UserError, ValueError):
    """An export directory that cannot be used as it is; the message names the file."""


def _require_flatbuffers(what: str) -> None:
    """jax.export reads and writes its artifact with the `flatbuffers` package, which
    JAX does not install itself (TensorFlow brings it, so it is easy to miss on a machine
    without TensorFlow); say so before any work instead of failing deep inside JAX."""
    import importlib.util

    if importlib.util.find_spec("flatbuffers") is None:
        raise UserError(f"{what} needs the `flatbuffers` package, which jax.export uses for "
                        "its artifact and JAX does not install: pip install flatbuffers")


# ----------------------------------------------------------------------------- writing


def make_inference_fn(model, variables, mean_rgb: Sequence[float],
                      stddev_rgb: Sequence[float], dtype) -> Callable:
    """uint8 NHWC images -> (float32 logits, float32 probabilities), variables closed
    over so they become constants of the exported program."""
    from msff_jax.models.inputs import normalize_images

    def infer(images_uint8):
        images = normalize_images(images_uint8, mean_rgb, stddev_rgb, dtype)
        logits = model.apply(variables, images, train=False).astype(jnp.float32)
        return logits, jax.nn.softmax(logits, axis=-1)

    return infer


def export_inference(infer: Callable, image_size: int,
                     platforms: Sequence[str] = DEFAULT_PLATFORMS) -> jax.export.Exported:
    """Traces `infer` once for any batch size (symbolic dimension 'b')."""
    (batch,) = jax.export.symbolic_shape("b")
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8)
    return jax.export.export(jax.jit(infer), platforms=tuple(platforms))(images)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def variables_sha256(variables) -> str:
    """SHA-256 of a variable tree's content: each leaf's path, dtype, shape and bytes, in
    path order. The same for the host copies written and the arrays Orbax restores."""
    digest = hashlib.sha256()
    leaves = sorted(((jax.tree_util.keystr(path), np.asarray(leaf))
                     for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]),
                    key=lambda item: item[0])
    for key, array in leaves:
        digest.update(f"{key}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def save_variables(path: Path, variables: dict) -> None:
    """Orbax checkpoint of host copies (numpy) of the inference variables."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path.absolute(), jax.device_get(variables), force=True)
    checkpointer.wait_until_finished()


def write_export(out_dir: Path, *, model, variables: dict, metadata: dict,
                 platforms: Sequence[str] = DEFAULT_PLATFORMS) -> Path:
    """Writes the artifact, the variables and export.json into `out_dir`.

    `metadata` holds the model/class/preprocessing fields of export.json (see
    `build_metadata`); the artifact and variables fields are added here.
    """
    _require_flatbuffers("exporting a model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    variables = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    variables = jax.device_get(variables)
    prep = metadata["preprocessing"]
    infer = make_inference_fn(model, variables, prep["mean_rgb"], prep["stddev_rgb"],
                              jnp.dtype(metadata["dtype"]))
    exported = export_inference(infer, prep["image_size"], platforms)
    artifact = bytes(exported.serialize())
    (out_dir / ARTIFACT_FILE).write_bytes(artifact)
    save_variables(out_dir / VARIABLES_DIR, variables)

    metadata = dict(metadata)
    metadata["artifact"] = {
        "file": ARTIFACT_FILE,
        "sha256": sha256_bytes(artifact),
        # What the program applies to its uint8 input, recorded as it was lowered:
        # preprocessing's copy must agree with it (load_metadata checks).
        "normalization": {"mean_rgb": list(prep["mean_rgb"]),
                          "stddev_rgb": list(prep["stddev_rgb"])},
        "platforms": list(exported.platforms),
        "input": "uint8 (batch, image_size, image_size, 3), RGB, NHWC; batch is symbolic",
        "outputs": ["logits", "probabilities"],
        "jax_version": jax.__version__,
    }
    metadata["variables"] = {
        "dir": VARIABLES_DIR,
        "sha256": variables_sha256(variables),
        "collections": sorted(variables),
        "param_count": int(sum(np.size(x) for x in jax.tree.leaves(variables["params"]))),
    }
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return out_dir


def build_metadata(*, model_name: str, model_overrides: dict, num_classes: int,
                   class_names: Sequence[str], dtype: str, image_size: int,
                   crop_fraction: float, mean_rgb: Sequence[float],
                   stddev_rgb: Sequence[float], step: Optional[int], ema: bool,
                   class_names_source: str, image_backend: Optional[str] = None) -> dict:
    """export.json's model, class and preprocessing fields. `image_backend` is the
    run's `config.data.image_backend` (None: not known), recorded because it shaped the
    training crops; the eval pixels described beside it do not depend on it."""
    from data_pipeline.records.transforms import eval_preprocessing_spec

    if len(class_names) != num_classes:
        raise ExportError(f"{len(class_names)} class names ({class_names_source}) for "
                          f"num_classes={num_classes}")
    return {
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "model_overrides": dict(model_overrides),
        "num_classes": int(num_classes),
        "class_names": list(class_names),
        "class_names_source": class_names_source,
        "dtype": str(jnp.dtype(dtype)),
        "step": None if step is None else int(step),
        "ema_parameters": bool(ema),
        "preprocessing": {
            **eval_preprocessing_spec(int(image_size), float(crop_fraction)),
            "mean_rgb": [float(v) for v in mean_rgb],
            "stddev_rgb": [float(v) for v in stddev_rgb],
            "input_dtype": "uint8",
            "layout": "NHWC",
            "channel_order": "RGB",
            "training_image_backend": image_backend,
            "training_crops": "random resized crops by training_image_backend (reduced "
                              "decode, fast resize); evaluation and serving use the "
                              "transform above whatever it is",
        },
    }


def find_class_names(config, workdir: Path) -> tuple[list[str], str]:
    """The run's class names: eval_results.json of the workdir, else the data manifest,
    else placeholders `class_<i>` (logged; export.json records which)."""
    results_path = workdir / "eval_results.json"
    if results_path.exists():
        names = json.loads(results_path.read_text()).get("class_names")
        if names:
            return list(names), str(results_path)
    try:
        from data_pipeline.records.manifest import load_manifest

        return list(load_manifest(config.data_dir)["class_names"]), f"{config.data_dir}/manifest.json"
    except (FileNotFoundError, ValueError, KeyError) as err:
        logging.warning("export: no class names in %s or the data manifest (%s); using "
                        "placeholders class_0..class_%d", results_path, err,
                        config.num_classes - 1)
        return [f"class_{i}" for i in range(config.num_classes)], "placeholder"


def run(config, workdir: str, which: str = "best") -> Path:
    """`launch.py --mode export`: WORKDIR's best checkpoint (`which='best'`, else the
    latest; `--checkpoint latest` for the latest) -> WORKDIR/export/, lowered for
    `config.export_platforms`. Set `--config.dtype=float32` for a float32 artifact (the run's
    dtype is used by default, so logits match training-time evaluation)."""
    from data_pipeline.records.transforms import EVAL_CROP_FRACTION
    from msff_jax.train.checkpoints import restore_for_inference
    from msff_jax.train.config_model import plain
    from msff_jax.train.state import build_model

    _require_flatbuffers("--mode export")
    if jax.process_count() > 1:
        raise ExportError(
            f"--mode export runs as one process, not {jax.process_count()}: every process would "
            "write the same files. Run it once, without --coordinator_address or srun; it "
            "reads the checkpoint onto this host's devices.")
    workdir = Path(workdir)
    variables, step = restore_for_inference(config, str(workdir), which=which)
    class_names, names_source = find_class_names(config, workdir)
    metadata = build_metadata(
        model_name=config.model,
        model_overrides=plain(config.model_overrides),
        num_classes=config.num_classes,
        class_names=class_names,
        dtype=config.dtype,
        image_size=config.image_size,
        crop_fraction=EVAL_CROP_FRACTION,
        mean_rgb=config.mean_rgb,
        stddev_rgb=config.stddev_rgb,
        step=step,
        ema=config.get("ema_decay", 0.0) > 0,
        class_names_source=names_source,
        image_backend=config.data.get("image_backend"),
    )
    platforms = tuple(config.export_platforms)
    out_dir = write_export(workdir / EXPORT_DIRNAME, model=build_model(config),
                           variables=variables, metadata=metadata, platforms=platforms)
    logging.info("exported step %s of %s to %s", step, config.model, out_dir)
    print(f"exported {config.model} (step {step}, {len(class_names)} classes, "
          f"{metadata['dtype']}) to {out_dir}")
    for name in sorted(os.listdir(out_dir)):
        print(f"  {out_dir / name}")
    return out_dir


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class LoadedExport:
    """An export directory, checked: metadata and the callable artifact."""

    directory: Path
    metadata: dict
    exported: jax.export.Exported

    @property
    def class_names(self) -> list[str]:
        return self.metadata["class_names"]

    @property
    def image_size(self) -> int:
        return self.metadata["preprocessing"]["image_size"]

    def __call__(self, images_uint8: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """(logits, probabilities) for a uint8 batch of any size."""
        return self.exported.call(images_uint8)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _is_rgb(value) -> bool:
    return (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


# export.json's keys, what each must hold, and in words (for the error naming a bad one).
_SCHEMA = (
    ("model", lambda v: isinstance(v, str) and bool(v), "a model name"),
    ("model_overrides", lambda v: isinstance(v, dict), "an object of module fields"),
    ("num_classes", _is_count, "a positive integer"),
    ("class_names", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
     "a list of strings"),
    ("dtype", lambda v: v in _DTYPES, f"one of {list(_DTYPES)}"),
    ("step", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
     "a step number or null"),
    ("preprocessing", lambda v: isinstance(v, dict), "an object"),
    ("artifact", lambda v: isinstance(v, dict), "an object"),
    ("artifact.file", lambda v: isinstance(v, str) and bool(v), "a file name"),
    ("artifact.sha256", _is_sha256, "64 hexadecimal digits (the artifact's SHA-256)"),
    ("artifact.normalization", lambda v: isinstance(v, dict), "an object"),
    ("artifact.normalization.mean_rgb", _is_rgb, "3 numbers"),
    ("artifact.normalization.stddev_rgb", _is_rgb, "3 numbers"),
    ("variables", lambda v: isinstance(v, dict), "an object"),
    ("variables.dir", lambda v: isinstance(v, str) and bool(v), "a folder name"),
    ("variables.sha256", _is_sha256, "64 hexadecimal digits (the variables' SHA-256)"),
)


def _check_schema(path: Path, metadata: dict) -> None:
    for key, valid, words in _SCHEMA:
        node, found = metadata, True
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                found = False
                break
            node = node[part]
        if not found:
            raise ExportError(f"{path}: {key} is missing; run launch.py --mode export on the "
                              "training workdir again to rewrite the export")
        if not valid(node):
            raise ExportError(f"{path}: {key} must be {words}, got {json.dumps(node)[:80]}")


def load_metadata(export_dir: Path) -> dict:
    """export.json, checked: its format version, its keys and their types, the class
    count, the preprocessing block, and preprocessing's mean and standard deviation
    against the artifact's own record of them."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        from msff_jax.console import what_is

        kind = what_is(export_dir)
        raise FileNotFoundError(f"export directory {export_dir} "
                                f"{'is ' + kind + ', not a folder' if kind else 'does not exist'}")
    path = export_dir / METADATA_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: not an export directory "
                                f"(write one with launch.py --mode export)")
    try:
        metadata = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(metadata, dict):
        raise ExportError(f"{path}: must hold a JSON object of export.json's keys, got a "
                          f"{type(metadata).__name__}; run launch.py --mode export again")
    # The version first: an older export lacks newer keys, and re-exporting is the fix.
    if "format_version" in metadata and metadata["format_version"] != FORMAT_VERSION:
        raise ExportError(f"{path}: format_version {metadata['format_version']!r} is not "
                          f"the supported {FORMAT_VERSION}; run launch.py --mode export on "
                          "the training workdir again to rewrite it")
    missing = [key for key in _REQUIRED_KEYS if key not in metadata]
    prep = metadata.get("preprocessing")  # Not an object: the schema check names it.
    missing += [f"preprocessing.{key}" for key in _REQUIRED_PREPROCESSING
                if isinstance(prep, dict) and key not in prep]
    if missing:
        raise ExportError(f"{path}: missing keys {missing}")
    _check_schema(path, metadata)
    if len(metadata["class_names"]) != metadata["num_classes"]:
        raise ExportError(f"{path}: {len(metadata['class_names'])} class_names for "
                          f"num_classes={metadata['num_classes']}")
    _check_preprocessing(path, metadata["preprocessing"])
    recorded = metadata["artifact"]["normalization"]
    for key in ("mean_rgb", "stddev_rgb"):
        stated, applied = metadata["preprocessing"][key], recorded[key]
        if not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) for a, b in zip(stated, applied)):
            raise ExportError(
                f"{path}: preprocessing.{key} {stated} disagrees with artifact.normalization.{key} "
                f"{applied}, the values {metadata['artifact']['file']} applies to its uint8 input "
                "(the artifact normalises images itself: editing export.json cannot change it). "
                f"Restore the recorded values, or export again with --config.{key}")
    return metadata


def inside_export(export_dir: Path, metadata: dict, key: str) -> Path:
    """The file or folder export.json names under `key` ('artifact.file',
    'variables.dir'), refused when it would lie outside the export directory."""
    section, field = key.split(".")
    name = metadata[section][field]
    relative = Path(name)
    target = export_dir / relative
    outside = (relative.is_absolute() or ".." in relative.parts
               or not target.resolve().is_relative_to(export_dir.resolve()))
    if outside:
        raise ExportError(f"{export_dir / METADATA_FILE}: {key} {name!r} points outside the export "
                          f"directory {export_dir}; an export names only files inside it "
                          f"({ARTIFACT_FILE}, {VARIABLES_DIR}/)")
    return target


def _check_preprocessing(path: Path, prep: dict) -> None:
    """The preprocessing block must describe a transform this code runs (a version it
    knows; predict computes that version) with values it can run; otherwise predict
    would feed the artifact other pixels than export.json promises its clients."""
    from data_pipeline.records.transforms import KNOWN_EVAL_PREPROCESSING_VERSIONS, eval_resize_short

    if prep["version"] not in KNOWN_EVAL_PREPROCESSING_VERSIONS or isinstance(prep["version"], bool):
        known = ", ".join(map(str, KNOWN_EVAL_PREPROCESSING_VERSIONS))
        raise ExportError(
            f"{path}: preprocessing.version {prep['version']!r} is not one this code computes "
            f"({known}); predict would not reproduce the pixels export.json describes. Export "
            "again with this code, or predict with the code that wrote it")
    size, fraction = prep["image_size"], prep["crop_fraction"]
    if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
        raise ExportError(f"{path}: preprocessing.image_size must be a positive integer, got {size!r}")
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ExportError(f"{path}: preprocessing.crop_fraction must be in (0, 1], got {fraction!r}")
    if prep["resize_short"] != eval_resize_short(size, fraction):
        raise ExportError(
            f"{path}: preprocessing.resize_short is {prep['resize_short']!r} but "
            f"floor(image_size / crop_fraction + 0.5) = {eval_resize_short(size, fraction)} "
            f"for image_size={size}, crop_fraction={fraction}")
    for key in ("mean_rgb", "stddev_rgb"):
        values = prep[key]
        if not (isinstance(values, list) and len(values) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise ExportError(f"{path}: preprocessing.{key} must be 3 numbers (R, G, B on the "
                              f"0..255 scale), got {values!r}")
    if min(prep["stddev_rgb"]) <= 0:
        raise ExportError(f"{path}: preprocessing.stddev_rgb must be positive, got {prep['stddev_rgb']}")


def load_export(export_dir: Path) -> LoadedExport:
    """Reads export.json and the artifact and checks they agree (SHA-256, class count,
    image size, uint8 input). Needs no model code."""
    export_dir = Path(export_dir)
    metadata = load_metadata(export_dir)
    meta_path = export_dir / METADATA_FILE
    path = inside_export(export_dir, metadata, "artifact.file")
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing (named by {meta_path})")
    if not path.is_file():
        from msff_jax.console import what_is

        raise ExportError(f"{path} is {what_is(path)}, not the artifact file {meta_path} names")
    _require_flatbuffers(f"reading {path}")
    data = path.read_bytes()
    digest = sha256_bytes(data)
    if digest != metadata["artifact"]["sha256"]:
        raise ExportError(
            f"{path} is not the artifact {meta_path} was written with: its SHA-256 is "
            f"{digest[:16]}..., export.json records {metadata['artifact']['sha256'][:16]}... "
            f"(of {metadata['model']}, step {metadata.get('step')}, {metadata['num_classes']} "
            "classes). It was replaced or damaged: copy the export directory whole, or run "
            "launch.py --mode export again")
    try:
        exported = jax.export.deserialize(bytearray(data))
    except Exception as err:  # flatbuffer / version errors have no common type
        raise ExportError(f"{path}: cannot deserialise the jax.export artifact: {err}") from err

    size = metadata["preprocessing"]["image_size"]
    (image_aval,) = exported.in_avals
    if image_aval.dtype != np.uint8 or tuple(image_aval.shape[1:]) != (size, size, 3):
        raise ExportError(f"{meta_path} says uint8 images of {size}x{size}x3 but {path} takes "
                          f"{image_aval.dtype}{list(image_aval.shape)}")
    logits_classes = exported.out_avals[0].shape[-1]
    if logits_classes != metadata["num_classes"]:
        raise ExportError(f"{meta_path} says num_classes={metadata['num_classes']} but {path} "
                          f"outputs {logits_classes} logits")
    return LoadedExport(export_dir, metadata, exported)


def _shape_tree(tree) -> dict[str, tuple]:
    return {jax.tree_util.keystr(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_model_and_variables(export_dir: Path, metadata: Optional[dict] = None):
    """The flax model named in export.json and its Orbax variables, checked leaf by
    leaf against the model's shapes (so a num_classes that disagrees with the
    checkpoint is caught here, naming both). Needs this project's model code."""
    import orbax.checkpoint as ocp

    from msff_jax.models import get_model

    export_dir = Path(export_dir)
    metadata = metadata or load_metadata(export_dir)
    meta_path = export_dir / METADATA_FILE
    path = inside_export(export_dir, metadata, "variables.dir").absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing (named by {meta_path})")
    overrides = dict(metadata["model_overrides"])
    overrides.setdefault("dtype", jnp.dtype(metadata["dtype"]))
    model = get_model(metadata["model"], metadata["num_classes"], **overrides)
    size = metadata["preprocessing"]["image_size"]
    expected = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False),
        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    expected = {k: expected[k] for k in ("params", "batch_stats") if k in expected}
    checkpointer = ocp.StandardCheckpointer()
    try:
        stored = checkpointer.metadata(path).item_metadata.tree
    except Exception as err:  # Orbax raises several types for unreadable checkpoints
        raise ExportError(f"{path}: not a readable Orbax checkpoint: {err}") from err
    want, have = _shape_tree(expected), _shape_tree(stored)
    if want != have:
        diffs = [f"{key}: {meta_path.name} implies {want.get(key)}, checkpoint has {have.get(key)}"
                 for key in sorted(set(want) | set(have)) if want.get(key) != have.get(key)]
        raise ExportError(
            f"{path} does not match the model in {meta_path} ({metadata['model']}, "
            f"num_classes={metadata['num_classes']}): {len(diffs)} leaves differ, e.g. "
            + "; ".join(diffs[:3]))
    variables = checkpointer.restore(path)
    digest = variables_sha256(variables)
    if digest != metadata["variables"]["sha256"]:
        raise ExportError(
            f"{path} holds other variables than {meta_path} records: their SHA-256 is "
            f"{digest[:16]}..., export.json records {metadata['variables']['sha256'][:16]}... "
            f"(of {metadata['model']}, step {metadata.get('step')}); the artifact beside them "
            "would answer for other weights than the maps drawn. Copy the export directory "
            "whole, or run launch.py --mode export again")
    return model, variables
