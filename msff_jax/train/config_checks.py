"""Configuration checks that run before anything is compiled, and the config helpers
every part shares. Each message names the field to change and how."""

from __future__ import annotations

import math
import os
from typing import Any

from data_pipeline.records import reader
from data_pipeline.records import transforms
from msff_jax.console import ConfigError, PathError
from msff_jax.train import class_weights
from msff_jax.train import mesh as mesh_lib
from msff_jax.train import optimizers


def plain(value: Any) -> Any:
    """ConfigDicts, tuples and nested containers as plain JSON-friendly dicts and lists."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def check_batch_size(config, data_devices: int) -> None:
    """The global batch splits evenly over data-parallel devices and micro-batches."""
    micro = config.grad_accum_steps
    if micro < 1 or config.batch_size % (data_devices * micro):
        unit = data_devices * max(micro, 1)
        raise ConfigError(
            f"config.batch_size={config.batch_size} must be divisible by the {data_devices} "
            f"data-parallel devices times config.grad_accum_steps={micro}; use a multiple of "
            f"{unit}, e.g. --config.batch_size={max(1, round(config.batch_size / unit)) * unit}.")


def check_model(config) -> None:
    """The model name, its overrides and the dtype name are usable: builds the (cheap,
    uncompiled) Flax module so an override the model does not accept fails here."""
    from msff_jax.models import MODEL_NAMES
    from msff_jax.train.state import build_model, compute_dtype

    if config.model not in MODEL_NAMES:
        raise ConfigError(f"config.model={config.model!r} is unknown; set --config.model to one "
                          f"of {', '.join(MODEL_NAMES)}.")
    try:
        compute_dtype(config)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    try:
        build_model(config)
    except (ValueError, TypeError) as err:
        overrides = plain(config.get("model_overrides") or {})
        raise ConfigError(
            f"config.model_overrides={overrides} do not fit config.model={config.model!r}: "
            f"{err}. Drop or rename the override (it comes from the config file or a "
            "--config.model_overrides.NAME flag), or pick the model it was written for.") from err


# What a checkpoint's shapes and meaning depend on: resuming (or evaluating) with other
# values would fail inside Orbax or, worse, silently mix two runs.
RESUME_FIELDS = ("model", "model_overrides", "num_classes", "image_size", "data_dir")


def _same_data(old_dir, new_dir) -> bool:
    """Two data directories hold the same data when the paths agree, or when both
    manifests list the same classes and split sizes (data moved or copied)."""
    if not old_dir or not new_dir:
        return old_dir == new_dir
    if os.path.realpath(old_dir) == os.path.realpath(new_dir):
        return True
    import json

    def content(folder):
        with open(os.path.join(folder, "manifest.json")) as f:
            manifest = json.load(f)
        return (manifest.get("class_names"),
                {k: v.get("num_examples") for k, v in manifest.get("splits", {}).items()})

    try:
        return content(old_dir) == content(new_dir)
    except (OSError, ValueError, AttributeError):  # Old data gone or unreadable: cannot tell.
        return False


def check_resume(config, workdir: str, *, mode: str = "train") -> None:
    """Refuses a config whose model, widths, classes, image size or data differ from the
    one WORKDIR's checkpoints were trained with (WORKDIR/config.json), before anything in
    WORKDIR is written. Nothing to compare when WORKDIR has no checkpoints yet."""
    import json

    saved_path = os.path.join(workdir, "config.json")
    checkpoints = os.path.join(workdir, "checkpoints")
    if not (os.path.isfile(saved_path) and os.path.isdir(checkpoints) and os.listdir(checkpoints)):
        return
    try:
        with open(saved_path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise PathError(f"{saved_path} is unreadable ({err}); it records the config the "
                        "checkpoints were trained with. Restore it, or start fresh with a new "
                        "--workdir.") from err
    current = plain(config)
    differing = []
    for field in RESUME_FIELDS:
        old, new = saved.get(field), current.get(field)
        if field == "data_dir":
            if not _same_data(old, new):
                differing.append(f"data_dir {old!r} -> {new!r}")
        elif plain(old) != plain(new) and not (field == "model_overrides" and not old and not new):
            differing.append(f"{field} {old!r} -> {new!r}")
    if not differing:
        return
    if mode == "train":
        advice = (f"To start fresh, pass a new --workdir (or delete {checkpoints}); to resume, "
                  "use the config the run was started with")
    else:
        advice = "Pass the config (and --config overrides) the run was trained with"
    raise ConfigError(
        f"{workdir} holds checkpoints of a different run: {'; '.join(differing)} (saved in "
        f"{saved_path}). {advice}.")


def check_config(config, *, num_devices: int, process_count: int) -> dict:
    """Catches configuration errors before anything is compiled; returns the manifest.

    Each message says which field to change and how.
    """
    check_model(config)
    if config.optimizer.name not in optimizers.OPTIMIZER_NAMES:
        raise ConfigError(f"config.optimizer.name={config.optimizer.name!r} is unknown; use one of "
                         f"{optimizers.OPTIMIZER_NAMES}.")
    if config.data.image_backend not in transforms.BACKENDS:
        raise ConfigError(f"config.data.image_backend={config.data.image_backend!r} is unknown; "
                         f"use one of {transforms.BACKENDS}.")
    try:
        data_devices = mesh_lib.resolve_mesh_shape(config.mesh_shape, num_devices)[0]
    except ValueError as err:
        raise ConfigError(str(err)) from err
    check_batch_size(config, data_devices)
    if config.eval_batch_size % data_devices or config.eval_batch_size % process_count:
        raise ConfigError(
            f"config.eval_batch_size={config.eval_batch_size} must be divisible by the "
            f"{data_devices} data-parallel devices and the {process_count} processes; use a "
            f"multiple of {math.lcm(data_devices, process_count)}.")
    if not config.data_dir or not os.path.isdir(config.data_dir):
        raise PathError(
            f"config.data_dir={config.data_dir!r} is not a directory; set --config.data_dir to "
            "the output of the converter (data_pipeline.conversion.deepfashion) or run configs/demo.py.")
    if not os.path.isfile(os.path.join(config.data_dir, "manifest.json")):
        raise PathError(
            f"config.data_dir={config.data_dir!r} has no manifest.json; point it at a directory "
            "written by the converter (data_pipeline.conversion.deepfashion).")
    manifest = reader.load_manifest(config.data_dir)
    if len(manifest["class_names"]) != config.num_classes:
        raise ConfigError(
            f"config.num_classes={config.num_classes} but {config.data_dir}/manifest.json lists "
            f"{len(manifest['class_names'])} classes; set --config.num_classes="
            f"{len(manifest['class_names'])}.")
    for split in (config.train_split, config.eval_split):
        if split not in manifest["splits"]:
            raise ConfigError(f"split {split!r} is not in {config.data_dir}/manifest.json (it has "
                             f"{sorted(manifest['splits'])}); change config.train_split/eval_split.")
    class_weights.check(config, manifest)
    return manifest
