"""Training and evaluation: `train_and_evaluate(config, workdir)`.

Reads top to bottom: checks, mesh, input, model and optimizer, state (restored or fresh),
steps, checkpointing and preemption, the loop, the final evaluation. Every process runs
the same code; only process 0 writes logs, summaries and reports.
"""

from __future__ import annotations

import contextlib
import os
import time

import jax
import numpy as np
from absl import logging
# clu's writers, or stand-ins that log without TensorFlow (see metric_log).
from msff_jax.train.metric_log import metric_writers, periodic_actions

from data_pipeline.records import device_feed
from data_pipeline.records import reader
from msff_jax import console
from msff_jax.models import count_params
from msff_jax.train import checkpoints as checkpointing
from msff_jax.train import class_weights
from msff_jax.train import config_checks
from msff_jax.train import distributed
from msff_jax.train import evaluation
from msff_jax.train import optimizers
from msff_jax.train import preemption
from msff_jax.train import run_summary
from msff_jax.train import steps
from msff_jax.train import mesh as mesh_lib
from msff_jax.train import state as train_state_lib

# How often processes agree on a SIGTERM when there are several (a collective); a single
# process checks its own flag every step for free.
PREEMPTION_SYNC_EVERY_STEPS = 10


# The training's final report, WORKDIR/eval_results.json: it marks a finished run.
FINAL_REPORT = "eval_results"


class NonFiniteLossError(console.UserError, FloatingPointError):
    """Training diverged (a NaN or infinite loss); the message names the step and the
    fields to change: a user error, not a bug."""


# ------------------------------------------------------------------------------ input


def _reader_options(config, *, train: bool) -> dict:
    options = config.data.to_dict()
    if not train:
        options = {k: v for k, v in options.items()
                   if k in ("worker_count", "read_threads", "prefetch_buffer", "verify_checksums")}
    return options


def make_train_input(config):
    """The host-local train iterator (its state is what checkpoints record)."""
    return reader.make_train_iterator(
        config.data_dir, split=config.train_split, global_batch_size=config.batch_size,
        image_size=config.image_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        **_reader_options(config, train=True))


def global_eval_batches(config, split: str, mesh, *, step: int | None = None, phase: str = "eval"):
    """Global eval batches; every example exactly once, padding masked.

    Raises `EvaluationInterrupted` once a SIGTERM has come (checked before every batch;
    with several processes, agreed every PREEMPTION_SYNC_EVERY_STEPS batches). Its decode
    workers stop and their shared memory is freed however the evaluation ends."""
    dataset = reader.make_eval_iterator(
        config.data_dir, split=split, global_batch_size=config.eval_batch_size,
        image_size=config.image_size, process_index=jax.process_index(),
        process_count=jax.process_count(), **_reader_options(config, train=False))
    sharding = mesh_lib.batch_sharding(mesh)
    # Each row's record position (the reader's layout: process p takes padded positions
    # p, p + P, ...), carried like the labels so per-image results come out in dataset order.
    process, count = jax.process_index(), jax.process_count()
    iterator = iter(dataset)
    try:
        preemption.signal_point(f"{phase}_start", step)
        for number, local_batch in enumerate(iterator):
            if number == 0:
                preemption.signal_point(f"{phase}_running", step)
            if (count == 1 or number % PREEMPTION_SYNC_EVERY_STEPS == 0) and _stop_agreed():
                raise EvaluationInterrupted(f"{split} evaluation of step {step} abandoned at batch "
                                            f"{number}: SIGTERM")
            rows = len(local_batch["label"])
            local_batch = dict(local_batch, index=process + count * (number * rows + np.arange(rows)))
            yield device_feed.to_global_batch(local_batch, sharding)
    finally:
        if hasattr(iterator, "close"):
            iterator.close()
        reader.release_shared_memory()


# ------------------------------------------------------------------------- evaluation


def run_evaluation(config, eval_step, variables, mesh, *, split: str, step: int,
                   class_names, phase: str = "eval") -> dict:
    preemption.set_phase(f"the {split} evaluation of step {step}")
    batches = global_eval_batches(config, split, mesh, step=step, phase=phase)
    accumulator = evaluation.evaluate(
        eval_step, variables, console.progress(batches, desc=f"eval {split}", unit="batch"),
        config.num_classes)
    return evaluation.eval_results(accumulator, model=config.model, split=split, step=step,
                                   class_names=class_names,
                                   num_params=count_params(variables))


def publish_evaluation(results: dict, writer, workdir: str, *, report_name: str | None) -> None:
    """Scalars and the confusion-matrix image to TensorBoard; with `report_name`, also
    WORKDIR/{report_name}.json and WORKDIR/{report_name}_confusion_matrix.png, or
    eval_results.json and confusion_matrix.png for the training's final report
    (process 0 only)."""
    split, step = results["split"], results["step"]
    writer.write_scalars(step, {f"{split}/{k}": results[k] for k in
                                ("top1", "top5", "macro_precision", "macro_recall", "macro_f1")})
    if not distributed.is_primary():
        return
    final = report_name == FINAL_REPORT
    png = None
    if report_name:
        png = os.path.join(workdir, "confusion_matrix.png" if final else f"{report_name}_confusion_matrix.png")
    image = evaluation.plot_confusion_matrix(
        np.asarray(results["confusion_matrix"]), results["class_names"], png,
        title=f"{results['model']} on {split}, step {step}")
    writer.write_images(step, {f"{split}/confusion_matrix": image[None]})
    if report_name:  # Predictions first: an eval_results.json marks a finished run.
        evaluation.write_predictions(workdir, results, evaluation.PREDICTIONS_FILE if final
                                     else f"{report_name}_predictions.npz")
        evaluation.write_eval_results(workdir, results, f"{report_name}.json")
    logging.info("%s step %d: top1 %.4f top5 %.4f macro-F1 %.4f (%d examples)", split, step,
                 results["top1"], results["top5"], results["macro_f1"], results["num_examples"])


# ---------------------------------------------------------------------- preemption


class EvaluationInterrupted(Exception):
    """A SIGTERM came during an evaluation, which was abandoned: the grace period is for
    the save. A step saved without its evaluation is evaluated by the resumed run."""


class PreemptionFlag:
    """The loop's view of `msff_jax.train.preemption`: `requested` turns True once a
    SIGTERM has come. The signal is taken from the start of the process (see that
    module), so it interrupts nothing; the loop stops where stopping is safe."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @property
    def requested(self) -> bool:
        return preemption.requested()


def _stop_agreed() -> bool:
    """Whether to stop: a SIGTERM came to any process (a collective when there are
    several: call it on every process at the same point)."""
    return distributed.any_process(preemption.requested())


# ---------------------------------------------------------------------------- helpers


def _host_metrics(pending: list, first_step: int, latest_checkpoint) -> dict:
    """Fetches a window of step metrics, stops on a non-finite loss, returns the means."""
    fetched = jax.device_get(pending)
    for offset, metrics in enumerate(fetched):
        if not bool(metrics["finite"]):
            step = first_step + offset
            kept = ("no checkpoint was written yet" if latest_checkpoint is None
                    else f"the last good checkpoint (step {latest_checkpoint}) is kept")
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (loss={float(metrics['loss'])}, "
                f"grad_norm={float(metrics['grad_norm'])}); training stopped and {kept}. "
                "Lower config.optimizer.base_learning_rate, set config.grad_clip_norm, or "
                "train with --config.dtype=float32.")
    keys = [k for k in fetched[0] if k != "finite"]
    return {k: float(np.mean([m[k] for m in fetched])) for k in keys}


def _write_config(config, workdir: str) -> None:
    if distributed.is_primary():
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


@contextlib.contextmanager
def _undone_if_start_fails(workdir: str):
    """A start that fails (weights that do not fit, an unreadable shard) leaves a fresh
    workdir as it was: the folders this start created (checkpoints/, the workdir, and
    any new folders above it) are removed while still empty. Nothing else is written
    before the start succeeds (config.json and TensorBoard come after it)."""
    created = []  # deepest first
    path = checkpointing.checkpoint_dir(workdir)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        created.append(path)
        path = os.path.dirname(path)
    try:
        yield
    except BaseException:
        if distributed.is_primary():
            for path in created:
                with contextlib.suppress(OSError):
                    os.rmdir(path)  # Only when empty.
        raise


def _read_pretrained(config, abstract_state) -> dict:
    """`config.pretrained_path` converted against the model's shapes, before the data
    start-up, so a file of another model stops the run at once. With
    `pretrained_skip_head` the head's leaves stay shapes, filled from the fresh state."""
    from msff_jax.models.torch_weights import WeightConversionError, load_pretrained

    template = {"params": abstract_state.params, "batch_stats": abstract_state.batch_stats}
    try:
        return load_pretrained(config.model, config.pretrained_path, template,
                               skip_head=config.pretrained_skip_head)
    except WeightConversionError as err:
        raise console.ConfigError(
            f"config.pretrained_path: {err}. Name a .safetensors file of {config.model}'s "
            "torchvision or timm weights, or train without (--config.pretrained_path='').") from err


def _with_fresh_head(pretrained: dict, fresh: dict) -> dict:
    return jax.tree.map(lambda loaded, new: new if isinstance(loaded, jax.ShapeDtypeStruct) else loaded,
                        pretrained, fresh)


# ------------------------------------------------------------------------------- main


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains until `num_train_steps` (resuming from WORKDIR/checkpoints if present),
    evaluating on `eval_split` periodically; returns the final evaluation results.

    The final report (eval_results.json) evaluates the best checkpoint by validation
    macro-F1 on `test_split` when the manifest has it, else on `eval_split`.

    A SIGTERM at any moment (see `msff_jax.train.preemption`) saves the step reached, if
    not saved yet, and returns `{"preempted_at_step": step}`; rerunning resumes. Decode
    workers and their shared memory are released however it ends.
    """
    with preemption.listening():
        try:
            return _train_and_evaluate(config, workdir)
        finally:
            reader.release_shared_memory()


def _train_and_evaluate(config, workdir: str) -> dict:
    workdir = os.path.abspath(workdir)

    # ---------------------------------------------------------------- checks
    manifest = config_checks.check_config(config, num_devices=jax.device_count(), process_count=jax.process_count())
    class_names = manifest["class_names"]
    num_train = manifest["splits"][config.train_split]["num_examples"]
    steps_per_epoch = max(1, num_train // config.batch_size)
    total_steps = optimizers.total_train_steps(config, steps_per_epoch)
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
    config_checks.check_resume(config, workdir)  # Before config.json is replaced.
    run_start = time.monotonic()
    logging.info("%d processes, %d devices; %d train examples, %d steps per epoch, %d steps",
                 jax.process_count(), jax.device_count(), num_train, steps_per_epoch, total_steps)

    # ---------------------------------------------------------------- mesh
    mesh = mesh_lib.make_mesh(config.mesh_shape)

    # ---------------------------------------------------------------- model and optimizer
    model = train_state_lib.build_model(config)
    tx = optimizers.make_optimizer(config, steps_per_epoch)
    schedule = optimizers.make_schedule(config, steps_per_epoch)
    rng = jax.random.PRNGKey(config.seed)

    # ---------------------------------------------------------------- state and input
    preemption.signal_point("startup")
    if _stop_agreed():  # Before this run trained anything: nothing new to save.
        logging.warning("preempted during start-up: nothing new to save; rerun the same command "
                        "to resume")
        return {"preempted_at_step": None}
    preemption.set_phase("data start-up and restore")
    with _undone_if_start_fails(workdir):
        os.makedirs(workdir, exist_ok=True)
        abstract_state = train_state_lib.abstract_train_state(config, model, tx, mesh, rng)
        pretrained = None
        if config.pretrained_path and not checkpointing.saved_steps(workdir):
            pretrained = _read_pretrained(config, abstract_state)
        train_input = make_train_input(config)
        manager = checkpointing.make_manager(workdir, config)
        # The newest intact checkpoint; damaged newer ones are named and moved aside.
        latest, state = checkpointing.restore_latest_intact(manager, abstract_state, train_input)
        if latest is not None:
            logging.info("resuming from %s step %d", checkpointing.checkpoint_dir(workdir), latest)
        else:
            state = train_state_lib.create_train_state(config, model, tx, mesh, rng, abstract_state)
            if pretrained is not None:
                variables = _with_fresh_head(pretrained, jax.device_get(state.eval_variables()))
                state = train_state_lib.with_pretrained(state, variables, mesh)
    # The start succeeded: from here on the workdir records the run.
    _write_config(config, workdir)
    writer = metric_writers.create_default_writer(
        os.path.join(workdir, "tensorboard"), just_logging=not distributed.is_primary())
    train_iter = device_feed.prefetch_to_mesh(train_input, mesh_lib.batch_sharding(mesh))
    step = int(jax.device_get(state.step))
    num_params = count_params({"params": state.params})
    logging.info("%s: %d parameters", config.model, num_params)
    for line in run_summary.startup_lines(
            config, workdir, manifest, mesh, num_params=num_params, steps_per_epoch=steps_per_epoch,
            total_steps=total_steps, eval_every=eval_every, step=step):
        console.say(line)

    # ---------------------------------------------------------------- steps
    train_step = steps.make_train_step(config, model, tx, mesh, class_weights.for_config(config))
    eval_step = steps.make_eval_step(config, model, mesh)

    def evaluation_due(at_step: int) -> bool:
        return at_step % eval_every == 0 or at_step == total_steps

    # A preemption that lands on an evaluation step saves without evaluating (the grace
    # period is for the save), so the restored step may still owe its evaluation.
    latest_results = None
    preempted = False
    if latest is not None and evaluation_due(step) and manager.metrics(step) is None:
        logging.info("step %d was saved without its evaluation (preempted); evaluating it now", step)
        try:
            latest_results = run_evaluation(config, eval_step, state.eval_variables(), mesh,
                                            split=config.eval_split, step=step, class_names=class_names)
        except EvaluationInterrupted as err:
            logging.warning("%s", err)
            preempted = True
        else:
            publish_evaluation(latest_results, writer, workdir, report_name=None)
            checkpointing.add_metrics(manager, step, {checkpointing.BEST_METRIC: latest_results["macro_f1"]})

    # ---------------------------------------------------------------- periodic actions
    hooks = []
    if distributed.is_primary():
        report_progress = periodic_actions.ReportProgress(
            num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps,
            every_secs=None)
        hooks.append(report_progress)
        if config.profile.enabled:
            hooks.append(periodic_actions.Profile(
                logdir=os.path.join(workdir, "tensorboard"), num_profile_steps=config.profile.num_steps,
                first_profile=config.profile.first_step, every_secs=None))

    # ---------------------------------------------------------------- loop
    pending, pending_first_step = [], step + 1
    start_step = step  # This process's first interval includes compilation.
    window_start, window_steps = time.monotonic(), 0
    first_step_done = False
    # A SIGTERM before the first step of this run: the restored checkpoint (if any) is
    # where the rerun starts, so there is nothing new to save.
    preempted = preempted or _stop_agreed()
    if preempted:
        logging.warning("preempted before training from step %d: nothing new to save; rerun the "
                        "same command to resume", step)
    try:
        with PreemptionFlag():
            preemption.set_phase("training")
            if not preempted:
                preemption.signal_point("first_batch")  # As the decode workers start.
            while step < total_steps and not preempted:
                preemption.set_phase("training")
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    batch = next(train_iter)
                    # A SIGTERM while the first batch came (decode workers starting): stop
                    # before compiling the step. Nothing is saved, so the drawn batch is not
                    # lost: the rerun starts from the same checkpoint (or afresh).
                    if not first_step_done and _stop_agreed():
                        preempted = True
                        logging.warning("preempted before training from step %d: nothing new to "
                                        "save; rerun the same command to resume", step)
                        break
                    state, metrics = train_step(state, batch)
                step += 1
                preemption.signal_point("train_step", step)
                window_steps += 1
                pending.append(metrics)
                if not first_step_done:  # Start-up cost a user waits for, compilation included.
                    first_step_done = True
                    jax.block_until_ready(metrics)
                    logging.info("first training step (step %d) done %.1f s after the loop started",
                                 step, time.monotonic() - window_start)
                for hook in hooks:
                    hook(step)

                if jax.process_count() == 1 or step % PREEMPTION_SYNC_EVERY_STEPS == 0:
                    preempted = _stop_agreed()
                    checkpointing.check_saves(manager)  # A save failed in the background: stop now.
                is_last = step == total_steps
                eval_due = evaluation_due(step)
                save_due = (config.checkpoint.every_steps > 0
                            and step % config.checkpoint.every_steps == 0) or eval_due or preempted
                if step % config.log_every_steps == 0 or save_due or is_last:
                    means = _host_metrics(pending, pending_first_step, manager.latest_step())
                    elapsed = time.monotonic() - window_start
                    means["images_per_sec"] = window_steps * config.batch_size / max(elapsed, 1e-9)
                    means["learning_rate"] = float(schedule(step - 1))
                    writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
                    writer.flush()
                    if step % config.log_every_steps == 0 or is_last:
                        console.say(run_summary.progress_line(
                            step, total_steps, steps_per_epoch, means, config.batch_size,
                            includes_compilation=step - window_steps == start_step))
                    pending, pending_first_step = [], step + 1
                    window_start, window_steps = time.monotonic(), 0

                checkpoint_metrics = None
                if eval_due and not preempted:
                    try:
                        latest_results = run_evaluation(config, eval_step, state.eval_variables(),
                                                        mesh, split=config.eval_split, step=step,
                                                        class_names=class_names)
                    except EvaluationInterrupted as err:  # Saved unevaluated; the rerun evaluates.
                        logging.warning("%s", err)
                        preempted = True
                    else:
                        publish_evaluation(latest_results, writer, workdir, report_name=None)
                        checkpoint_metrics = {checkpointing.BEST_METRIC: latest_results["macro_f1"]}
                if save_due:
                    preemption.set_phase(f"the checkpoint save of step {step}")
                    checkpointing.save(manager, step, state, train_iter, metrics=checkpoint_metrics,
                                       force=True)
                    preemption.signal_point("preemption_save" if preempted else "save", step)
                    if not preempted and jax.process_count() == 1:  # A SIGTERM during the save.
                        preempted = preemption.requested()
                said = [run_summary.eval_line(latest_results)] if checkpoint_metrics else []
                if save_due:
                    said.append(f"checkpoint step {step} saved")
                if said:
                    console.say("; ".join(said))
                if window_steps == 0:  # Evaluation and saving stay out of the next figure.
                    window_start = time.monotonic()
                if preempted:
                    checkpointing.wait_until_finished(manager)  # Written before it says so.
                    logging.warning("preempted: checkpoint at step %d written; rerun the same "
                                    "command to resume", step)
                    break

    finally:
        # Pending asynchronous saves finish even when the loop raises (non-finite loss),
        # so the last good checkpoint is complete on disk.
        checkpointing.wait_until_finished(manager)  # A failed save: CheckpointWriteError.
        train_iter.close()  # Its decode workers stop here, however the loop ended.
    # A SIGTERM after the last save: the rerun writes the final report.
    preempted = preempted or _stop_agreed()
    if preempted:
        manager.close()
        train_iter.close()
        writer.close()
        return {"preempted_at_step": step}

    # ---------------------------------------------------------------- final report
    final_split = config.get("test_split") or config.eval_split
    if final_split not in manifest["splits"]:
        final_split = config.eval_split
    best = manager.best_step()
    variables, report_step = state.eval_variables(), step
    if best is not None and best != step:
        variables = checkpointing.restore(manager, best, abstract_state).eval_variables()
        report_step = best
    if final_split == config.eval_split and report_step == step and latest_results is not None:
        results = latest_results
    else:
        try:
            results = run_evaluation(config, eval_step, variables, mesh, split=final_split,
                                     step=report_step, class_names=class_names, phase="final_report")
        except EvaluationInterrupted as err:
            logging.warning("%s; checkpoint step %d is complete: rerun the same command to write "
                            "the final report", err, step)
            writer.close()
            manager.close()
            return {"preempted_at_step": step}
    publish_evaluation(results, writer, workdir, report_name=FINAL_REPORT)
    if distributed.is_primary():
        elapsed = time.monotonic() - run_start
        run_summary.write_summary(config, workdir, results, best_step=best, latest_step=step,
                                  steps_per_epoch=steps_per_epoch, elapsed=elapsed,
                                  num_params=num_params)
        for line in run_summary.final_lines(workdir, results, best_step=best, latest_step=step,
                                            elapsed=elapsed):
            console.say(line)
    writer.close()
    manager.close()
    train_iter.close()
    return results



def evaluate_checkpoint(config, workdir: str, *, which: str = "best", split: str | None = None) -> dict:
    """`--mode eval`: the best or latest checkpoint on `split` (default config.eval_split);
    writes eval_{split}_step{step}.json and its confusion matrix, never the training's
    final report (eval_results.json), which `msff_jax.analysis.study` and the report read."""
    workdir = os.path.abspath(workdir)
    manifest = config_checks.check_config(config, num_devices=jax.device_count(),
                                          process_count=jax.process_count(), mode="eval")
    split = split or config.eval_split
    if split not in manifest["splits"]:
        raise console.ConfigError(f"--eval_split={split!r} is not in {config.data_dir}/manifest.json "
                                  f"(it has {sorted(manifest['splits'])}).")
    mesh = mesh_lib.make_mesh(config.mesh_shape)
    variables, step = checkpointing.restore_for_inference(config, workdir, which=which, mesh=mesh)
    writer = metric_writers.create_default_writer(
        os.path.join(workdir, "tensorboard"), just_logging=not distributed.is_primary())
    model = train_state_lib.build_model(config)
    results = run_evaluation(config, steps.make_eval_step(config, model, mesh), variables,
                             mesh, split=split, step=step, class_names=manifest["class_names"])
    publish_evaluation(results, writer, workdir, report_name=f"eval_{split}_step{step}")
    console.say(run_summary.eval_line(results))
    console.say(f"  wrote {os.path.join(workdir, f'eval_{split}_step{step}.json')} and its "
                "confusion matrix")
    writer.close()
    return results
