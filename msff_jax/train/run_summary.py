"""The console lines of a training run and the WORKDIR/summary.md it leaves behind.

Kept apart from the loop so the loop only says *when* to report; what a line or the
summary says lives here. The summary makes a workdir explain itself: what ran, with
which config, the final measures, the best checkpoint, and the commands to evaluate,
export and predict from it.
"""

from __future__ import annotations

import datetime
import os
import shlex
import sys

from msff_jax import console

SUMMARY_FILE = "summary.md"
LAUNCH = "python launch.py"


def launch_command(workdir: str, mode: str | None = None) -> str:
    """The command that started this run (when it came from launch.py / msff-launch),
    with `--mode` replaced; otherwise a template naming the workdir."""
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    if program not in ("launch.py", "msff-launch", "main.py"):
        args = ["--config", "CONFIG", "--workdir", workdir]
    else:
        args, skip = [], False
        for arg in sys.argv[1:]:
            if skip:
                skip = False
            elif arg == "--mode":
                skip = True
            elif not (arg.startswith("--mode=") or arg.startswith("--verbosity")
                      or arg == "--show_traceback"):
                args.append(arg)
    if mode and mode != "train":
        args.append(f"--mode={mode}")
    return " ".join([LAUNCH] + [shlex.quote(a) for a in args])


def startup_lines(config, workdir: str, manifest: dict, mesh, *, num_params: int,
                  steps_per_epoch: int, total_steps: int, eval_every: int, step: int) -> list[str]:
    import jax

    splits = ", ".join(f"{name} {info['num_examples']}" for name, info in manifest["splits"].items())
    mesh_text = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
    platform = jax.devices()[0].platform
    lines = [
        f"{config.model}: {num_params / 1e6:.2f} M parameters, {config.dtype}, "
        f"{config.image_size} px",
        f"  devices  {jax.device_count()} {platform} on {jax.process_count()} process(es); "
        f"mesh {mesh_text}",
        f"  data     {config.data_dir}: {len(manifest['class_names'])} classes; {splits}",
        f"  steps    {total_steps} ({steps_per_epoch} per epoch), batch {config.batch_size}, "
        f"eval every {eval_every}, log every {config.log_every_steps}",
        f"  workdir  {workdir}",
    ]
    if step:
        lines.append(f"  resuming from the checkpoint at step {step}")
    return lines


def progress_line(step: int, total_steps: int, steps_per_epoch: int, means: dict,
                  batch_size: int, *, includes_compilation: bool = False) -> str:
    """One line per log interval. The first interval of a process includes compiling
    the step, so its speed is marked as such and no ETA is guessed from it."""
    epochs = -(-total_steps // steps_per_epoch)
    epoch = min(epochs, (step - 1) // steps_per_epoch + 1)
    rate = means.get("images_per_sec", 0.0)
    eta = (total_steps - step) * batch_size / rate if rate > 0 else 0.0
    width = len(str(total_steps))
    text = (f"step {step:>{width}}/{total_steps}  epoch {epoch}/{epochs}  "
            f"loss {means.get('loss', float('nan')):.4f}")
    if "accuracy" in means:
        text += f"  acc {means['accuracy']:.3f}"
    text += f"  lr {means.get('learning_rate', 0.0):.2e}  {rate:,.0f} img/s"
    if includes_compilation:
        return text + " (with compilation)"
    return text + f"  ETA {console.duration(eta)}"


def eval_line(results: dict, seconds: float | None = None) -> str:
    took = f", {console.duration(seconds)}" if seconds is not None else ""
    return (f"eval step {results['step']} on {results['split']}: top1 {results['top1']:.4f}  "
            f"top5 {results['top5']:.4f}  macro-F1 {results['macro_f1']:.4f} "
            f"({results['num_examples']} images{took})")


def final_lines(workdir: str, results: dict, *, best_step, latest_step: int,
                elapsed: float) -> list[str]:
    join = lambda name: os.path.join(workdir, name)  # noqa: E731
    which = "best checkpoint" if best_step is not None else "final state"
    return [
        f"done in {console.duration(elapsed)}: {results['split']} ({which}, step "
        f"{results['step']}): top1 {results['top1']:.4f}  top5 {results['top5']:.4f}  "
        f"macro-F1 {results['macro_f1']:.4f}",
        f"  checkpoints       {join('checkpoints')} (best step {best_step}, latest {latest_step})",
        f"  report            {join('eval_results.json')}, {join(SUMMARY_FILE)}",
        f"  confusion matrix  {join('confusion_matrix.png')}",
        f"  TensorBoard       tensorboard --logdir {join('tensorboard')}",
        f"  next              {launch_command(workdir, 'export')}",
    ]


def write_summary(config, workdir: str, results: dict, *, best_step, latest_step: int,
                  steps_per_epoch: int, elapsed: float, num_params: int) -> str:
    """WORKDIR/summary.md (process 0 only); returns its path."""
    import jax

    from msff_jax.train.config_model import plain

    path = os.path.join(workdir, SUMMARY_FILE)
    overrides = plain(config.get("model_overrides") or {})
    finished = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    export_dir = os.path.join(workdir, "export")
    rows = [("top-1 accuracy", "top1"), ("top-5 accuracy", "top5"),
            ("macro precision", "macro_precision"), ("macro recall", "macro_recall"),
            ("macro F1", "macro_f1")]
    text = [
        f"# {config.model} in {workdir}",
        "",
        f"Finished {finished} after {console.duration(elapsed)}: {latest_step} steps "
        f"({steps_per_epoch} per epoch) at batch size {config.batch_size}, on "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s).",
        "",
        f"- command: `{launch_command(workdir)}`",
        f"- config: `config.json` (every field); model `{config.model}` "
        f"({num_params / 1e6:.2f} M parameters{', overrides ' + str(overrides) if overrides else ''}), "
        f"{config.num_classes} classes, {config.image_size} px, {config.dtype}",
        f"- data: `{config.data_dir}`",
        "",
        f"## Final measures: {results['split']} split, step {results['step']} "
        f"({'best checkpoint by validation macro-F1' if best_step is not None else 'final state'})",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {label} | {results[key]:.4f} |" for label, key in rows],
        f"| images | {results['num_examples']} |",
        "",
        "Per-class measures: `eval_results.json`; confusion matrix: `confusion_matrix.png`; "
        "curves: `tensorboard --logdir tensorboard`.",
        "",
        "## Checkpoints",
        "",
        f"`checkpoints/`: best step {best_step}, latest step {latest_step}. Rerunning the "
        "command resumes from the latest (and does nothing more once it is finished).",
        "",
        "## Next",
        "",
        f"- evaluate: `{launch_command(workdir, 'eval')}` (add `--eval_split=val` for another split)",
        f"- export: `{launch_command(workdir, 'export')}`",
        f"- predict: `msff-predict --export_dir {export_dir} IMAGE_OR_FOLDER` "
        f"(or `python -m msff_jax.inference.predict ...`) after exporting",
        "- the paper's tables for a whole study of runs: `msff-study` and its `report.md` "
        "(docs/GUIDE.md)",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(text))
    return path
