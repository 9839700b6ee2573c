"""Synthetic data never by surprise (msff_jax.train.demo_data): a demo recipe makes its
miniature only in a new or empty folder (the data_dir it was given, or WORKDIR/data/shards
when that is empty), says so naming the folder every time it does, and writes nothing
anywhere else; a data_dir holding something else is one clear error and stays as it
was; a run stopped halfway is finished by the rerun; a recipe that is not a demo never
makes data."""

import os
import subprocess
import sys

import pytest

from configs import demo
from msff_jax import console
from msff_jax.train import demo_data
from tests.test_resume import REPO


def _config(data_dir=""):
    """configs/demo.py, with a miniature small enough for a test (75 images of 200)."""
    config = demo.get_config()
    config.demo.num_generated = 200
    config.demo.num_images = 75
    config.demo.resize_to = 32
    config.demo.convert_workers = 1
    config.data_dir = str(data_dir)
    return config


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names)


def test_a_new_data_dir_gets_the_data_with_a_line_naming_it(tmp_path, capsys):
    data_dir, workdir = tmp_path / "typo" / "shards", tmp_path / "work"
    config = _config(data_dir)
    assert demo_data.prepare_data(config, str(workdir)) == str(data_dir) == config.data_dir
    said = capsys.readouterr().out
    assert f"demo: making synthetic data: 200 DeepFashion-style images in {data_dir}/synthetic_deepfashion, " \
           f"75 of them converted to shards in {data_dir}" in said
    assert (data_dir / "manifest.json").is_file()
    files = _tree(tmp_path)
    assert all(f.startswith("typo/shards/") for f in files)  # Nothing in the workdir, nothing else.
    assert any(f.startswith("typo/shards/synthetic_deepfashion/Img/") for f in files)
    assert not any(demo_data.INCOMPLETE_MARK in f for f in files)
    # Made once: the rerun uses it and says nothing.
    made = (data_dir / "manifest.json").stat().st_mtime_ns
    demo_data.prepare_data(_config(data_dir), str(workdir))
    assert capsys.readouterr().out == "" and (data_dir / "manifest.json").stat().st_mtime_ns == made


def test_an_empty_data_dir_means_the_workdir(tmp_path, capsys):
    workdir = tmp_path / "work"
    config = _config("")
    demo_data.prepare_data(config, str(workdir))
    shards = workdir / "data" / "shards"
    assert config.data_dir == str(shards) and (shards / "manifest.json").is_file()
    assert f"converted to shards in {shards}" in capsys.readouterr().out
    assert all(f.startswith("work/data/shards/") for f in _tree(tmp_path))


def test_a_data_dir_holding_something_else_is_an_error_and_stays_as_it_was(tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(console.PathError, match=rf"config.data_dir='{other}' holds no shards \(no "
                                                r"manifest.json\) but other files \(notes.txt\)"):
        demo_data.prepare_data(_config(other), str(tmp_path / "work"))
    assert _tree(tmp_path) == ["other/notes.txt"]
    with pytest.raises(console.PathError, match=r"notes.txt' is a file, not a folder of shards"):
        demo_data.prepare_data(_config(other / "notes.txt"), str(tmp_path / "work"))
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    real_listdir = os.listdir

    def listdir(path="."):
        if os.fspath(path) == str(unreadable):
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(console.PathError, match=r"unreadable' cannot be read \(Permission denied\)"):
        demo_data.prepare_data(_config(unreadable), str(tmp_path / "work"))
    monkeypatch.undo()
    assert _tree(tmp_path) == ["other/notes.txt"]


def test_data_made_halfway_is_finished_by_the_rerun(tmp_path, capsys):
    data_dir = tmp_path / "shards"
    (data_dir / "synthetic_deepfashion" / "Img").mkdir(parents=True)
    (data_dir / demo_data.INCOMPLETE_MARK).write_text("")
    (data_dir / "train-00000-of-00001.tfrecord.partial").write_bytes(b"cut")
    demo_data.prepare_data(_config(data_dir), str(tmp_path / "work"))
    assert (data_dir / "manifest.json").is_file() and not (data_dir / demo_data.INCOMPLETE_MARK).exists()
    assert "demo: making synthetic data" in capsys.readouterr().out


def test_a_recipe_that_is_not_a_demo_never_makes_data(tmp_path):
    missing = tmp_path / "missing"
    result = subprocess.run(
        [sys.executable, "launch.py", "--config", "configs/digits.py:tiny", "--workdir", str(tmp_path / "work"),
         f"--config.data_dir={missing}"], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
    assert result.returncode == 1 and f"config.data_dir='{missing}' is not a directory" in result.stderr, \
        result.stderr[-2000:]
    assert os.listdir(tmp_path) == []  # Neither the data nor the workdir.
