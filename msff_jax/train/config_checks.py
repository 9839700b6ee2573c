"""Configuration checks that run before any data, weights or compilation.

`RULES` is the one table of what every numeric field may hold: its range, and what a
special value (0, -1) means where it means something. `check_fields` applies the table
and the checks of names and the model; `check_devices` fits the batch sizes to the
devices, processes and micro-batches; `check_config` adds the data directory. Each
message names the field, the value, why it cannot work, and a value that would.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Optional, Sequence

from data_pipeline.records import reader
from data_pipeline.records import transforms
from msff_jax.console import ConfigError, ConfigValueError, PathError, what_is
from msff_jax.train import class_weights
from msff_jax.train import mesh as mesh_lib
from msff_jax.train import optimizers
from msff_jax.train.config_model import build_model, compute_dtype, plain, smallest_input

# Bounds no sensible run comes near: a value past them is a typo (an extra digit, a
# missing minus sign), refused before it costs anything.
MAX_IMAGES_PER_BATCH = 2**20
MAX_STEPS = 10**9
MAX_WORKERS = 1024


# ----------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one field may hold. `allows(value, config)` may read fields earlier in the
    table (they are checked first); `example(config)` is a value that passes."""

    field: str  # dotted: "optimizer.momentum"; "mesh_shape" for a whole tuple
    allows: Callable[[Any, Any], bool]
    requirement: str  # completes "must be ..."
    example: Callable[[Any], Any]
    meaning: str = ""  # what a special value means, e.g. "-1: once per epoch"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(field: str, low: int, high: int, example, *, sentinel: Optional[int] = None,
             meaning: str = "", requirement: str = "") -> Rule:
    words = requirement or f"an integer from {low:,} to {high:,}"
    if sentinel is not None and not requirement:
        words = f"{sentinel} or {words}"
    return Rule(field, lambda v, c: _is_int(v) and (low <= v <= high or v == sentinel), words,
                example if callable(example) else (lambda c: example), meaning)


def _number(field: str, low: float, high: float, example, *, low_open: bool = False,
            high_open: bool = False, meaning: str = "", requirement: str = "") -> Rule:
    def allows(value, config):
        return (_is_number(value) and (low < value if low_open else low <= value)
                and (value < high if high_open else value <= high))

    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return Rule(field, allows, requirement or f"a number in {interval}",
                example if callable(example) else (lambda c: example), meaning)


def _numbers(field: str, count: int, low: float, high: float, example, *,
             low_open: bool = False, ordered: bool = False, meaning: str = "",
             requirement: str = "") -> Rule:
    def allows(value, config):
        return (isinstance(value, (tuple, list)) and len(value) == count
                and all(_is_number(v) and (low < v if low_open else low <= v) and v <= high
                        for v in value)
                and (not ordered or list(value) == sorted(value)))

    return Rule(field, allows, requirement, lambda c: example, meaning)


def _mesh_shape_allows(value, config) -> bool:
    return (isinstance(value, (tuple, list)) and len(value) == len(mesh_lib.MESH_AXES)
            and all(_is_int(v) and (v == -1 or 1 <= v <= 65536) for v in value)
            and list(value).count(-1) <= 1)


RULES: tuple[Rule, ...] = (
    _integer("num_classes", 2, 1_000_000, 15, meaning="the classifier's outputs"),
    _integer("image_size", 1, 4096, 224, meaning="the side of the square crops in pixels, at "
             "least the model's total stride"),
    _integer("model_overrides.channel_alignment", 1, 128, 8,
             meaning="MSFF models compute MSP-Conv and IASM on channel counts padded to a "
                     "multiple of it; 1: no padding"),
    _numbers("mean_rgb", 3, 0.0, 255.0, (123.675, 116.28, 103.53),
             requirement="3 numbers from 0 to 255 (R, G, B on the 0..255 scale)",
             meaning="0 leaves a channel uncentred"),
    _numbers("stddev_rgb", 3, 0.0, 255.0, (58.395, 57.12, 57.375), low_open=True,
             requirement="3 numbers above 0 and at most 255 (R, G, B on the 0..255 scale)",
             meaning="images are divided by them"),
    _integer("data.worker_count", 0, MAX_WORKERS, 0,
             meaning="0 decodes in the training process with data.read_threads threads"),
    _integer("data.read_threads", 1, MAX_WORKERS, 2),
    _integer("data.prefetch_buffer", 1, MAX_WORKERS, 2, meaning="batches prepared ahead"),
    _numbers("data.scale_range", 2, 0.0, 1.0, (0.08, 1.0), low_open=True, ordered=True,
             requirement="(min, max) with 0 < min <= max <= 1",
             meaning="the crop's share of the image area"),
    _numbers("data.ratio_range", 2, 0.0, 100.0, (0.75, 1.3333), low_open=True, ordered=True,
             requirement="(min, max) with 0 < min <= max <= 100",
             meaning="the crop's aspect ratio, width over height"),
    _integer("batch_size", 1, MAX_IMAGES_PER_BATCH, 256,
             meaning="the global batch, all devices and hosts together"),
    _integer("eval_batch_size", 1, MAX_IMAGES_PER_BATCH, 256),
    Rule("grad_accum_steps", lambda v, c: _is_int(v) and 1 <= v <= c.batch_size,
         "an integer from 1 to config.batch_size", lambda c: 1,
         "micro-batches per optimizer step, each of at least one image; 1: no accumulation"),
    _integer("num_epochs", 1, 100_000, 100),
    _integer("num_train_steps", 1, MAX_STEPS, -1, sentinel=-1,
             meaning="-1: config.num_epochs decides the length; a positive number overrides it"),
    _integer("seed", 0, 2**32 - 1, 0, meaning="the data order, initialisation and dropout; 0 "
             "is a seed like any other"),
    _number("optimizer.base_learning_rate", 0.0, 10.0, 0.1, low_open=True,
            meaning="the peak rate per 256 images; above 10 a run diverges at once"),
    _number("optimizer.momentum", 0.0, 1.0, 0.9, high_open=True, meaning="0: plain SGD"),
    _number("optimizer.b1", 0.0, 1.0, 0.9, high_open=True,
            meaning="AdamW's gradient average; 0: none"),
    _number("optimizer.b2", 0.0, 1.0, 0.999, high_open=True,
            meaning="AdamW's squared-gradient average; 0: none"),
    _number("optimizer.eps", 0.0, 1.0, 1e-8, low_open=True,
            meaning="keeps AdamW's update finite where the second moment is 0"),
    Rule("optimizer.warmup_epochs",
         lambda v, c: _is_number(v) and 0 <= v <= (100_000 if c.num_train_steps > 0
                                                   else c.num_epochs),
         "a number from 0 to config.num_epochs (to 100,000 with config.num_train_steps set)",
         lambda c: min(5, c.num_epochs), "0: no warm-up"),
    Rule("optimizer.end_learning_rate", lambda v, c: _is_number(v) and 0 <= v <= optimizers.peak_learning_rate(c),
         "a number from 0 to the peak rate (optimizer.base_learning_rate * batch_size / 256)",
         lambda c: 0.0, "0: the cosine decays to zero"),
    _number("optimizer.weight_decay", 0.0, 1.0, 5e-5, meaning="0: no weight decay"),
    _number("grad_clip_norm", 0.0, 1e6, 0.0, meaning="0: no clipping"),
    _number("label_smoothing", 0.0, 1.0, 0.1, high_open=True,
            meaning="the share of the target spread over all classes; 0: none"),
    _number("ema_decay", 0.0, 1.0, 0.0, high_open=True, meaning="0: no EMA"),
    _number("loss_scale.initial", 1.0, 2.0**24, 2.0**15, requirement="a number from 1 to 2**24",
            meaning="float16's starting loss scale; it halves on every overflow"),
    _integer("loss_scale.growth_interval", 1, MAX_STEPS, 2000),
    Rule("mesh_shape", _mesh_shape_allows,
         "2 entries (data, model), each -1 or an integer from 1 to 65,536, at most one -1",
         lambda c: "(-1, 1)", "-1 takes the devices the other axis leaves"),
    _integer("log_every_steps", 1, MAX_STEPS, 100),
    _integer("eval_every_steps", 1, MAX_STEPS, -1, sentinel=-1, meaning="-1: once per epoch"),
    _integer("checkpoint.every_steps", 0, MAX_STEPS, 1000,
             meaning="0: only at evaluations, on preemption and at the end"),
    _integer("checkpoint.keep", 1, 1_000_000, 3),
    _number("workdir_lock_wait_secs", 0.0, 7 * 24 * 3600.0, 600,
            meaning="how long a launch waits for a run holding the workdir; 0 refuses at once"),
    _integer("profile.first_step", 1, MAX_STEPS, 10),
    _integer("profile.num_steps", 1, 1_000_000, 5),
    Rule("plan.num_devices", lambda v, c: _is_int(v) and (1 <= v <= 8 or (8 < v <= 65_536 and v % 8 == 0)),
         "an integer from 1 to 8 (one host) or a multiple of 8 up to 65,536 (hosts of 8 GPUs)",
         lambda c: 8, "the GPUs --mode plan shards the run over"),
    _number("plan.memory_fraction", 0.0, 1.0, 0.75, low_open=True,
            meaning="the share of GPU memory a program may use; JAX preallocates 0.75"),
    # configs/demo.py's synthetic data (checked when the config has it).
    _integer("demo.num_generated", 15, 10_000_000, 1900),
    Rule("demo.num_images", lambda v, c: _is_int(v) and 15 <= v <= c.demo.num_generated,
         "an integer from 15 to config.demo.num_generated", lambda c: c.demo.num_generated),
    _integer("demo.seed", 0, 2**32 - 1, 0),
    _integer("demo.resize_to", 0, 4096, 96, meaning="0 keeps the generated size"),
    _integer("demo.convert_workers", 1, MAX_WORKERS, 2),
)


def _lookup(config, field: str):
    """(found, value) of a dotted field."""
    node = config
    for part in field.split("."):
        if not hasattr(node, "get") or part not in node:
            return False, None
        node = node[part]
    return True, node


def _shown(value) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_shown(v) for v in value) + ")"
    return repr(value)


def _flag_value(value) -> str:
    """A value as it is written after --config.FIELD= on a shell command line."""
    if isinstance(value, str):
        return f"'{value}'" if value.startswith("(") else value
    if isinstance(value, (tuple, list)):
        return f"'{_shown(value)}'"
    return repr(value)


def rule_message(rule: Rule, value, config) -> str:
    why = f"must be {rule.requirement}"
    if rule.meaning:
        why += f" ({rule.meaning})"
    return (f"config.{rule.field}={_shown(value)} {why}; use e.g. "
            f"--config.{rule.field}={_flag_value(rule.example(config))}.")


def check_rules(config, rules: Sequence[Rule] = RULES) -> None:
    """Every field of the table that the config has, in table order."""
    for rule in rules:
        found, value = _lookup(config, rule.field)
        if found and not rule.allows(value, config):
            raise ConfigValueError(rule_message(rule, value, config))


# ----------------------------------------------------------------------------- names, model


def check_model(config) -> None:
    """The model name, its overrides and the dtype name are usable: builds the (cheap,
    uncompiled) Flax module so an override the model does not accept fails here."""
    from msff_jax.models import MODEL_NAMES

    if config.model not in MODEL_NAMES:
        raise ConfigValueError(f"config.model={config.model!r} is unknown; set --config.model to one "
                               f"of {', '.join(MODEL_NAMES)}.")
    try:
        compute_dtype(config)
    except ValueError as err:
        raise ConfigValueError(str(err)) from err
    try:
        build_model(config)
    except (ValueError, TypeError) as err:
        overrides = plain(config.get("model_overrides") or {})
        raise ConfigValueError(
            f"config.model_overrides={overrides} do not fit config.model={config.model!r}: "
            f"{err}. Drop or rename the override (it comes from the config file or a "
            "--config.model_overrides.NAME flag), or pick the model it was written for.") from err


def check_image_size(config) -> None:
    """The crops are at least the model's total stride: smaller, its last stage would
    see padding instead of the image (every model accepts them without complaint)."""
    stride = smallest_input(config)
    if config.image_size < stride:
        raise ConfigValueError(
            f"config.image_size={config.image_size} is smaller than {config.model}'s smallest "
            f"input, {stride} px (its total stride): its last stage would see padding, not the "
            f"image; use e.g. --config.image_size={stride * max(1, -(-config.image_size // stride))}.")


def check_pretrained(config) -> None:
    """`pretrained_path` names a model with a weight mapping and a readable file: found
    here rather than after the data start-up."""
    path = config.get("pretrained_path")
    if not path:
        return
    from msff_jax.models.torch_weights import CONVERTIBLE_MODELS

    if config.model not in CONVERTIBLE_MODELS:
        raise ConfigValueError(
            f"config.pretrained_path={path!r} is set for config.model={config.model!r}, which has "
            "no torchvision weight mapping (only "
            f"{', '.join(CONVERTIBLE_MODELS)} do); drop it with --config.pretrained_path='' or "
            "train one of those models.")
    if not os.path.isfile(path):
        kind = what_is(path)
        found = f"is {kind}" if kind else "does not exist"
        raise PathError(f"config.pretrained_path={path!r} {found}; name a .safetensors file "
                        "of torchvision or timm weights.")


def check_fields(config, *, mode: str = "train") -> None:
    """Everything a config can be checked for without devices, data or compilation:
    the table, the names, the model and its smallest input, the pretrained weights."""
    check_rules(config)
    check_model(config)
    for field, known in (("optimizer.name", optimizers.OPTIMIZER_NAMES),
                         ("data.image_backend", transforms.BACKENDS)):
        found, value = _lookup(config, field)
        if found and value not in known:
            raise ConfigValueError(f"config.{field}={value!r} is unknown; use one of {known}.")
    for field in ("train_split", "eval_split"):
        if not config.get(field) or not isinstance(config.get(field), str):
            raise ConfigValueError(f"config.{field}={config.get(field)!r} must name a split of the "
                                   "data, e.g. --config.eval_split=val.")
    check_image_size(config)
    if mode == "train":
        check_pretrained(config)


# ----------------------------------------------------------------------------- devices


def _largest_divisor(number: int, at_most: int) -> int:
    return max(d for d in range(1, max(1, min(number, at_most)) + 1) if number % d == 0)


def _nearest_multiple(value: int, unit: int) -> int:
    """The multiple of `unit` nearest `value` (never 0, never `value` itself)."""
    below = (value // unit) * unit
    above = below + unit
    if below <= 0 or below == value:
        return above if above != value else above + unit
    return below if value - below < above - value else above


def check_batch_size(config, data_devices: int, process_count: int = 1) -> None:
    """The global batch splits evenly over data-parallel devices, processes and
    micro-batches."""
    batch, micro = config.batch_size, config.grad_accum_steps
    if not (_is_int(micro) and 1 <= micro <= batch):
        check_rules(config)  # Refuses it, naming the field and its range.
    unit = math.lcm(data_devices * micro, process_count)
    if batch % unit == 0:
        return
    options = [f"--config.batch_size={_nearest_multiple(batch, unit)}"]
    per_device = batch // data_devices if batch % math.lcm(data_devices, process_count) == 0 else 0
    if per_device and micro > 1:
        options.append(f"--config.grad_accum_steps={_largest_divisor(per_device, micro)}")
    raise ConfigValueError(
        f"config.batch_size={batch} must be divisible by the {data_devices} data-parallel devices "
        f"times config.grad_accum_steps={micro}"
        + (f" and by the {process_count} processes" if process_count > 1 else "")
        + f" (a multiple of {unit}); use e.g. {' or '.join(options)}.")


def check_devices(config, *, num_devices: int, process_count: int) -> int:
    """The mesh fits the devices and both batch sizes split over them; returns the
    number of data-parallel devices."""
    try:
        data_devices = mesh_lib.resolve_mesh_shape(config.mesh_shape, num_devices)[0]
    except ValueError as err:
        raise ConfigValueError(str(err)) from err
    check_batch_size(config, data_devices, process_count)
    unit = math.lcm(data_devices, process_count)
    if config.eval_batch_size % unit:
        raise ConfigValueError(
            f"config.eval_batch_size={config.eval_batch_size} must be divisible by the "
            f"{data_devices} data-parallel devices and the {process_count} processes; use e.g. "
            f"--config.eval_batch_size={_nearest_multiple(config.eval_batch_size, unit)}.")
    return data_devices


# ----------------------------------------------------------------------------- resume


# What a checkpoint's shapes and meaning depend on: resuming (or evaluating) with other
# values would fail inside Orbax or, worse, silently mix two runs.
RESUME_FIELDS = ("model", "model_overrides", "num_classes", "image_size", "data_dir")
# And what the saved data position means (the reader refuses a position saved under
# other values): training only, since evaluation reads no position.
RESUME_DATA_FIELDS = ("seed", "batch_size")


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


def _architecture(overrides) -> dict:
    """Model overrides without the speed options, which change no parameter or function
    (`models.SPEED_OPTIONS`): a run resumes under any setting of those."""
    from msff_jax.models import SPEED_OPTIONS

    return {k: v for k, v in (plain(overrides) or {}).items() if k not in SPEED_OPTIONS}


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
    for field in RESUME_FIELDS + (RESUME_DATA_FIELDS if mode == "train" else ()):
        if field in RESUME_DATA_FIELDS and field not in saved:
            continue
        old, new = saved.get(field), current.get(field)
        if field == "data_dir":
            if not _same_data(old, new):
                differing.append(f"data_dir {old!r} -> {new!r}")
        elif field == "model_overrides":
            if _architecture(old) != _architecture(new):
                differing.append(f"{field} {old!r} -> {new!r}")
        elif plain(old) != plain(new):
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


# ----------------------------------------------------------------------------- all of it


def check_config(config, *, num_devices: int, process_count: int, mode: str = "train") -> dict:
    """Every check, the data directory's manifest last; returns the manifest."""
    check_fields(config, mode=mode)
    check_devices(config, num_devices=num_devices, process_count=process_count)
    if not config.data_dir or not os.path.isdir(config.data_dir):
        kind = what_is(config.data_dir) if config.data_dir else ""
        raise PathError(
            f"config.data_dir={config.data_dir!r} is "
            f"{'not a directory but ' + kind if kind else 'not a directory'}; set "
            "--config.data_dir to the output of the converter (data_pipeline.conversion.deepfashion) "
            "or run configs/demo.py.")
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
