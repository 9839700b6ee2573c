"""Entry point: `python launch.py --config configs/x.py --workdir DIR [--mode MODE]`.

Modes: train (trains, evaluates, writes the report; rerun to resume), eval (best or
latest checkpoint on --eval_split), summary, benchmark, export, report, plan (compiles the
run's programs for a GPU on any machine: memory, kernels, a lower bound on step time). Config fields
are overridden on the command line, e.g. `--config.batch_size=512`.

Output: a start-up block, one line per log interval, evaluation and checkpoint, and a
summary; library logging is hidden unless `--verbosity=0` (or higher). A mistake
(a flag, a config field, a path, a workdir of another run, running out of accelerator
memory) prints one `error: ...` line and exits 1 (2 for a command line or config value
that no run could use, found before any work);
`--show_traceback` adds the Python traceback for bug reports.

Several hosts: run the same command on every host with `--coordinator_address`,
`--num_processes` and `--process_id`, or under SLURM's `srun` with none of them.
"""

import os
import re
import sys

from msff_jax import console

console.quiet_native_logs(start_jax=False)  # Before anything imports TensorFlow or XLA.

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

MODES = ("train", "eval", "summary", "benchmark", "export", "report", "plan")
PROGRAM = "python launch.py"
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/default.py "
                                "(append :arg to pass an argument to get_config).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and reports go here.")
flags.DEFINE_enum("mode", None, MODES, "What to do. Default: the config's `mode` field "
                  "if it has one (configs/benchmark.py does), else train.")
flags.DEFINE_string("eval_split", None, "--mode eval: split to evaluate (default config.eval_split).")
flags.DEFINE_enum("checkpoint", "best", ("best", "latest"),
                  "--mode eval/export: the best checkpoint by validation macro-F1, or the latest.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for several hosts.")
flags.DEFINE_integer("num_processes", None, "Number of processes (hosts), with --coordinator_address.")
flags.DEFINE_integer("process_id", None, "This process's index, with --coordinator_address.")
flags.DEFINE_bool("show_traceback", False, "On an error, print the Python traceback too "
                  "(for bug reports).")


# ------------------------------------------------------------------------- flag parsing


def _config_arg(argv) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _known_configs() -> str:
    try:
        names = sorted(n for n in os.listdir(CONFIG_DIR) if n.endswith(".py") and not n.startswith("_"))
    except OSError:
        return ""
    return f" (the project's configs: {', '.join('configs/' + n for n in names)})"


# Per-model config files that became an argument of configs/default.py.
MOVED_CONFIGS = ("msff_base", "msff_msp", "msff_iasm", "resnet50", "mobilenet_v3_large",
                 "efficientnet_b0")


def _moved_config(path: str) -> str | None:
    name = os.path.splitext(os.path.basename(path))[0]
    if os.path.basename(os.path.dirname(os.path.abspath(path))) == "configs" and name in MOVED_CONFIGS:
        return (f"config file {path} was replaced by an argument of the default config: use "
                f"--config configs/default.py:{name} (the same recipe).")
    return None


def _config_file_error(path: str, err: BaseException) -> str:
    """`path` raised while loading: name its line when the traceback passes through it."""
    import traceback

    line = ""
    wanted = os.path.realpath(path)
    for frame in traceback.extract_tb(err.__traceback__):
        if os.path.realpath(frame.filename) == wanted:
            line = f", line {frame.lineno}"
    return _config_raised(path, line, f"{type(err).__name__}: {str(err)}")


def _config_raised(path: str, line: str, raised: str) -> str:
    """The one line for a config file that raised, however the error reached us."""
    return (f"config file {path}{line} raised {' '.join(raised.split()).rstrip('.')}; "
            "fix the file or pass another --config.")


def _config_raised_in_flag_error(err: BaseException, path: str | None) -> str | None:
    """ml_collections reports a `get_config(ARG)` that raises while the flags are parsed
    (an argument the file refuses, say) as a flag error holding the whole traceback as
    text; this makes it the same one line as any other config file that raises."""
    text = str(err)
    if "Error whilst parsing config file" not in text or path is None:
        return None
    lines = text.strip().splitlines()
    wanted = os.path.realpath(path)
    line, last_frame = "", -1
    for index, text_line in enumerate(lines):
        frame = re.match(r'\s*File "([^"]+)", line (\d+)', text_line)
        if frame:
            last_frame = index
            if os.path.realpath(frame.group(1)) == wanted:
                line = f", line {frame.group(2)}"
    # The exception ("ValueError: ...", maybe over several lines) follows the last frame;
    # the frame's source and caret lines are indented, the exception is not.
    return _config_raised(path, line, " ".join(t for t in lines[last_frame + 1:] if t and not t[0].isspace()))


def _override_error(argv, err: BaseException) -> str | None:
    """A `--config.FIELD=...` naming no field: ml_collections raises AttributeError or
    KeyError with a 'Did you mean' hint in a quoted, escaped message."""
    text = str(err).replace("\\n", "\n").replace("\\'", "'")
    names = re.findall(r"'([A-Za-z_][\w]*)'", text)
    suggestion = re.search(r'Did you mean "([\w.]+)"', text)
    overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
    for name in names:
        for flag in overrides:
            if name in flag.split(".")[1:]:
                hint = f"; did you mean {suggestion.group(1)}?" if suggestion else \
                    " (python launch.py --config FILE --helpfull lists the config's fields)."
                return f"{flag}: the config has no field {name!r}{hint}"
    return None


def parse_flags(argv):
    """absl's parser with one-line errors (app.run's `flags_parser`)."""
    config_path = _config_arg(argv[1:])
    if config_path is not None:
        path = config_path.split(":", 1)[0]
        if not os.path.isfile(path):
            moved = _moved_config(path)
            console.error_line(moved or f"config file {path} does not exist{_known_configs()}.")
            sys.exit(console.EXIT_USAGE)
    try:
        rest = FLAGS(argv)
        if FLAGS.config is not None:
            FLAGS.config.get("model")  # Surfaces a config file's deferred load error.
    except flags.Error as err:
        raised = _config_raised_in_flag_error(err, config_path and config_path.split(":", 1)[0])
        if raised and console.traceback_asked(argv):
            print(str(err), file=sys.stderr)
        console.error_line(raised or f"{console.flag_error_text(err)} (`{PROGRAM} --helpshort` "
                           "lists the flags)")
        sys.exit(console.EXIT_USAGE)
    except Exception as err:  # A config file that raises, or an override naming no field.
        if console.traceback_asked(argv):
            import traceback

            traceback.print_exc()
        cause = err.__cause__ or err
        message = (_override_error(argv, err) if isinstance(err, (AttributeError, KeyError)) else None)
        if message is None and config_path is not None:
            message = _config_file_error(config_path.split(":", 1)[0], cause)
        console.error_line(message or f"cannot parse the command line: {' '.join(str(err).split())}")
        sys.exit(console.EXIT_USAGE)
    return rest


# ------------------------------------------------------------------------- checks


# What each mode writes into the workdir: a file in the place of one of these folders,
# or a workdir it may not write to, is named before any work.
_WRITTEN_FOLDERS = {"train": ("checkpoints", "tensorboard"), "eval": ("tensorboard",),
                    "export": ("export",)}


def _check_workdir(workdir: str, mode: str) -> None:
    """The workdir exists (or can be made, for training) and is usable."""
    fresh = f"{PROGRAM} --config CONFIG --workdir {workdir} trains one"
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise console.PathError(f"--workdir {workdir} is {console.what_is(workdir)}, not a "
                                "folder; pass a folder.")
    for name in _WRITTEN_FOLDERS.get(mode, ()):
        inside = os.path.join(workdir, name)
        if os.path.lexists(inside) and not os.path.isdir(inside):
            raise console.PathError(f"{inside} is {console.what_is(inside) or 'not a folder'}, where "
                                    f"--mode {mode} needs a folder; move it away.")
    if mode == "train":
        parent = workdir
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent.rstrip(os.sep)) or "."
        if not os.path.isdir(parent):
            raise console.PathError(f"--workdir {workdir}: {parent} is {console.what_is(parent)}, "
                                    "where a folder is needed; pass another --workdir.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise console.PathError(f"--workdir {workdir}: cannot write in {parent} (read-only or "
                                    "permission denied); pass a folder you can write to.")
        return
    if mode in ("eval", "export", "report"):
        if not os.path.isdir(workdir):
            raise console.PathError(f"--workdir {workdir} does not exist; pass the workdir of a "
                                    f"trained run ({fresh}).")
        if not os.access(workdir, os.R_OK | os.X_OK):
            raise console.PathError(f"--workdir {workdir} is not readable (permission denied).")
    if mode in ("eval", "export"):
        target = os.path.join(workdir, "export") if mode == "export" else workdir
        target = target if os.path.isdir(target) else workdir
        if not os.access(target, os.W_OK | os.X_OK):
            writes = ("export/" if mode == "export"
                      else "eval_SPLIT_stepN.json, its confusion matrix and tensorboard/")
            raise console.PathError(
                f"--mode {mode} writes {writes} in {workdir}, but {target} is read-only (or "
                "permission denied); make it writable, or copy the workdir somewhere writable.")
    if mode in ("eval", "export"):
        checkpoints = os.path.join(workdir, "checkpoints")
        steps = [n for n in (os.listdir(checkpoints) if os.path.isdir(checkpoints) else [])
                 if n.isdigit()]
        if not steps:
            raise console.PathError(f"--mode {mode}: no checkpoint in {checkpoints}; train first "
                                    f"({fresh}) or pass the workdir of a trained run.")


def _out_of_memory(err: BaseException, config, mode: str) -> console.UserError | None:
    """XLA's RESOURCE_EXHAUSTED as advice naming the batch size."""
    if "RESOURCE_EXHAUSTED" not in str(err) and "Out of memory" not in str(err):
        return None
    if mode == "train":
        batch, accum = config.batch_size, config.get("grad_accum_steps", 1)
        return console.ConfigError(
            f"the accelerator ran out of memory with config.batch_size={batch} "
            f"(config.grad_accum_steps={accum}, config.dtype={config.dtype!r}). Lower "
            f"--config.batch_size (e.g. {max(1, batch // 2)}), or keep it and raise "
            f"--config.grad_accum_steps (e.g. {accum * 2}) to split each batch into "
            "micro-batches, or use --config.dtype=bfloat16.")
    return console.ConfigError(
        f"the accelerator ran out of memory with config.eval_batch_size={config.eval_batch_size}"
        f" in --mode {mode}; lower --config.eval_batch_size (e.g. "
        f"{max(1, config.eval_batch_size // 2)}).")


# ------------------------------------------------------------------------- modes


def run_mode(config, workdir: str, mode: str) -> int | None:
    if mode not in MODES:
        raise console.ConfigError(f"config field mode={mode!r} is not one of {MODES}.")
    if mode != "train":  # Only training turns SIGTERM into "save and stop".
        from msff_jax.train import preemption

        preemption.uninstall(resend=True)
    if workdir is None:
        raise console.ConfigError(f"--mode {mode} needs --workdir.")
    _check_workdir(workdir, mode)
    if mode == "report":
        from msff_jax.analysis import report

        report.run(workdir)
        return None
    if config is None:
        raise console.ConfigError(f"--mode {mode} needs --config (e.g. --config configs/default.py).")

    from msff_jax.train import config_checks

    # The config rules, before any data, weights or compilation (exit status 2).
    config_checks.check_fields(config, mode=mode)
    from msff_jax.train import distributed

    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if mode in ("train", "eval"):
        import jax

        config_checks.check_devices(config, num_devices=jax.device_count(),
                                    process_count=jax.process_count())
    elif mode == "plan":  # The devices planned for, in hosts of eight.
        planned = int(config.plan.num_devices)
        config_checks.check_devices(config, num_devices=planned, process_count=max(1, planned // 8))
    from msff_jax.train import workdir_lock

    if mode in workdir_lock.WRITING_MODES:  # One run per workdir, before anything is written.
        workdir_lock.acquire(workdir, wait_secs=config.get("workdir_lock_wait_secs", 0))
    if config.get("demo") and mode in ("train", "eval", "export"):
        from msff_jax.train import demo_data as demo

        demo.prepare_data(config, workdir)  # Sets config.data_dir; says when it generates.
    if mode in ("train", "eval", "export"):
        config_checks.check_resume(config, os.path.abspath(workdir), mode=mode)
    try:
        if mode == "train":
            from msff_jax.train import loop as train

            train.train_and_evaluate(config, workdir)
        elif mode == "eval":
            from msff_jax.train import loop as train

            train.evaluate_checkpoint(config, workdir, which=FLAGS.checkpoint, split=FLAGS.eval_split)
        elif mode == "summary":
            from msff_jax.analysis import summary

            summary.print_summary(config)
        elif mode == "benchmark":
            from msff_jax.analysis.benchmark import run as benchmark

            benchmark.run(config, workdir)
        elif mode == "export":
            from msff_jax.inference import export

            export.run(config, workdir, which=FLAGS.checkpoint)
        elif mode == "plan":
            from msff_jax.analysis.plan import run as plan

            plan.run(config, workdir)
    except console.UserError:
        raise
    except Exception as err:
        translated = _out_of_memory(err, config, mode)
        if translated is None:
            raise
        raise translated from err
    return 0


def main(argv):
    console.setup_logging(FLAGS.verbosity if FLAGS["verbosity"].present else None)

    def body():
        if len(argv) > 1:
            raise console.ConfigError(
                f"unexpected arguments {argv[1:]}; flags take the form --name=value "
                f"(`{PROGRAM} --helpshort` lists them).")
        config, workdir = FLAGS.config, FLAGS.workdir
        mode = FLAGS.mode or (config.get("mode") if config is not None else None) or "train"
        return run_mode(config, workdir, mode)

    return console.guarded(body, show_traceback=FLAGS.show_traceback)


def run() -> None:
    """Console entry point (`msff-launch`) and what `launch.py` calls."""
    from msff_jax.train import preemption

    preemption.install()  # First: a SIGTERM from here on stops training cleanly (see there).
    # Then JAX, quietly: threads it starts now inherit the SIGTERM block (jax.distributed's
    # SIGTERM agreement depends on it).
    from msff_jax import cuda_plugin

    cuda_plugin.quiet_start()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
