"""Configuration checks that run before anything is compiled, and the config helpers
every part shares. Each message names the field to change and how."""

from __future__ import annotations

import math
import os
from typing import Any

from data_pipeline.records import reader
from data_pipeline.records import transforms
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
        raise ValueError(
            f"config.batch_size={config.batch_size} must be divisible by the {data_devices} "
            f"data-parallel devices times config.grad_accum_steps={micro}; use a multiple of "
            f"{unit}, e.g. --config.batch_size={max(1, round(config.batch_size / unit)) * unit}.")


def check_config(config, *, num_devices: int, process_count: int) -> dict:
    """Catches configuration errors before anything is compiled; returns the manifest.

    Each message says which field to change and how.
    """
    from msff_jax.models import MODEL_NAMES

    if config.model not in MODEL_NAMES:
        raise ValueError(f"config.model={config.model!r} is unknown; set --config.model to one "
                         f"of {', '.join(MODEL_NAMES)}.")
    from msff_jax.train.state import compute_dtype

    compute_dtype(config)
    if config.optimizer.name not in optimizers.OPTIMIZER_NAMES:
        raise ValueError(f"config.optimizer.name={config.optimizer.name!r} is unknown; use one of "
                         f"{optimizers.OPTIMIZER_NAMES}.")
    if config.data.image_backend not in transforms.BACKENDS:
        raise ValueError(f"config.data.image_backend={config.data.image_backend!r} is unknown; "
                         f"use one of {transforms.BACKENDS}.")
    data_devices = mesh_lib.resolve_mesh_shape(config.mesh_shape, num_devices)[0]
    check_batch_size(config, data_devices)
    if config.eval_batch_size % data_devices or config.eval_batch_size % process_count:
        raise ValueError(
            f"config.eval_batch_size={config.eval_batch_size} must be divisible by the "
            f"{data_devices} data-parallel devices and the {process_count} processes; use a "
            f"multiple of {math.lcm(data_devices, process_count)}.")
    if not config.data_dir or not os.path.isdir(config.data_dir):
        raise FileNotFoundError(
            f"config.data_dir={config.data_dir!r} is not a directory; set --config.data_dir to "
            "the output of the converter (data_pipeline.conversion.deepfashion) or run configs/demo.py.")
    if not os.path.isfile(os.path.join(config.data_dir, "manifest.json")):
        raise FileNotFoundError(
            f"config.data_dir={config.data_dir!r} has no manifest.json; point it at a directory "
            "written by the converter (data_pipeline.conversion.deepfashion).")
    manifest = reader.load_manifest(config.data_dir)
    if len(manifest["class_names"]) != config.num_classes:
        raise ValueError(
            f"config.num_classes={config.num_classes} but {config.data_dir}/manifest.json lists "
            f"{len(manifest['class_names'])} classes; set --config.num_classes="
            f"{len(manifest['class_names'])}.")
    for split in (config.train_split, config.eval_split):
        if split not in manifest["splits"]:
            raise ValueError(f"split {split!r} is not in {config.data_dir}/manifest.json (it has "
                             f"{sorted(manifest['splits'])}); change config.train_split/eval_split.")
    return manifest
