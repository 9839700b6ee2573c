"""Throughput benchmark: the default recipe, timed instead of trained.

    python launch.py --config configs/benchmark.py --workdir runs/bench
    python launch.py --config configs/benchmark.py:cpu_tiny --workdir /tmp/bench

Each model in `benchmark.models` gets the training step `launch.py` trains with (same
optimizer, BatchNorm update, uint8 images normalised on the device),
compiled once and timed on a synthetic batch already on the device; then the eval
forward. Results land in WORKDIR as benchmark.csv (timm's columns), benchmark.md and
throughput_vs_params.png. See BENCHMARKS.md for how to read them.

Variants (`:arg`):
  (none)    one GPU: the four models of the paper's comparison, 224 px, bf16, batch 256.
  all       every model, the ablations too.
  cpu       a CPU-sized run: reduced image size and batch, the full-size models.
  cpu_tiny  tiny model presets at 32 px for tests; seconds on one core.
"""

import ml_collections

from configs import default

# The models configs/default.py takes (msff_jax.models.MODEL_NAMES, without importing JAX).
MODEL_NAMES = ("msff_base", "msff_msp", "msff_iasm", "msff_ecomnet", "resnet50",
               "mobilenet_v3_large", "efficientnet_b0")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = default.get_config()
    config.mode = "benchmark"
    config.benchmark = bench = ml_collections.ConfigDict()
    # The paper's Table 3 comparison: our model and the three baselines.
    # Ordered by what the targets need first, so a run cut short keeps those.
    bench.models = ("resnet50", "msff_ecomnet", "mobilenet_v3_large", "efficientnet_b0")
    # Training batch comes from config.batch_size (global); per-model overrides, e.g.
    # {'efficientnet_b0': 128}, for models that do not fit at the common size.
    bench.per_model_batch_size = ml_collections.ConfigDict()
    # Per-model module options on top of config.model_overrides: each model's own
    # defaults from configs/default.py (MSFF's recommended speed options), which a run can
    # change, e.g. --config.benchmark.per_model_overrides.msff_ecomnet.channel_alignment=1.
    config.model_overrides = ml_collections.ConfigDict()
    bench.per_model_overrides = ml_collections.ConfigDict({
        name: default.get_config(name).model_overrides.to_dict() for name in MODEL_NAMES})
    # Inference: a large batch (no activations kept for backward) fills the GPU.
    bench.include_inference = True
    bench.infer_batch_size = 256
    bench.warmup_steps = 5  # The first calls also pay autotuning and allocator growth.
    bench.timed_steps = 15
    bench.repeats = 5  # Median of repeats; each repeat times `timed_steps` steps.
    # Use TINY_OVERRIDES presets (tests, smoke runs); full models otherwise.
    bench.tiny_models = False
    # End-to-end: the same step fed by the grain reader from config.data_dir's shards,
    # to show whether training is input-bound. Reuses each model's compiled step.
    bench.end_to_end = False
    bench.end_to_end_models = ("msff_ecomnet",)
    bench.end_to_end_prefetch = 2  # Global batches transferred ahead of the step.
    # Untimed steps before the end-to-end clock starts: enough for the worker processes
    # to start and for batches buffered during start-up to drain, so the timed steps
    # see the steady state (30 x 256 images ~ 2-3 s at GPU rates).
    bench.end_to_end_warmup_steps = 30
    # Steps of the train step to record with the JAX profiler after timing (0: none).
    # The trace lands in WORKDIR/profile/MODEL; its per-kernel summary in
    # kernel_profile.md and benchmark.json (msff_jax.analysis.benchmark.kernel_profile).
    bench.profile_steps = 0
    # Rows of benchmarks/torch_peers.py to merge into the table and plot ('' for none).
    bench.torch_csv = ""
    # The CSV's framework column; a variant run (other XLA flags, say) names itself
    # here, e.g. 'jax[xla-flags]', so its rows sit beside the plain ones.
    bench.framework = "jax"
    # Keep going when one model fails (logged, row left out): a long GPU run should
    # not lose every figure to one model. Tests keep the default and see the error.
    bench.continue_on_error = False

    if variant in ("", "gpu"):
        pass
    elif variant == "all":
        bench.models = (
            "msff_base", "msff_msp", "msff_iasm", "msff_ecomnet",
            "resnet50", "mobilenet_v3_large", "efficientnet_b0",
        )
    elif variant == "cpu":
        config.dtype = "float32"  # CPUs have no fast bfloat16 convolutions.
        config.image_size = 64
        config.batch_size = 16
        bench.infer_batch_size = 16
        bench.warmup_steps = 1
        bench.timed_steps = 3
        bench.repeats = 3
        bench.end_to_end_warmup_steps = 2
        config.data.worker_count = 0
    elif variant == "cpu_tiny":
        config.dtype = "float32"
        config.image_size = 32
        config.batch_size = 8
        bench.infer_batch_size = 8
        bench.models = ("msff_ecomnet", "resnet50")
        bench.tiny_models = True
        bench.end_to_end_warmup_steps = 2
        bench.warmup_steps = 1
        bench.timed_steps = 2
        bench.repeats = 2
        config.data.worker_count = 0
    else:
        raise ValueError(
            f"configs/benchmark.py: unknown variant {variant!r}; use '', 'all', 'cpu' "
            "or 'cpu_tiny'."
        )
    return config
