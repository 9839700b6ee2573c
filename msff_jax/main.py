"""Entry point: `python launch.py --config configs/x.py --workdir DIR [--mode MODE]`.

Modes: train (trains, evaluates, writes the report; rerun to resume), eval (best or
latest checkpoint on --eval_split), summary, benchmark, export, report. Config fields
are overridden on the command line, e.g. `--config.batch_size=512`.

Several hosts: run the same command on every host with `--coordinator_address`,
`--num_processes` and `--process_id`, or under SLURM's `srun` with none of them.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train", "eval", "summary", "benchmark", "export", "report")

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


def _require(flag_value, mode: str, what: str) -> None:
    if flag_value is None:
        raise app.UsageError(f"--mode {mode} needs {what}.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    config, workdir = FLAGS.config, FLAGS.workdir
    mode = FLAGS.mode or (config.get("mode") if config is not None else None) or "train"
    if mode not in MODES:
        raise app.UsageError(f"config field mode={mode!r} is not one of {MODES}.")
    _require(workdir, mode, "--workdir")
    if mode == "report":
        from msff_jax.analysis import report

        return report.run(workdir)
    _require(config, mode, "--config")

    from msff_jax.train import distributed

    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if config.get("demo") and mode in ("train", "eval", "export"):
        from msff_jax.train import demo_data as demo

        demo.prepare_data(config, workdir)  # Sets config.data_dir; generates only once.
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


def run() -> None:
    """Console entry point (`msff-launch`) and what `launch.py` calls."""
    flags.mark_flags_as_required(["workdir"])
    logging.set_verbosity(logging.INFO)
    app.run(main)


if __name__ == "__main__":
    run()
