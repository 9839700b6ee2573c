"""Converts your own product images into TFRecord shards, a manifest and a data report.

    msff-catalogue --image_root ROOT --output_dir OUT [--table FILE] [--skip_bad]
    (or python -m data_pipeline.conversion.catalogue ...; --help lists the flags)

ROOT holds a folder per class (ROOT/<class>/**/<image>, a subfolder being one product
with several views), or the same under ROOT/train, ROOT/val and ROOT/test to keep your
own split; or --table lists path,label[,group][,split] rows (CSV, TSV or JSON Lines)
with paths relative to ROOT. OUT gets the shards, manifest.json and data_report.md/.png/.json.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from absl import flags

from data_pipeline.conversion.catalogue import convert as convert_lib
from data_pipeline.conversion.catalogue import layouts
from data_pipeline.conversion.catalogue import report as report_lib
from data_pipeline.records.manifest import describe
from msff_jax import console

PROGRAM = "msff-catalogue"
_TABLE_FLAGS = ("path_column", "label_column", "group_column", "split_column")

# Its own FlagValues: the converters' flags never clash with each other's in one process.
FLAGS = flags.FlagValues()
flags.DEFINE_string("image_root", None, "Folder of the images: ROOT/<class>/..., ROOT/{train,val,test}/<class>/..., "
                    "or the folder --table's paths are relative to.", flag_values=FLAGS)
flags.DEFINE_string("output_dir", None, "Gets the shards, manifest.json and data_report.{md,png,json}; "
                    "shard-named files of other runs there are replaced.", flag_values=FLAGS)
flags.DEFINE_string("table", None, "A CSV, TSV or JSON Lines file, one image per row, instead of class "
                    "folders.", flag_values=FLAGS)
flags.DEFINE_string("path_column", "path", "Table column of the image path (relative to --image_root).",
                    flag_values=FLAGS)
flags.DEFINE_string("label_column", "label", "Table column of the class name.", flag_values=FLAGS)
flags.DEFINE_string("group_column", "", "Table column of the product id (SKU, listing): all images of a "
                    "product go to one split. Empty: none.", flag_values=FLAGS)
flags.DEFINE_string("split_column", "", "Table column of your own split (train, val, test), kept as given. "
                    "Empty: split here.", flag_values=FLAGS)
flags.DEFINE_list("classes", None, "Class names in label order (default: every class found, sorted); "
                  "others are bad input.", flag_values=FLAGS)
flags.DEFINE_string("split", "8:1:1", "train:val:test ratios, stratified by class and grouped by product.",
                    flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Split seed: the same seed and images give the same split.", flag_values=FLAGS)
flags.DEFINE_bool("skip_bad", False, "Leave out bad rows, unreadable images and classes too small to split, "
                  "and list them in data_report.md, instead of stopping at the first.", flag_values=FLAGS)
flags.DEFINE_bool("group_subfolders", True, "Folders: every folder below a class folder is one product.",
                  flag_values=FLAGS)
flags.DEFINE_bool("group_near_duplicates", False, "Keep each set of near-duplicates (the same photo resized "
                  "or re-encoded) in one split, like one product. They are reported either way.",
                  flag_values=FLAGS)
flags.DEFINE_integer("near_duplicate_bits", convert_lib.DEFAULT_NEAR_DUPLICATE_BITS, "Perceptual hashes at "
                     "most this many of 64 bits apart are near-duplicates.", lower_bound=0, upper_bound=31,
                     flag_values=FLAGS)
flags.DEFINE_integer("max_side", 0, "Shrink images whose long side is larger to this many pixels "
                     "(re-encodes them); 0 keeps every size.", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_float("shard_size_mb", 128, "Target shard size.", lower_bound=0.001, flag_values=FLAGS)
flags.DEFINE_integer("num_workers", None, "Image workers (default: every core).", lower_bound=1,
                     flag_values=FLAGS)
flags.mark_flags_as_required(["image_root", "output_dir"], flag_values=FLAGS)
console.define_common_flags(FLAGS)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """argv without the program name; returns the exit status (a mistake in the data or
    the flags is one `error:` line)."""

    def body() -> int:
        if not FLAGS.table:
            given = [f"--{name}" for name in _TABLE_FLAGS if FLAGS[name].present]
            if given:
                raise console.ConfigError(f"{', '.join(given)} only applies with --table")
        try:
            manifest, report = convert_lib.convert(
                FLAGS.image_root, FLAGS.output_dir, table=FLAGS.table,
                columns=layouts.Columns(FLAGS.path_column, FLAGS.label_column, FLAGS.group_column,
                                        FLAGS.split_column),
                classes=FLAGS.classes, split=FLAGS.split, seed=FLAGS.seed, skip_bad=FLAGS.skip_bad,
                group_subfolders=FLAGS.group_subfolders, group_near_duplicates=FLAGS.group_near_duplicates,
                near_duplicate_bits=FLAGS.near_duplicate_bits, max_side=FLAGS.max_side,
                shard_size_mb=FLAGS.shard_size_mb, num_workers=FLAGS.num_workers, progress=sys.stderr.isatty())
        except ValueError as err:  # CatalogueError, SplitError
            raise console.UserError(str(err)) from err
        out = FLAGS.output_dir
        print(f"wrote {os.path.join(out, 'manifest.json')}: {describe(manifest)}")
        near = report["near_duplicates"]["sets"]
        print(f"report {os.path.join(out, report_lib.MARKDOWN_NAME)}: {report['images']['skipped']} images skipped, "
              f"{len(report['exact_duplicates'])} exact and {len(near)} near-duplicate sets")
        print(f"class imbalance: {report['class_imbalance']['statement']}")
        print(f"next: python launch.py --config configs/default.py --workdir runs/catalogue "
              f"--config.data_dir={out} --config.num_classes={len(manifest['class_names'])}")
        return 0

    return console.run_program(FLAGS, argv, body, program=PROGRAM, doc=__doc__.split("\n\n")[0])


def run() -> None:
    """Console entry point: `msff-catalogue`."""
    console.entry_point(main)


if __name__ == "__main__":
    run()
