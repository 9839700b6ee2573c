"""What a person sees: launch.py's mistakes end in one `error:` line and a non-zero exit
status (no traceback); the demo's console stays short and free of library chatter; a
finished workdir explains itself (summary.md); a resume with another config is refused
without touching the workdir."""

import json
import os
import re
import subprocess
import sys

import pytest

from msff_jax import console
from msff_jax.train import config_checks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu")
ENV.pop("MSFF_SHOW_TRACEBACK", None)

# A demo shortened to one epoch on a smaller miniature at 32 px: the same program path.
SHORT_DEMO = ["--config", "configs/demo.py", "--config.num_epochs=1", "--config.image_size=32",
              "--config.demo.num_generated=900", "--config.demo.num_images=450",
              "--config.demo.resize_to=48", "--config.log_every_steps=4"]
LINE_BUDGET = 30


# The demo as a user runs it: this machine's one CPU device, not the eight simulated ones
# conftest.py sets for the sharding tests (which also compile several times slower), and
# no JAX_PLATFORMS (with JAX's CUDA plugin installed and no GPU, nothing must show).
DEMO_ENV = {k: v for k, v in ENV.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}


def _launch(*args, timeout=600, env=ENV):
    return subprocess.run([sys.executable, "launch.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def _one_error_line(result, status: int, *fragments: str) -> str:
    assert result.returncode == status, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------- before JAX is imported


@pytest.fixture(scope="module")
def raising_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("configs") / "broken.py"
    path.write_text("def get_config():\n    raise RuntimeError('boom')\n")
    return str(path)


@pytest.mark.parametrize("case", ["field_typo", "missing_config", "raising_config",
                                  "refused_config_argument", "flag_typo",
                                  "eval_missing_workdir", "export_without_checkpoint",
                                  "workdir_is_a_file"])
def test_command_line_mistakes(case, tmp_path, raising_config):
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "a_file").write_text("x")
    demo = ["--config", "configs/demo.py"]
    args, status, fragments = {
        "field_typo": (demo + ["--workdir", str(tmp_path / "w"), "--config.batch_sise=3"], 2,
                       ["--config.batch_sise", "did you mean batch_size"]),
        "missing_config": (["--config", "configs/nope.py", "--workdir", str(tmp_path / "w")], 2,
                           ["configs/nope.py does not exist", "configs/default.py"]),
        "raising_config": (["--config", raising_config, "--workdir", str(tmp_path / "w")], 2,
                           [f"{raising_config}, line 2 raised RuntimeError: boom"]),
        # get_config(ARG) raising while absl parses the flags (another path in ml_collections).
        "refused_config_argument": (["--config", "configs/digits.py:huge", "--workdir",
                                     str(tmp_path / "w")], 2,
                                    ["config file configs/digits.py, line", "raised ValueError",
                                     "'' or 'tiny', not 'huge'"]),
        "flag_typo": (demo + ["--wrkdir", str(tmp_path / "w")], 2, ["wrkdir", "workdir"]),
        "eval_missing_workdir": (demo + ["--workdir", str(tmp_path / "nowhere"), "--mode", "eval"], 1,
                                 [f"{tmp_path / 'nowhere'} does not exist"]),
        "export_without_checkpoint": (demo + ["--workdir", str(tmp_path / "empty_run"), "--mode",
                                              "export"], 1, ["no checkpoint in", "train first"]),
        "workdir_is_a_file": (demo + ["--workdir", str(tmp_path / "a_file")], 1, ["is a file"]),
    }[case]
    result = _launch(*args)
    _one_error_line(result, status, *fragments)
    assert result.stderr.strip().count("\n") == 0  # nothing but the error line
    assert not (tmp_path / "w").exists() and not (tmp_path / "nowhere").exists()
    assert os.listdir(tmp_path / "empty_run") == []


# ---------------------------------------------------------------- after JAX is imported


def test_model_override_the_model_does_not_accept(tmp_path):
    result = _launch("--config", "configs/demo.py", "--workdir", str(tmp_path / "w"),
                     "--config.model=resnet50")
    _one_error_line(result, 2, "config.model_overrides=", "config.model='resnet50'", "stem_widths")
    assert not (tmp_path / "w" / "data").exists()  # checked before the demo data is made


def test_out_of_memory_names_the_batch_size(tmp_path):
    """XLA's RESOURCE_EXHAUSTED (the real exception type, raised by a stand-in for the
    training loop) becomes advice naming config.batch_size."""
    driver = (
        "import sys, types, jax\n"
        "import msff_jax.train\n"
        "from msff_jax import main\n"
        "def out_of_memory(config, workdir):\n"
        "    raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying "
        "to allocate 17179869184 bytes.')\n"
        "loop = types.ModuleType('msff_jax.train.loop')\n"  # a stand-in: no Orbax import
        "loop.train_and_evaluate = out_of_memory\n"
        "sys.modules['msff_jax.train.loop'] = msff_jax.train.loop = loop\n"
        f"sys.argv = ['launch.py', '--config', 'configs/default.py', '--workdir', {str(tmp_path / 'w')!r},"
        " '--config.batch_size=96']\n"
        "main.run()\n")
    result = subprocess.run([sys.executable, "-c", driver], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=ENV)
    _one_error_line(result, 1, "ran out of memory", "config.batch_size=96", "--config.batch_size",
                    "--config.grad_accum_steps", "bfloat16")


# ---------------------------------------------------------------- the demo, shortened


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo") / "run"
    result = _launch(*SHORT_DEMO, "--workdir", str(workdir), env=DEMO_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_demo_console_is_short_and_quiet(demo_run):
    workdir, result = demo_run
    lines = (result.stdout + result.stderr).strip().splitlines()
    # Slow-compile alarms are XLA's warnings about an overloaded machine, not chatter.
    lines = [line for line in lines if "slow_operation_alarm" not in line and "Compiling module" not
             in line and "Very slow compile" not in line and line.strip("*").strip()]
    assert len(lines) <= LINE_BUDGET, "\n".join(lines)
    text = "\n".join(lines)
    for chatter in ("orbax", "Orbax", "oneDNN", "libtpu", "backend 'tpu'", "Matplotlib", "font cache",
                    "_NonBlockingMetadataStore", "Traceback", "absl::InitializeLog",
                    "cudart_stub", "CUDA", "cuda drivers", "plugin"):
        assert chatter not in text, (chatter, text)
    assert not re.search(r"^[IWE]\d{4} ", text, re.MULTILINE), text  # no absl-formatted log lines
    # The parts a person looks for, in order.
    assert lines[1].startswith("msff_ecomnet: ") and "parameters" in lines[1], text
    assert any(line.strip().startswith("devices") and "mesh" in line for line in lines)
    assert any(line.strip().startswith("data") and "train" in line for line in lines)
    assert any(line.startswith("step ") and "loss" in line and "ETA" in line and "img/s" in line
               for line in lines)
    assert any(line.startswith("eval step") and "checkpoint step" in line for line in lines)
    done = next(i for i, line in enumerate(lines) if line.startswith("done in"))
    assert "test" in lines[done] and "top1" in lines[done]
    assert f"tensorboard --logdir {workdir}/tensorboard" in text
    assert "--mode=export" in lines[-1]


def test_workdir_explains_itself(demo_run):
    workdir, _ = demo_run
    summary = (workdir / "summary.md").read_text()
    results = json.loads((workdir / "eval_results.json").read_text())
    assert f"| top-1 accuracy | {results['top1']:.4f} |" in summary
    assert f"step {results['step']}" in summary
    for command in ("--mode=eval", "--mode=export", "msff-predict --export_dir"):
        assert command in summary, command
    assert "--config.num_epochs=1" in summary  # the command that ran, overrides included


def test_resume_with_another_config_is_refused_untouched(demo_run):
    workdir, _ = demo_run
    before = {p: p.read_bytes() for p in (workdir / "config.json", workdir / "summary.md")}
    checkpoints = sorted(os.listdir(workdir / "checkpoints"))
    result = _launch(*SHORT_DEMO, "--workdir", str(workdir),
                     "--config.model_overrides.stage_widths=(32, 64, 96, 160)",
                     "--config.num_classes=15", env=DEMO_ENV)
    line = _one_error_line(result, 1, "holds checkpoints of a different run", "model_overrides",
                           "new --workdir", str(workdir / "checkpoints"))
    assert "num_classes" not in line  # only the fields that differ are named
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(os.listdir(workdir / "checkpoints")) == checkpoints


# ---------------------------------------------------------------- helpers, in process


def test_guarded_prints_one_line_and_a_status(capsys):
    def mistake():
        raise console.ConfigError("config.batch_size=3 must be even;\n  use 4.")

    assert console.guarded(mistake) == 1
    assert capsys.readouterr().err == "error: config.batch_size=3 must be even; use 4.\n"

    def bug():
        raise KeyError("x")

    assert console.guarded(bug) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: KeyError: 'x'") and "--show_traceback" in err
    assert "Traceback" not in err
    assert console.guarded(bug, show_traceback=True) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    assert console.guarded(lambda: None) == 0 and console.guarded(lambda: 2) == 2


def test_progress_bar_draws_only_on_a_terminal(capsys):
    with console.progress(total=3, desc="work") as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""
    with console.progress(total=3, desc="work", force=True) as bar:
        bar.update(3)
    assert "work" in capsys.readouterr().err


def test_resume_check_compares_data_by_content(tmp_path):
    """Moved data (same classes and split sizes) resumes; other data is refused."""
    from configs import default

    def data(name, classes, train):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps(
            {"class_names": classes, "splits": {"train": {"num_examples": train}}}))
        return str(folder)

    old, moved, other = data("old", ["a", "b"], 10), data("moved", ["a", "b"], 10), data("o", ["a", "c"], 10)
    workdir = tmp_path / "work"
    (workdir / "checkpoints" / "5").mkdir(parents=True)
    config = default.get_config()
    config.data_dir, config.num_classes = old, 2
    (workdir / "config.json").write_text(config.to_json_best_effort())
    config_checks.check_resume(config, str(workdir))
    config.data_dir = moved
    config_checks.check_resume(config, str(workdir))
    config.data_dir = other
    with pytest.raises(console.ConfigError, match="data_dir"):
        config_checks.check_resume(config, str(workdir))
    with pytest.raises(console.ConfigError, match="Pass the config"):
        config_checks.check_resume(config, str(workdir), mode="eval")


def test_a_per_model_config_of_older_releases_says_what_replaced_it():
    from msff_jax import main

    message = main._moved_config("configs/resnet50.py")
    assert "--config configs/default.py:resnet50" in message
    assert main._moved_config("configs/nope.py") is None
    assert main._moved_config("elsewhere/resnet50.py") is None


@pytest.mark.parametrize("argv, asked", [
    ([], False),
    (["--show_traceback"], True),
    (["--show_traceback=true"], True),
    (["-show_traceback=1"], True),
    (["--show_traceback=f"], False),
    (["--show_traceback=False"], False),
    (["--show_traceback", "--noshow_traceback"], False),  # The last one wins, as in absl.
    (["--noshow_traceback", "--show_traceback"], True),
    (["--", "--show_traceback"], False),  # After `--`: not a flag.
])
def test_traceback_asked_reads_the_flag_as_absl_does(argv, asked, monkeypatch):
    monkeypatch.delenv("MSFF_SHOW_TRACEBACK", raising=False)
    assert console.traceback_asked(["--workdir", "w"] + argv) is asked


# ---------------------------------------------------------------- what counts as unexpected


def test_os_errors_on_the_users_paths_are_named_as_what_they_are(tmp_path):
    import errno

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    cases = [
        (PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "shard.tfrecord")),
         ["shard.tfrecord: permission denied", "ls -ld", "read and write"]),
        (PermissionError(errno.EPERM, "Operation not permitted", str(tmp_path)),
         [f"{tmp_path}: operation not permitted", "a folder"]),
        (OSError(errno.EROFS, "Read-only file system", str(tmp_path / "w")),
         ["read-only file system", "writable disk"]),
        (FileExistsError(errno.EEXIST, "File exists", str(a_file)),
         [f"{a_file} is a file, where a folder is needed"]),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", str(a_file / "sub" / "x")),
         [f"{a_file} is a file, where a folder is needed"]),
        (IsADirectoryError(errno.EISDIR, "Is a directory", str(tmp_path)),
         [f"{tmp_path} is a folder, where a file is needed"]),
        (FileExistsError(errno.EEXIST, "File exists", str(fifo)),
         ["is a FIFO (named pipe), where a folder is needed"]),
        (OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x")),
         ["the disk is full"]),
    ]
    # Raised by our own code with a message that names the path: printed as it is.
    cases.append((FileNotFoundError(f"export directory {tmp_path / 'e'} does not exist"),
                  [f"export directory {tmp_path / 'e'} does not exist"]))
    for err, fragments in cases:
        message, status = console.describe_exception(err)
        assert status == 1 and "unexpected" not in message and "Errno" not in message, message
        for fragment in fragments:
            assert fragment in message, (fragment, message)


def test_user_errors_of_other_packages_are_not_called_unexpected():
    """Damaged data, weights of another model, divergence, a config no run could use:
    the user's to fix, one line each; only our own bugs are 'unexpected'."""
    from data_pipeline.records import manifest, tfrecord_format
    from msff_jax.models.torch_weights import WeightConversionError
    from msff_jax.train.checkpoints import CheckpointWriteError, DamagedCheckpointError
    from msff_jax.train.loop import NonFiniteLossError

    damaged = tfrecord_format.TFRecordCorruptionError("/d/train-0.tfrecord: record 2 at byte 9: "
                                                      "data checksum mismatch")
    message, status = console.describe_exception(damaged)
    assert status == 1 and "unexpected" not in message
    assert message.startswith("/d/train-0.tfrecord: record 2") and "re-run the conversion" in message
    for err in (manifest.MissingShardError("2 shards are missing"),
                manifest.ShardChecksumError("x: SHA-256 differs", "x"),
                WeightConversionError("w.safetensors: state dict does not fit resnet50"),
                DamagedCheckpointError("c/4: the checkpoint is damaged"),
                CheckpointWriteError("saving step 4 failed: the disk is full"),
                NonFiniteLossError("non-finite loss at step 3")):
        message, status = console.describe_exception(err)
        assert status == 1 and "unexpected" not in message, message
    message, status = console.describe_exception(console.ConfigValueError("config.x=0 must be 1"))
    assert status == console.EXIT_USAGE and message == "config.x=0 must be 1"
    message, _ = console.describe_exception(KeyError("x"))
    assert "unexpected" in message  # Our own bug.
