"""The config rules: every numeric field of configs/default.py, given 0, a negative, nan
and an absurd value, is either refused before any work with one `error:` line naming the
field and a value that works (exit status 2, no traceback, the workdir untouched) or
accepted because the value means something the table documents.

Most cases run in this process through `main.run_mode`, the function launch.py calls
after parsing its flags; a nan given to an integer field never gets that far (the flag
parser refuses it), so those cases are real `python launch.py` runs, which stop before
JAX is imported. A handful of real runs show the whole path for values that parse.
"""

import ast
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from configs import default
from msff_jax import console, main
from msff_jax.train import config_checks

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, JAX_PLATFORMS="cpu")
ENV.pop("MSFF_SHOW_TRACEBACK", None)

# The four values each field is tried with; ints get ints, floats floats.
BAD_VALUES = {"zero": 0, "negative": -5, "nan": math.nan, "absurd": 10**12}

# The cases the table accepts, each with the meaning it documents; every other case
# must be refused.
MEANINGFUL = {
    ("seed", "zero"): "seed 0",
    ("data.worker_count", "zero"): "decodes in the training process",
    ("optimizer.momentum", "zero"): "plain SGD",
    ("optimizer.b1", "zero"): "no first-moment averaging",
    ("optimizer.b2", "zero"): "no second-moment averaging",
    ("optimizer.warmup_epochs", "zero"): "no warm-up",
    ("optimizer.end_learning_rate", "zero"): "the cosine decays to zero",
    ("optimizer.weight_decay", "zero"): "no weight decay",
    ("grad_clip_norm", "zero"): "no clipping",
    ("label_smoothing", "zero"): "no smoothing",
    ("ema_decay", "zero"): "no EMA",
    ("checkpoint.every_steps", "zero"): "saves only at evaluations and the end",
    ("workdir_lock_wait_secs", "zero"): "a second launch is refused at once",
    ("mean_rgb[0]", "zero"): "a channel left uncentred",
    ("mean_rgb[1]", "zero"): "a channel left uncentred",
    ("mean_rgb[2]", "zero"): "a channel left uncentred",
}


def numeric_fields(node=None, prefix=""):
    """(name, dotted field, index or None, default) of every int, float and tuple entry
    of numbers in the default config, nested ConfigDicts included (bools are not numbers)."""
    node = default.get_config() if node is None else node
    for key, value in node.items():
        field = prefix + key
        if hasattr(value, "items"):
            yield from numeric_fields(value, field + ".")
        elif isinstance(value, bool):
            continue
        elif isinstance(value, (int, float)):
            yield field, field, None, value
        elif isinstance(value, tuple) and value and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            for index in range(len(value)):
                yield f"{field}[{index}]", field, index, value


CASES = [(name, field, index, original, kind)
         for name, field, index, original in numeric_fields() for kind in BAD_VALUES]


def _value(original, index, kind):
    """The bad value in the field's own type (a tuple with one entry replaced)."""
    bad = BAD_VALUES[kind]
    entry = original if index is None else original[index]
    if isinstance(entry, float) or kind == "nan":
        bad = float(bad)
    if index is None:
        return bad
    return tuple(bad if i == index else v for i, v in enumerate(original))


def _set(config, field, value):
    node = config
    *parents, leaf = field.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value


def _one_error_line(err: str, field: str, *, nothing_else: bool = True) -> str:
    """The one `error:` line naming the field; with `nothing_else`, stderr holds nothing
    more (a run that got as far as importing JAX may also carry the machine's own
    start-up notices)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    if nothing_else:
        assert len(lines) == 1, err
    assert "Traceback" not in err and "unexpected" not in err, err
    assert f"config.{field}" in errors[0], (field, errors[0])
    return errors[0]


def test_the_walk_covers_every_numeric_field():
    fields = {field for _, field, _, _ in numeric_fields()}
    # Nested ones included, and every one of them has a rule in the table.
    assert {"optimizer.base_learning_rate", "data.worker_count", "checkpoint.keep",
            "loss_scale.initial", "mesh_shape", "mean_rgb"} <= fields
    assert fields <= {rule.field for rule in config_checks.RULES}
    assert len(CASES) == 4 * len(list(numeric_fields()))


@pytest.mark.parametrize("name, field, index, original, kind", CASES,
                         ids=[f"{c[0]}={c[4]}" for c in CASES])
def test_every_numeric_field_with_a_bad_value(name, field, index, original, kind, tmp_path, capsys):
    value = _value(original, index, kind)
    workdir = tmp_path / "run"
    if isinstance(original if index is None else original[index], int) and kind == "nan" \
            and index is None:
        # ml_collections refuses nan for an integer field while parsing the command line.
        result = subprocess.run(
            [sys.executable, "launch.py", "--config", "configs/default.py", "--workdir",
             str(workdir), f"--config.{field}=nan"],
            cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
        assert result.returncode == 2, result.stderr
        line = _one_error_line(result.stderr, field)
        assert f"--config.{field}=nan" in line
        assert not workdir.exists()
        return
    config = default.get_config()
    _set(config, field, value)
    if (name, kind) in MEANINGFUL:
        config_checks.check_fields(config)  # Accepted: the value means something.
        return
    status = console.guarded(lambda: main.run_mode(config, str(workdir), "train"))
    err = capsys.readouterr().err
    assert status == console.EXIT_USAGE, err
    line = _one_error_line(err, field)
    assert not workdir.exists()
    # The message offers a value, and that value passes the rules.
    suggested = re.search(rf"--config\.{re.escape(field)}=('[^']*'|\S+?)\.?$", line)
    assert suggested, line
    text = suggested.group(1).strip("'")
    fixed = default.get_config()
    _set(fixed, field, ast.literal_eval(text))
    config_checks.check_rules(fixed)
    assert ast.literal_eval(text) != value


def test_meaningful_values_are_documented_in_the_table():
    rules = {rule.field: rule for rule in config_checks.RULES}
    for name, _ in MEANINGFUL:
        field = name.split("[")[0]
        assert rules[field].meaning, field


@pytest.mark.parametrize("override, field", [
    ("--config.batch_size=0", "batch_size"),  # was a ZeroDivisionError after start-up
    ("--config.num_train_steps=-5", "num_train_steps"),  # was silently "use num_epochs"
    ("--config.optimizer.base_learning_rate=nan", "optimizer.base_learning_rate"),
    ("--config.label_smoothing=2.0", "label_smoothing"),  # was accepted with exit 0
])
def test_the_issue_values_through_launch(override, field, tmp_path):
    """The whole path, on the study's CPU miniature config the mistakes were found with."""
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "launch.py", "--config", "configs/study.py:msff_ecomnet,demo,tiny",
         "--workdir", str(workdir), override],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 2, result.stderr[-2000:]
    _one_error_line(result.stderr, field, nothing_else=False)
    assert not workdir.exists()  # Not even the demo data was made.


def _study_config(**changes):
    from configs import study

    config = study.get_config("msff_ecomnet,demo,tiny")
    for field, value in changes.items():
        _set(config, field, value)
    return config


def test_grad_accum_steps_zero_offers_a_working_value():
    with pytest.raises(console.ConfigValueError) as error:
        config_checks.check_fields(_study_config(grad_accum_steps=0))
    message = str(error.value)
    assert "config.grad_accum_steps=0" in message and "--config.grad_accum_steps=1" in message
    assert "--config.batch_size" not in message


def test_batch_sizes_against_devices_processes_and_micro_batches():
    config = _study_config(batch_size=32, grad_accum_steps=3)
    with pytest.raises(console.ConfigValueError) as error:
        config_checks.check_devices(config, num_devices=8, process_count=1)
    message = str(error.value)
    assert "a multiple of 24" in message
    assert "--config.batch_size=24" in message and "--config.grad_accum_steps=2" in message
    config = _study_config(batch_size=32, eval_batch_size=36)
    with pytest.raises(console.ConfigValueError, match=r"eval_batch_size=36 .* e\.g\. --config\.eval_batch_size=40"):
        config_checks.check_devices(config, num_devices=8, process_count=2)
    config = _study_config(batch_size=24, eval_batch_size=24)
    with pytest.raises(console.ConfigValueError, match="by the 16 processes .*batch_size=32"):
        config_checks.check_devices(config, num_devices=8, process_count=16)
    assert config_checks.check_devices(_study_config(batch_size=32), num_devices=8,
                                       process_count=1) == 8


def test_image_size_against_the_model_smallest_input():
    """Every model accepts a 1-pixel image without complaint (padding fills the rest);
    the rule refuses crops smaller than the model's total stride."""
    with pytest.raises(console.ConfigValueError, match=r"image_size=16 .*msff_ecomnet's smallest input, 32 px"):
        config_checks.check_fields(_study_config(image_size=16, model_overrides={}))
    tiny = _study_config(image_size=8)  # The tiny preset strides by 8 only.
    config_checks.check_fields(tiny)
    with pytest.raises(console.ConfigValueError, match="smallest input, 8 px.*image_size=8"):
        config_checks.check_fields(_study_config(image_size=4))


def test_pretrained_path_for_a_model_without_a_weight_mapping(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(console.ConfigValueError, match="no torchvision weight mapping"):
        config_checks.check_fields(_study_config(pretrained_path=str(weights)))
    # Not in eval or export, which never load them.
    config_checks.check_fields(_study_config(pretrained_path=str(weights)), mode="eval")
    config = _study_config(model="resnet50", model_overrides={}, image_size=32,
                           pretrained_path=str(tmp_path))
    with pytest.raises(console.PathError, match="pretrained_path=.* is a folder"):
        config_checks.check_fields(config)


def test_num_train_steps_sentinel_is_minus_one_only():
    from msff_jax.train import optimizers

    assert optimizers.total_train_steps(_study_config(num_train_steps=-1, num_epochs=3), 10) == 30
    assert optimizers.total_train_steps(_study_config(num_train_steps=7), 10) == 7
    with pytest.raises(ValueError, match="num_train_steps=-5"):
        optimizers.total_train_steps(_study_config(num_train_steps=-5), 10)


def test_config_checks_and_state_do_not_import_each_other():
    def imports(path):
        tree = ast.parse((REPO / path).read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        return names

    assert not any("state" in name for name in imports("msff_jax/train/config_checks.py"))
    assert not any("config_checks" in name for name in imports("msff_jax/train/state.py"))


def test_a_resume_with_another_batch_size_or_seed_is_refused_before_any_work(tmp_path):
    """The saved data position means nothing under another global batch or seed (the
    reader would refuse it deep in the start-up); evaluation reads no position."""
    config = _study_config()
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "4").mkdir(parents=True)
    (workdir / "config.json").write_text(config.to_json_best_effort())
    config_checks.check_resume(config, str(workdir))
    for field, value in (("batch_size", 64), ("seed", 3)):
        changed = _study_config(**{field: value})
        with pytest.raises(console.ConfigError, match=rf"different run: {field} \d+ -> {value}"):
            config_checks.check_resume(changed, str(workdir))
        config_checks.check_resume(changed, str(workdir), mode="eval")
