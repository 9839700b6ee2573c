"""Every file of a real checkpoint step, removed or cut short, is found before restoring
(msff_jax.train.checkpoint_files): the step is set aside with a warning naming it and
resume takes the newest intact step, bitwise. One tiny training writes the checkpoints;
each case damages a copy and restores in this process. Then the case seen in practice
(the state's tree metadata gone) resumes through launch.py."""

import logging
import os
import re
import shutil
import subprocess

import jax
import numpy as np
import pytest

from msff_jax.train import checkpoint_files
from msff_jax.train import checkpoints as checkpointing
from msff_jax.train import mesh as mesh_lib
from msff_jax.train import optimizers
from msff_jax.train import state as train_state_lib
from tests.test_resume import (REPO, assert_bitwise_equal, launch_args, load_config, run_to_end,
                               subprocess_env, write_tiny_config)

NUM_STEPS = 4  # Checkpoints at steps 3 and 4 (the last, evaluated), both kept.


class Position:
    """The data position, as restore hands it to the iterator."""

    state = None

    def set_state(self, state):
        self.state = state


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from data_pipeline.conversion import digits

    root = tmp_path_factory.mktemp("checkpoint_files")
    digits.write_digits_shards(str(root / "digits"), image_size=32, seed=0)
    config_path = write_tiny_config(str(root), str(root / "digits"), num_steps=NUM_STEPS)
    env = subprocess_env(str(root / "cache"))
    workdir = root / "trained"
    run_to_end(config_path, str(workdir), env)
    steps = sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
    assert steps == [3, NUM_STEPS], steps
    config = load_config(config_path)
    model = train_state_lib.build_model(config)
    tx = optimizers.make_optimizer(config, steps_per_epoch=1)  # Only its state's shapes matter.
    abstract = train_state_lib.abstract_train_state(config, model, tx, mesh_lib.make_mesh(config.mesh_shape),
                                                    jax.random.PRNGKey(0))
    return dict(root=root, config_path=config_path, config=config, env=env, workdir=workdir,
                abstract=abstract, states={step: _restore(workdir, config, abstract, step) for step in steps})


def _restore(workdir, config, abstract, step=None):
    """(step, host state, data position) of `step`, or of the newest intact one."""
    manager = checkpointing.make_manager(str(workdir), config)
    position = Position()
    if step is None:
        step, state = checkpointing.restore_latest_intact(manager, abstract, position)
    else:
        state = checkpointing.restore(manager, step, abstract, position)
    manager.close()
    return step, jax.device_get(state), position.state


def _damage(path, how):
    if how == "removed":
        os.remove(path)
    else:
        os.truncate(path, os.path.getsize(path) // 2)


def test_each_file_of_a_step_missing_or_cut_short_sets_the_step_aside(trained, tmp_path, caplog):
    step_dir = trained["workdir"] / "checkpoints" / str(NUM_STEPS)
    files = sorted(os.path.relpath(os.path.join(root, name), step_dir)
                   for root, _, names in os.walk(step_dir) for name in names)
    # Orbax's metadata, the arrays, the data position, the metrics, the list of files.
    for expected in ("_CHECKPOINT_METADATA", "state/_METADATA", "data_iter/process_0-of-1.json",
                     "metrics/metrics", checkpoint_files.SIZES_FILE):
        assert expected in files, files
    assert all(os.path.getsize(step_dir / f) > 1 for f in files)  # Each can be cut short.
    caplog.set_level(logging.WARNING)
    wrong = []
    for relative in files:
        for how in ("removed", "truncated"):
            workdir = tmp_path / f"{relative.replace('/', '_')}_{how}"
            shutil.copytree(trained["workdir"] / "checkpoints", workdir / "checkpoints")
            _damage(workdir / "checkpoints" / str(NUM_STEPS) / relative, how)
            caplog.clear()
            step, state, position = _restore(workdir, trained["config"], trained["abstract"])
            # Without the list itself, the step's files cannot be compared, but every other
            # file is intact: the step restores as it was.
            expected = NUM_STEPS if (relative, how) == (checkpoint_files.SIZES_FILE, "removed") else 3
            named = re.search(rf"checkpoints/{NUM_STEPS} (cannot be restored|is damaged).*{re.escape(relative)}",
                              caplog.text)
            set_aside = os.path.isdir(workdir / checkpointing.DAMAGED_DIR / str(NUM_STEPS))
            if step != expected or (expected == 3) != bool(named and set_aside):
                wrong.append(f"{relative} {how}: restored step {step}, named {bool(named)}, set aside {set_aside}")
                continue
            _, reference, reference_position = trained["states"][expected]
            assert_bitwise_equal(state, reference)
            assert position == reference_position
            shutil.rmtree(workdir)
    assert not wrong, "\n".join(wrong)


def test_resume_after_the_tree_metadata_of_the_last_step_is_lost(trained, tmp_path):
    workdir = tmp_path / "work"
    shutil.copytree(trained["workdir"], workdir)
    os.remove(workdir / "checkpoints" / str(NUM_STEPS) / "state" / "_METADATA")
    os.remove(workdir / "eval_results.json")
    log = run_to_end(trained["config_path"], str(workdir), trained["env"], "--verbosity=0")
    assert re.search(rf"checkpoints/{NUM_STEPS} cannot be restored.*state/_METADATA is missing", log), log[-3000:]
    assert f"resuming from {checkpointing.checkpoint_dir(str(workdir))} step 3" in log
    assert os.path.isfile(workdir / "eval_results.json")
    assert os.path.isdir(workdir / checkpointing.DAMAGED_DIR / str(NUM_STEPS))
