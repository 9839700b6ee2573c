"""Exact resume: SIGKILL or SIGTERM at a random step, rerun the same command, and the
final parameters are bitwise those of an uninterrupted run.

All runs are real `launch.py` processes on one small digits shard set, sharing a JAX
compilation cache so only the first one pays for compilation.
"""

import os
import random
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from data_pipeline.conversion import digits
from msff_jax.train import checkpoints as checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 12

# configs/digits.py:tiny with this test's data and length.
CONFIG_TEMPLATE = '''
from configs import digits


def get_config():
    config = digits.get_config("tiny")
    config.model_overrides.update({model_extra!r})
    config.data_dir = {data_dir!r}
    config.num_train_steps = {num_steps}
    return config
'''


def write_tiny_config(directory, data_dir, num_steps=NUM_STEPS, **model_extra):
    path = os.path.join(directory, "tiny_config.py")
    with open(path, "w") as f:
        f.write(CONFIG_TEMPLATE.format(data_dir=data_dir, num_steps=num_steps, model_extra=model_extra))
    return path


def load_config(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def subprocess_env(cache_dir, device_count=8):
    """Simulated CPU devices; LLVM optimisation off (compiles ~3x faster, and these tiny
    models run as fast); a persistent compilation cache shared by the runs."""
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={device_count} "
                          "--xla_backend_optimization_level=0",
                JAX_COMPILATION_CACHE_DIR=cache_dir,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def launch_args(config_path, workdir, *extra):
    return [sys.executable, "launch.py", "--config", config_path, "--workdir", workdir, *extra]


def run_to_end(config_path, workdir, env, *extra_args, timeout=600):
    result = subprocess.run(launch_args(config_path, workdir, *extra_args), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def run_and_signal(config_path, workdir, env, sig, at_step, *extra_args, timeout=600):
    """Starts training and sends `sig` once the log shows step `at_step` finished (a
    SIGTERM is sent by the run itself right after that step, through the test hook of
    msff_jax.train.preemption, so it lands at exactly that step)."""
    if sig == signal.SIGTERM:
        env = dict(env, MSFF_TEST_SIGTERM=f"train_step:{at_step}:self")
    process = subprocess.Popen(launch_args(config_path, workdir, *extra_args), cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, sent = [], False
    try:
        for line in process.stdout:
            lines.append(line)
            if sig == signal.SIGTERM:
                sent = sent or "test hook MSFF_TEST_SIGTERM" in line
                continue
            # The progress line (`step  4/12 ...`), or absl's metric line at --verbosity=0.
            match = re.search(r"^step\s+(\d+)/\d+|\] \[(\d+)\] train/", line)
            if not sent and match and int(match.group(1) or match.group(2)) >= at_step:
                process.send_signal(sig)
                sent = True
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    assert sent, "training ended before the signal could be sent:\n" + "".join(lines[-30:])
    return process.returncode, "".join(lines)


def final_params(config_path, workdir):
    variables, step = checkpointing.restore_for_inference(load_config(config_path), workdir, "latest")
    return jax.device_get(variables), step


def assert_bitwise_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data_dir = str(root / "digits")
    digits.write_digits_shards(data_dir, image_size=32, seed=0)
    config_path = write_tiny_config(str(root), data_dir)
    env = subprocess_env(str(root / "jax_cache"))
    reference = str(root / "reference")
    run_to_end(config_path, reference, env)
    params, step = final_params(config_path, reference)
    assert step == NUM_STEPS
    return dict(root=root, config=config_path, env=env, reference=reference, params=params)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_interrupted_run_resumes_bitwise(setup, sig):
    at_step = random.Random().randint(4, NUM_STEPS - 2)  # Checkpoints every 3 steps.
    workdir = str(setup["root"] / f"interrupted_{sig.name}")
    returncode, log = run_and_signal(setup["config"], workdir, setup["env"], sig, at_step)
    if sig == signal.SIGTERM:
        # Preemption: a checkpoint at the step it stopped, then a clean exit.
        assert returncode == 0, log[-3000:]
        match = re.search(r"checkpoint at step (\d+) written", log)
        assert match, log[-3000:]
        stopped = int(match.group(1))
        assert at_step <= stopped < NUM_STEPS
        assert stopped in checkpointing.make_manager(
            workdir, load_config(setup["config"]), read_only=True).all_steps()
    else:
        assert returncode == -signal.SIGKILL
    committed = []
    if os.path.isdir(checkpointing.checkpoint_dir(workdir)):
        committed = checkpointing.make_manager(workdir, load_config(setup["config"]),
                                               read_only=True).all_steps()
    log = run_to_end(setup["config"], workdir, setup["env"], "--verbosity=0")
    if committed:  # A save still being written when the kill came is not among them.
        assert f"resuming from {checkpointing.checkpoint_dir(workdir)} step {max(committed)}" in log
    params, step = final_params(setup["config"], workdir)
    assert step == NUM_STEPS
    assert_bitwise_equal(params, setup["params"])


def test_step_saved_unevaluated_is_evaluated_on_resume(setup):
    """A preemption on an evaluation step saves that step unevaluated. The rerun
    evaluates it before training on and records the metric in that checkpoint, so the
    validation record has no gap and the step competes for the best checkpoint."""
    workdir = str(setup["root"] / "unevaluated")
    # No evaluation before the end, so the preemption checkpoint has no metrics...
    returncode, log = run_and_signal(setup["config"], workdir, setup["env"], signal.SIGTERM, 4,
                                     "--config.eval_every_steps=100")
    assert returncode == 0, log[-3000:]
    stopped = int(re.search(r"preempted: checkpoint at step (\d+) written", log).group(1))
    assert stopped < NUM_STEPS
    # ...and with evaluations every `stopped` steps, the restored step is owed one.
    log = run_to_end(setup["config"], workdir, setup["env"], f"--config.eval_every_steps={stopped}",
                     "--verbosity=0")
    assert f"step {stopped} was saved without its evaluation (preempted); evaluating it now" in log
    assert re.search(rf"\] \[{stopped}\] val/macro_f1=", log), log[-3000:]
    assert final_params(setup["config"], workdir)[1] == NUM_STEPS


def test_metrics_added_to_a_saved_step_compete_for_the_best(tmp_path):
    import ml_collections

    class Position:
        def get_state(self):
            return {"next_batch": 0}

    config = ml_collections.ConfigDict({"checkpoint": {"every_steps": 1, "keep": 1, "asynchronous": False}})
    manager = checkpointing.make_manager(str(tmp_path), config)
    state = {"w": np.zeros(3, np.float32)}
    best = checkpointing.BEST_METRIC
    checkpointing.save(manager, 4, state, Position(), metrics={best: 0.5}, force=True)
    checkpointing.save(manager, 5, state, Position(), force=True)  # Preempted unevaluated.
    assert manager.best_step() == 4 and manager.metrics(5) is None
    checkpointing.add_metrics(manager, 5, {best: 0.9})
    assert manager.best_step() == 5
    reopened = checkpointing.make_manager(str(tmp_path), config, read_only=True)
    assert reopened.best_step() == 5 and reopened.metrics(5) == {best: 0.9}
    # Kept as the best when later saves rotate the latest ones out.
    checkpointing.save(manager, 6, state, Position(), force=True)
    checkpointing.save(manager, 7, state, Position(), force=True)
    assert 5 in manager.all_steps() and 4 not in manager.all_steps()


def test_uncommitted_checkpoint_is_never_restored(setup, tmp_path):
    """A step directory Orbax had not finished (still under its temporary name) is
    invisible: the manager lists and restores only committed steps."""
    workdir = tmp_path / "work"
    shutil.copytree(setup["reference"], workdir)
    checkpoints = workdir / "checkpoints"
    shutil.copytree(checkpoints / str(NUM_STEPS), checkpoints / f"{NUM_STEPS + 3}.orbax-checkpoint-tmp-1234")
    manager = checkpointing.make_manager(str(workdir), load_config(setup["config"]), read_only=True)
    assert manager.latest_step() == NUM_STEPS
    assert NUM_STEPS + 3 not in manager.all_steps()
    # The best checkpoint by validation macro-F1 is kept beside the latest ones.
    assert manager.best_step() in manager.all_steps()


def test_eval_mode_reports_a_chosen_checkpoint_and_split(setup, tmp_path):
    """`--mode eval --eval_split test --checkpoint latest` reports that checkpoint and
    split in files of its own, counting every test example once, and leaves the
    training's final report alone."""
    import json

    workdir = tmp_path / "work"
    shutil.copytree(setup["reference"], workdir)
    final_report = (workdir / "eval_results.json").read_text()
    result = subprocess.run(
        launch_args(setup["config"], str(workdir), "--mode=eval", "--eval_split=test",
                    "--checkpoint=latest"),
        cwd=REPO, env=setup["env"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(workdir / f"eval_test_step{NUM_STEPS}.json"))
    manifest = json.load(open(os.path.join(load_config(setup["config"]).data_dir, "manifest.json")))
    assert (report["split"], report["step"]) == ("test", NUM_STEPS)
    assert report["num_examples"] == manifest["splits"]["test"]["num_examples"]
    assert sum(map(sum, report["confusion_matrix"])) == report["num_examples"]
    assert os.path.isfile(workdir / f"eval_test_step{NUM_STEPS}_confusion_matrix.png")
    assert (workdir / "eval_results.json").read_text() == final_report


def test_damaged_last_checkpoint_resumes_from_the_one_before(setup, tmp_path):
    """A machine crash cut the newest checkpoint's array files short: the rerun names it
    in a warning, moves it aside (nothing is deleted), resumes from the newest intact
    one and still ends bitwise where the uninterrupted run did (tests/test_damaged_files.py
    covers each kind of damage)."""
    workdir = tmp_path / "work"
    shutil.copytree(setup["reference"], workdir)
    (workdir / "eval_results.json").unlink()  # As if the crash came before the final report.
    checkpoints = workdir / "checkpoints"
    older = max(s for s in map(int, os.listdir(checkpoints)) if s < NUM_STEPS)
    for directory, _, files in os.walk(checkpoints / str(NUM_STEPS) / "state"):
        if os.path.basename(directory) == "d":  # OCDBT's array data files, half written
            for name in files:
                os.truncate(os.path.join(directory, name), os.path.getsize(os.path.join(directory, name)) // 2)
    log = run_to_end(setup["config"], str(workdir), setup["env"], "--verbosity=0")
    damaged = workdir / checkpointing.DAMAGED_DIR / str(NUM_STEPS)
    assert f"checkpoint {checkpoints}/{NUM_STEPS} cannot be restored" in log, log[-3000:]
    assert f"moved the damaged checkpoint {checkpoints}/{NUM_STEPS} to {damaged}" in log, log[-3000:]
    assert f"resuming from {checkpoints} step {older}" in log, log[-3000:]
    assert os.path.isdir(damaged)
    params, step = final_params(setup["config"], str(workdir))
    assert step == NUM_STEPS
    assert_bitwise_equal(params, setup["params"])


# What a run's output must never hold: a decode worker killed by the signal, or shared
# memory the resource tracker had to clean up.
FAILURE_WORDS = ("Traceback", "terminated unexpectedly", "leaked", "resource_tracker")


def run_with_sigterm(config_path, workdir, env, hook, *extra_args):
    """One launch.py run with a decode worker, in a session of its own (so a signal to
    its process group reaches only the run and its workers), signalled where `hook`
    (MSFF_TEST_SIGTERM, see msff_jax.train.preemption.signal_point) says. It must exit 0
    with clean output; returns the output."""
    result = subprocess.run(
        launch_args(config_path, workdir, "--config.data.worker_count=1", *extra_args), cwd=REPO,
        env=dict(env, MSFF_TEST_SIGTERM=hook) if hook else env, capture_output=True, text=True,
        timeout=600, start_new_session=True)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    for word in FAILURE_WORDS:
        assert word not in log, log[-3000:]
    if hook:
        assert "test hook MSFF_TEST_SIGTERM" in log and "SIGTERM received" in log, log[-3000:]
    return log


def test_sigterm_in_every_phase_exits_0_and_resumes_bitwise(setup):
    """One run signalled in one phase after another, each time exiting 0 with its decode
    worker alive and no leaked shared memory, and the last rerun ends bitwise where the
    uninterrupted run did. The signal goes to the whole process group (as schedulers send
    it) except in the final report, where it goes to the trainer only."""
    config, env = setup["config"], setup["env"]
    workdir = str(setup["root"] / "phases")

    def checkpoints():
        return checkpointing.make_manager(workdir, load_config(config), read_only=True)

    # Data start-up: the signal lands while the train decode worker starts; nothing saved.
    log = run_with_sigterm(config, workdir, env, "first_batch::group:0.3")
    assert "preempted before training from step 0: nothing new to save" in log, log[-3000:]
    assert not os.path.isdir(checkpointing.checkpoint_dir(workdir)) or not checkpoints().all_steps()
    # An evaluation starting (its worker booting): abandoned, step 5 saved unevaluated.
    log = run_with_sigterm(config, workdir, env, "eval_start:5:group:0.3")
    assert "val evaluation of step 5 abandoned" in log, log[-3000:]
    assert checkpoints().latest_step() == 5 and checkpoints().metrics(5) is None
    # A checkpoint save in flight, and a second SIGTERM during it: the resumed run first
    # evaluates step 5, saves step 6, stops there with that save complete.
    log = run_with_sigterm(config, workdir, env, "save:6:group,save:6:group")
    assert "already stopping" in log, log[-3000:]
    assert checkpoints().latest_step() == 6 and checkpoints().metrics(5) is not None
    # The final report running (workers up, first batch in): abandoned, no report written.
    log = run_with_sigterm(config, workdir, env, "final_report_running::self")
    assert "rerun the same command to write the final report" in log, log[-3000:]
    assert checkpoints().latest_step() == NUM_STEPS
    assert not os.path.exists(os.path.join(workdir, "eval_results.json"))
    # The rerun writes the report; the parameters are those of the uninterrupted run.
    run_with_sigterm(config, workdir, env, None)
    assert os.path.exists(os.path.join(workdir, "eval_results.json"))
    params, step = final_params(config, workdir)
    assert step == NUM_STEPS
    assert_bitwise_equal(params, setup["params"])
