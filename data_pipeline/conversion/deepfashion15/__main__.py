"""Builds the TFDS dataset without the `tfds` command line.

    python -m data_pipeline.conversion.deepfashion15 --manual_dir DIR [--data_dir ~/tensorflow_datasets] [--config paper]

tensorflow-datasets 4.9.10's `tfds build` imports apache_beam at start-up even for
builders that do not use it; this entry point needs only what the project installs.
"""

import argparse
import sys

import tensorflow_datasets as tfds

from data_pipeline.conversion.deepfashion15.deepfashion15_dataset_builder import Builder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.conversion.deepfashion15", description=__doc__.split("\n\n")[0])
    parser.add_argument("--manual_dir", required=True, help="folder holding Anno/ (or Anno_coarse/), Eval/ and Img/")
    parser.add_argument("--data_dir", default=None, help="TFDS data folder (default: ~/tensorflow_datasets)")
    parser.add_argument("--config", default="paper", choices=[c.name for c in Builder.BUILDER_CONFIGS])
    args = parser.parse_args(argv)
    builder = Builder(config=args.config, data_dir=args.data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=args.manual_dir))
    print({name: split.num_examples for name, split in builder.info.splits.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
