"""Configuration errors stop before anything is compiled, with a message saying what to
change; launch.py wires flags, config files and overrides."""

import os
import subprocess
import sys

import jax
import pytest

from configs import default
from data_pipeline.conversion import digits
from msff_jax.train import steps
from msff_jax.train import loop as train
from msff_jax.train import state as train_state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    digits.write_digits_shards(str(out), image_size=8, seed=0)
    return str(out)


@pytest.fixture
def no_compilation(monkeypatch):
    """Any attempt to build the state or compile a step fails the test."""
    def forbidden(*args, **kwargs):
        raise AssertionError("compilation started before the config was checked")

    for module, name in ((train_state_lib, "create_train_state"), (train_state_lib, "abstract_train_state"),
                         (steps, "make_train_step"), (steps, "make_eval_step")):
        monkeypatch.setattr(module, name, forbidden)


def _config(digits_dir, **changes):
    config = default.get_config()
    # 32 px: MSFF-EComNet's smallest input (its total stride; smaller sizes are refused).
    config.data_dir, config.num_classes, config.image_size = digits_dir, 10, 32
    config.batch_size = config.eval_batch_size = 16
    config.update(changes)
    return config


@pytest.mark.parametrize("changes, message", [
    ({"model": "resnet51"}, r"config.model='resnet51' is unknown; set --config.model to one of .*msff_ecomnet"),
    ({"batch_size": 12}, r"config.batch_size=12 must be divisible by the 8 data-parallel devices.*--config.batch_size=16"),
    ({"data_dir": "/nonexistent/shards"}, r"config.data_dir='/nonexistent/shards' is not a directory; set --config.data_dir"),
    ({"num_classes": 15}, r"config.num_classes=15 but .* lists 10 classes; set --config.num_classes=10"),
    ({"dtype": "float8"}, r"config.dtype='float8' is unknown"),
    ({"mesh_shape": (3, -1)}, r"mesh_shape=\(3, -1\) does not divide the 8 devices"),
    ({"data": {"image_backend": "skimage"}}, r"config.data.image_backend='skimage' is unknown"),
])
def test_config_errors_stop_before_compilation(digits_dir, tmp_path, no_compilation, changes, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train.train_and_evaluate(_config(digits_dir, **changes), str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_data_dir_without_manifest(tmp_path, no_compilation):
    config = _config(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        train.train_and_evaluate(config, str(tmp_path / "work"))


def test_launch_command_line_override_reaches_the_check(digits_dir, tmp_path):
    """`--config file --config.field=value` overrides are applied, and the error surfaces
    on stderr with a non-zero exit and no traceback noise hiding it."""
    result = subprocess.run(
        [sys.executable, "launch.py", "--config", "configs/default.py", "--workdir", str(tmp_path),
         f"--config.data_dir={digits_dir}", "--config.num_classes=10", "--config.model=vgg16"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 2  # A config no run could use, like a flag that does not parse.
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "config.model='vgg16' is unknown" in errors[0], result.stderr
    assert not os.path.exists(tmp_path / "checkpoints")
    assert not os.path.exists(tmp_path / "config.json")


def test_every_config_file_loads():
    import importlib

    from msff_jax.models import MODEL_NAMES

    for name in ("default", "demo", "digits"):
        config = importlib.import_module(f"configs.{name}").get_config()
        train_state_lib.compute_dtype(config)
        assert config.model in MODEL_NAMES, name
    # The per-model configs of the study are `configs/default.py:MODEL`.
    for model in MODEL_NAMES:
        assert default.get_config(model).model == model
    assert jax.device_count() == 8
