"""Images per second of our grain training pipeline against tf.data, same shards, same cores.

Both pipelines do the same work: read TFRecord shards, parse the Example, decode the
JPEG inside a random Inception-style crop window (area 8-100 %, aspect 3/4-4/3), resize
it to `image_size` (bilinear), flip at random, and deliver host numpy batches of uint8
images and int32 labels.

- grain_cv2 / grain_pil: `data_pipeline.records.reader.make_train_iterator` (global shuffle,
  CRC checks, reduced-size JPEG decode) with `--cores` worker processes, doing the
  pixel work with OpenCV or with Pillow (`data_pipeline.records.transforms`).
- tf.data: `TFRecordDataset` -> `parse_single_example` -> `sample_distorted_bounding_box`
  -> `decode_and_crop_jpeg` -> `resize` -> `random_flip_left_right` -> `batch`, every
  stage `AUTOTUNE`, on a private thread pool of `--cores` threads.

Each pipeline runs in its own child process pinned to the same `--cores` CPUs (so
neither inherits the other's threads or imports). After `--warmup_batches`, the script
times `--num_images` images and reports, besides images/s, images per CPU-second
(user+system time of the process and its workers): on a machine shared with other
work that rate is the fairer "per core" figure, since wall time then includes waiting.

    python -m benchmarks.input_pipeline --cores 2 --num_images 2000
    python -m benchmarks.input_pipeline --data_dir SHARDS --cores 16 --num_images 50000

Without `--data_dir` it first writes a synthetic DeepFashion miniature (300-px JPEGs)
and converts it with the project's converter into `--cache_dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PIPELINES = ("grain_cv2", "grain_pil", "tfdata")


# ----------------------------------------------------------------------------- CPU time


def _tree_cpu_seconds(root_pid: int) -> tuple[float, float]:
    """user+system seconds of `root_pid` alone and with its live descendants (Linux
    /proc): a large share in the root process would cap scaling with more workers."""
    from data_pipeline.records.worker_lifetime import stat_fields

    ticks = os.sysconf("SC_CLK_TCK")
    parents, cpu = {}, {}
    for entry in os.listdir("/proc"):
        fields = stat_fields(entry) if entry.isdigit() else None
        if not fields:
            continue
        pid = int(entry)
        parents[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / ticks
    total = 0.0
    for pid, seconds in cpu.items():
        p = pid
        while p and p != root_pid:
            p = parents.get(p, 0)
        if p == root_pid:
            total += seconds
    return cpu.get(root_pid, 0.0), total


# ----------------------------------------------------------------------------- pipelines


def _grain_batches(args, files_unused):
    from data_pipeline.records import reader

    iterator = reader.make_train_iterator(
        args.data_dir, image_backend=args.run_one.split("_")[1], split=args.split, global_batch_size=args.batch_size, image_size=args.image_size,
        seed=0, process_index=0, process_count=1,
        worker_count=args.cores if args.grain_workers is None else args.grain_workers,
        read_threads=args.grain_threads, prefetch_buffer=2,
    )
    return iterator, iterator.close


def _tfdata_batches(args, files):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(args.cores)
    tf.config.threading.set_intra_op_parallelism_threads(args.cores)
    features = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    }
    size = args.image_size

    def parse_and_augment(record):
        example = tf.io.parse_single_example(record, features)
        encoded = example["image/encoded"]
        box_begin, box_size, _ = tf.image.sample_distorted_bounding_box(
            tf.image.extract_jpeg_shape(encoded),
            bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
            min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
            max_attempts=10, use_image_if_no_bounding_boxes=True,
        )
        offset_y, offset_x, _ = tf.unstack(box_begin)
        height, width, _ = tf.unstack(box_size)
        crop_window = tf.stack([offset_y, offset_x, height, width])
        image = tf.io.decode_and_crop_jpeg(encoded, crop_window, channels=3)
        image = tf.image.resize(image, [size, size], method="bilinear")
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        image = tf.image.random_flip_left_right(image)
        return {"image": image, "label": tf.cast(example["image/class/label"], tf.int32)}

    ds = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE)
    ds = ds.shuffle(1024, seed=0).repeat()
    ds = ds.map(parse_and_augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.batch(args.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.threading.private_threadpool_size = args.cores
    options.autotune.enabled = True
    ds = ds.with_options(options)
    return ds.as_numpy_iterator(), lambda: None


def _run_one(args) -> dict:
    """Runs in the child process: build, warm up, time, print one JSON line."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    from data_pipeline.records.manifest import load_manifest, shard_paths

    files = shard_paths(args.data_dir, load_manifest(args.data_dir), args.split)
    build = _tfdata_batches if args.run_one == "tfdata" else _grain_batches
    started = time.perf_counter()
    batches, close = build(args, files)
    for _ in range(args.warmup_batches):
        batch = next(batches)
    startup_s = time.perf_counter() - started
    num_batches = max(1, args.num_images // args.batch_size)
    (main_before, cpu_before), wall_before = _tree_cpu_seconds(os.getpid()), time.perf_counter()
    for _ in range(num_batches):
        batch = next(batches)
    wall = time.perf_counter() - wall_before
    main_after, cpu_after = _tree_cpu_seconds(os.getpid())
    cpu, main_cpu = cpu_after - cpu_before, main_after - main_before
    assert batch["image"].shape == (args.batch_size, args.image_size, args.image_size, 3), batch["image"].shape
    assert str(batch["image"].dtype) == "uint8"
    close()
    images = num_batches * args.batch_size
    return {"pipeline": args.run_one, "cores": args.cores, "images": images, "wall_s": wall,
            "cpu_s": cpu, "main_cpu_s": main_cpu, "startup_s": startup_s}


# ----------------------------------------------------------------------------- driver


def _ensure_data(args) -> str:
    if args.data_dir:
        return args.data_dir
    out = Path(args.cache_dir)
    if (out / "shards" / "manifest.json").exists():
        return str(out / "shards")
    from data_pipeline.conversion import deepfashion
    from data_pipeline.conversion import synthetic

    print(f"writing {args.synthetic_images} synthetic 300-px images and shards under {out} ...", file=sys.stderr)
    if not (out / "deepfashion").exists():
        synthetic.generate(out / "deepfashion", args.synthetic_images, seed=0)
    deepfashion.convert(out / "deepfashion", out / "shards", max_images=args.synthetic_images,
                        sampling="proportional", num_workers=args.cores, progress=False)
    return str(out / "shards")


def _table(rows: list[dict]) -> str:
    lines = [
        "| pipeline | cores | images | wall s | images/s | images/s per core | images per CPU-s "
        "| main-process CPU share | start-up s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = r["images"] / r["wall_s"]
        lines.append(
            f"| {r['pipeline']} | {r['cores']} | {r['images']} | {r['wall_s']:.1f} | {rate:.0f} | "
            f"{rate / r['cores']:.0f} | {r['images'] / r['cpu_s']:.0f} | {r['main_cpu_s'] / r['cpu_s']:.0%} | "
            f"{r['startup_s']:.1f} |"
        )
    return "\n".join(lines)


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=None, help="converted shards (default: make synthetic ones)")
    parser.add_argument("--cache_dir", default="/tmp/msff_input_benchmark")
    parser.add_argument("--synthetic_images", type=int, default=2000)
    parser.add_argument("--split", default="train")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--num_images", type=int, default=2000, help="images timed per pipeline")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--warmup_batches", type=int, default=3)
    parser.add_argument("--grain_workers", type=int, default=None,
                        help="grain worker processes (default: --cores; 0 decodes in threads of the main process)")
    parser.add_argument("--grain_threads", type=int, default=1, help="reader threads per grain process")
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--repeats", type=int, default=1, help="alternate the pipelines this many times")
    parser.add_argument("--run_one", choices=PIPELINES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.run_one:
        print(json.dumps(_run_one(args)))
        return 0
    if args.cores > len(os.sched_getaffinity(0)):
        raise SystemExit(f"--cores {args.cores} exceeds the {len(os.sched_getaffinity(0))} CPUs available")
    data_dir = _ensure_data(args)
    rows = []
    for _ in range(args.repeats):
        for name in args.pipelines.split(","):
            command = [sys.executable, __file__, "--run_one", name, "--data_dir", data_dir]
            for flag in ("split", "cores", "num_images", "batch_size", "image_size", "warmup_batches", "grain_threads",
                         "grain_workers"):
                if getattr(args, flag) is not None:
                    command += [f"--{flag}", str(getattr(args, flag))]
            result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
            if result.returncode:
                sys.stderr.write(result.stderr)
                raise SystemExit(f"{name} pipeline failed (exit {result.returncode})")
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(f"{name}: {rows[-1]}", file=sys.stderr)
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
