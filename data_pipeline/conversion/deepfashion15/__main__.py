"""Builds the TFDS dataset without the `tfds` command line.

    msff-deepfashion15 --manual_dir DIR [--data_dir ~/tensorflow_datasets] [--config paper]

tensorflow-datasets 4.9.10's `tfds build` imports apache_beam at start-up even for
builders that do not use it; this entry point needs only what the project installs.
"""


from absl import flags

from msff_jax import console

PROGRAM = "msff-deepfashion15"

FLAGS = flags.FlagValues()
flags.DEFINE_string("manual_dir", None, "Folder holding Anno/ (or Anno_coarse/), Eval/ and Img/.",
                    flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "TFDS data folder (default: ~/tensorflow_datasets).",
                    flag_values=FLAGS)
flags.DEFINE_string("config", "paper", "Builder config name (paper, ...).", flag_values=FLAGS)
flags.mark_flag_as_required("manual_dir", flag_values=FLAGS)
console.define_common_flags(FLAGS)


def main(argv=None) -> int:
    """argv without the program name; returns the exit status."""
    def body() -> int:
        import tensorflow_datasets as tfds

        from data_pipeline.conversion.deepfashion15.deepfashion15_dataset_builder import Builder

        names = [c.name for c in Builder.BUILDER_CONFIGS]
        if FLAGS.config not in names:
            raise console.ConfigError(f"--config={FLAGS.config!r} is not one of {names}.")
        builder = Builder(config=FLAGS.config, data_dir=FLAGS.data_dir)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=FLAGS.manual_dir))
        print({name: split.num_examples for name, split in builder.info.splits.items()})
        return 0

    console.quiet_native_logs()
    return console.run_program(FLAGS, argv, body, program=PROGRAM, doc=__doc__.split("\n\n")[0])


def run() -> None:
    """Console entry point: `msff-deepfashion15`."""
    console.entry_point(main)


if __name__ == "__main__":
    run()
