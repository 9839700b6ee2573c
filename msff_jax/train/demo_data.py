"""Data for the demo: a synthetic DeepFashion miniature, converted to shards.

`configs/demo.py` (and every recipe built on it) sets `config.demo`; launch.py then calls
`prepare_data` before training, so `python launch.py --config configs/demo.py --workdir DIR`
needs nothing but a fresh install. The shards go to `config.data_dir`, or to
DIR/data/shards when it is left empty, and the synthetic images they are made from (the
real benchmark's file layout, from data_pipeline.conversion.synthetic) into a
`synthetic_deepfashion/` folder inside it, through the same converter real data takes.
Nothing is written anywhere else.

Synthetic data never comes by surprise: making it prints a line naming the folder, every
time; shards already there (a manifest.json) are used as they are; and a data_dir that
exists but holds something else (other files, or cannot be read) is an error, never
written into. A recipe without `config.demo` never makes data.
"""

from __future__ import annotations

import os

from msff_jax import console

RAW_DIR = "synthetic_deepfashion"
# Written into an empty data_dir before generating, removed once the manifest is there: a
# run stopped halfway leaves it, and the rerun knows that the folder is its own to finish.
INCOMPLETE_MARK = ".demo_data_incomplete"


def prepare_data(config, workdir: str) -> str:
    """Sets `config.data_dir` to the demo's shards, making them first if needed (on
    process 0; every process calls this)."""
    from msff_jax.train import distributed

    shards_dir = os.path.abspath(config.data_dir or os.path.join(workdir, "data", "shards"))
    config.data_dir = shards_dir
    failure = distributed.on_primary("demo_data", lambda: _make_unless_there(config, shards_dir),
                                     timeout_secs=6 * 3600)
    if failure:
        raise console.UserError(f"process 0 could not make the demo data: {failure.message}")
    return shards_dir


def _make_unless_there(config, shards_dir: str) -> None:
    if os.path.isfile(os.path.join(shards_dir, "manifest.json")):
        return
    _check_usable(shards_dir)
    raw_dir = os.path.join(shards_dir, RAW_DIR)
    demo = config.demo
    console.say(f"demo: making synthetic data: {demo.num_generated} DeepFashion-style images in "
                f"{raw_dir}, {demo.num_images} of them converted to shards in {shards_dir}")
    from data_pipeline.conversion import deepfashion
    from data_pipeline.conversion import synthetic

    os.makedirs(shards_dir, exist_ok=True)
    mark = os.path.join(shards_dir, INCOMPLETE_MARK)
    with open(mark, "w") as f:
        f.write("the demo's synthetic data is being made here; rerun to finish it\n")
    synthetic.generate(raw_dir, demo.num_generated, seed=demo.seed)
    deepfashion.convert(raw_dir, shards_dir, max_images=demo.num_images, resize_to=demo.resize_to,
                        seed=demo.seed, progress=False, num_workers=demo.convert_workers)
    os.remove(mark)


def _check_usable(shards_dir: str) -> None:
    """The demo writes only into a new or empty folder, or one it started itself."""
    field = f"config.data_dir={shards_dir!r}"
    if os.path.exists(shards_dir) and not os.path.isdir(shards_dir):
        raise console.PathError(f"{field} is a file, not a folder of shards; point "
                                "--config.data_dir at shards, at a new folder, or leave it empty "
                                "(the demo then makes its data under the workdir).")
    try:
        entries = sorted(os.listdir(shards_dir)) if os.path.isdir(shards_dir) else []
    except OSError as err:
        raise console.PathError(f"{field} cannot be read ({err.strerror or err}); fix its "
                                "permissions, or point --config.data_dir elsewhere.") from err
    if entries and INCOMPLETE_MARK not in entries:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise console.PathError(
            f"{field} holds no shards (no manifest.json) but other files ({shown}); the demo "
            "makes its synthetic data only in a new or empty folder and never writes into "
            "one that holds something else. Point --config.data_dir at shards (the converter's "
            "output), at a new folder, or leave it empty (the demo then uses the workdir).")
