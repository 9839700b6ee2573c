"""The real-data check: scikit-learn's 1,797 scanned 8x8 digits through the same shards,
reader, train loop and evaluation as DeepFashion.

    python -m data_pipeline.conversion.digits --output_dir data/digits   # or digits.write_digits_shards
    python launch.py --config configs/digits.py --workdir runs/digits \
        --config.data_dir=data/digits

Digits are nobody's synthetic creation, so reaching >= 95% test accuracy shows the
pipeline and the model learn real images (tests/test_digits.py runs exactly this).

`configs/digits.py:tiny` is the smallest run that passes through every phase of
training: MSFF-EComNet's tiny preset, 12 steps, a checkpoint every 3 steps and an
evaluation every 5, a log line every step. The fault-injection tests
(tests/test_resume.py and the distributed ones) and `benchmarks/preemption_soak.py`
signal and resume it.
"""

import ml_collections

from configs import default


def get_config(arg: str = ""):
    if arg not in ("", "tiny"):
        raise ValueError(f"configs/digits.py takes '' or 'tiny', not {arg!r}")
    config = default.get_config()
    config.num_classes = 10
    config.image_size = 32  # The 8x8 scans upsampled, as the shard writer stores them.
    config.data_dir = "data/digits"
    config.dtype = "float32"
    config.model_overrides = ml_collections.ConfigDict(
        dict(stem_widths=(16, 16, 32), stage_sizes=(1, 1, 1, 1), stage_widths=(32, 48, 64, 96)))
    config.batch_size = 64
    config.eval_batch_size = 128
    config.num_epochs = 15  # 1,258 training scans: ~19 steps per epoch, ~290 steps.
    # Gentle crops: a digit cut in half is another digit. (The reader also flips
    # horizontally; mirrored digits stay distinguishable.)
    config.data.scale_range = (0.7, 1.0)
    config.data.ratio_range = (0.9, 1.1)
    config.data.worker_count = 0
    config.optimizer.warmup_epochs = 1
    config.label_smoothing = 0.0
    config.log_every_steps = 50
    config.eval_every_steps = -1
    config.checkpoint.every_steps = 0  # Evaluations (each epoch) save checkpoints anyway.
    config.checkpoint.keep = 1
    if arg == "tiny":
        from msff_jax.models import TINY_OVERRIDES

        config.model_overrides = ml_collections.ConfigDict(dict(TINY_OVERRIDES["msff_ecomnet"]))
        config.batch_size = 16
        config.eval_batch_size = 64
        config.num_train_steps = 12
        config.optimizer.warmup_epochs = 0
        config.ema_decay = 0.9
        config.data.read_threads = 1
        config.log_every_steps = 1
        config.eval_every_steps = 5
        config.checkpoint.every_steps = 3
        config.checkpoint.keep = 2
    return config
