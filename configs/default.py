"""MSFF-EComNet on DeepFashion-15 at 224 px: the recipe this project recommends.

The paper gives no training hyper-parameters, so this is our reading of the standard
ImageNet-style CNN recipe (Goyal et al. 2017; He et al. 2019 "Bag of Tricks") scaled to a
40,000-image, 15-class set. Every variant config (ablations, baselines, demo) is this file
plus a few changed fields, so the comparison between models is fair by construction.

    python launch.py --config configs/default.py --workdir runs/msff_ecomnet \
        --config.data_dir=data/deepfashion15

`--config configs/default.py:MODEL` trains another model of the study (the ablations
msff_base, msff_msp, msff_iasm; the baselines resnet50, mobilenet_v3_large,
efficientnet_b0) with the same recipe; the one per-model difference is the lighter weight
decay of the depthwise-convolution baselines.
"""

import ml_collections

DEPTHWISE_MODELS = ("mobilenet_v3_large", "efficientnet_b0")


def get_config(model: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # ---------------------------------------------------------------- model
    config.model = model or "msff_ecomnet"
    # Keyword overrides passed to `get_model` (e.g. TINY_OVERRIDES for tests).
    config.model_overrides = ml_collections.ConfigDict()
    if config.model.startswith("msff_"):
        # The recommended GPU setting, chosen from the compiled plan (--mode plan;
        # BENCHMARKS.md): MSP-Conv's 1x1 convolutions on the block input as one, and every
        # MSP-Conv and IASM convolution on channel counts padded to multiples of 8, which
        # bfloat16 tensor-core kernels want (cuDNN's 41/82/164-channel branches are not).
        # Speed only: the same parameters and function; set channel_alignment=1 and
        # fuse_pointwise=False for the plain form.
        config.model_overrides.fuse_pointwise = True
        config.model_overrides.channel_alignment = 8
    config.num_classes = 15
    config.image_size = 224
    # Computation dtype; parameters stay float32. bfloat16 keeps float32's range, so it
    # needs no loss scaling and roughly doubles GPU throughput. 'float16' turns on dynamic
    # loss scaling (see `loss_scale`); 'float32' is the slow, exact reference.
    config.dtype = "bfloat16"
    # Optional torchvision-converted weights (.safetensors) for the baselines.
    config.pretrained_path = ""
    config.pretrained_skip_head = True  # 1000-class heads never fit 15 classes.

    # ----------------------------------------------------------------- data
    config.data_dir = "data/deepfashion15"
    config.train_split = "train"
    config.eval_split = "val"  # Chooses the best checkpoint; `test` is reported once.
    config.test_split = "test"
    # ImageNet statistics on the 0..255 scale. DeepFashion photos are close enough, and
    # the torchvision baselines' pretrained weights expect exactly these.
    config.mean_rgb = (0.485 * 255, 0.456 * 255, 0.406 * 255)
    config.stddev_rgb = (0.229 * 255, 0.224 * 255, 0.225 * 255)
    # Reader options, passed to data_pipeline.records.reader as keywords (eval takes the
    # worker/thread/buffer, checksum and backend ones).
    config.data = ml_collections.ConfigDict()
    # Decoding worker processes per host; 0 decodes in the training process with
    # `read_threads` threads (tests, small CPUs).
    config.data.worker_count = 8
    config.data.read_threads = 2
    config.data.prefetch_buffer = 2
    # Inception-style random-resized-crop (area fraction, aspect ratio) plus horizontal
    # flips (always on in the reader): the standard augmentation for photos of objects.
    config.data.scale_range = (0.08, 1.0)
    config.data.ratio_range = (3.0 / 4.0, 4.0 / 3.0)
    # SHA-256 of every shard against the manifest, once per run for each split.
    config.data.verify_checksums = True
    # Image decoding and resizing of the training crops: "cv2" (OpenCV, with simplejpeg
    # for full-size JPEGs) or "pil" (Pillow). Evaluation, --mode eval and predict use one
    # exact Pillow transform whatever this says (export.json records both).
    config.data.image_backend = "cv2"

    # ------------------------------------------------------------ the recipe
    # Global batch (all devices, all hosts). 256 fits one 16 GB GPU at 224 px in bf16,
    # the paper's card; larger batches scale the learning rate linearly (below).
    config.batch_size = 256
    config.eval_batch_size = 256
    # Micro-batches per optimizer step, for batches that do not fit memory. The step
    # scans over them, so the update equals one big-batch step up to BatchNorm's
    # per-micro-batch statistics.
    config.grad_accum_steps = 1
    # ~40k training images: 100 epochs is ~15.6k steps at batch 256; the cosine tail
    # keeps improving until the end at this scale.
    config.num_epochs = 100
    config.num_train_steps = -1  # -1: num_epochs decides; a positive count overrides it.
    config.seed = 0

    config.optimizer = ml_collections.ConfigDict()
    # SGD with Nesterov momentum 0.9 is still the strongest recipe for BatchNorm CNNs
    # trained from scratch at this size; AdamW ('adamw') is available and suits
    # fine-tuning pretrained baselines (learning_rate ~1e-3, weight_decay ~0.05).
    config.optimizer.name = "sgd"
    # Peak learning rate per 256 images; the used peak is base_learning_rate * batch/256.
    config.optimizer.base_learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = True
    config.optimizer.b1 = 0.9  # AdamW only.
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    # 5 linear warm-up epochs keep the large early gradients of freshly initialised
    # BatchNorm networks from blowing up; then a cosine decay to zero.
    config.optimizer.warmup_epochs = 5
    config.optimizer.end_learning_rate = 0.0
    # L2 weight decay on kernels only, added to the gradient before the momentum (coupled,
    # as torch.optim.SGD(weight_decay=...) does; AdamW's is decoupled): decaying BatchNorm
    # scales and biases (ndim <= 1) only hurts. 5e-5 rather than ImageNet's 1e-4: fewer images per class, but also a
    # model (11.8 M) with less capacity to overfit than ResNet-50.
    config.optimizer.weight_decay = 5e-5
    if config.model in DEPTHWISE_MODELS:
        # Depthwise kernels have few weights each; the MobileNetV3 paper decays them at 1e-5.
        config.optimizer.weight_decay = 1e-5
    # Global-norm clipping; 0 disables it. SGD+BN rarely needs it; AdamW fine-tuning
    # likes 1.0.
    config.grad_clip_norm = 0.0
    # Label smoothing 0.1: DeepFashion's categories overlap (Tee/Top/Blouse, Sweater/
    # Cardigan) and some labels are noisy; smoothing calms over-confident logits.
    config.label_smoothing = 0.1
    # Against class imbalance (a catalogue's data_report.md states it): 'balanced' or the
    # milder 'sqrt' weights each image's loss by its class's training count
    # (msff_jax/train/class_weights.py says why weights and not sampling). DeepFashion-15
    # is drawn class-balanced, so 'none'.
    config.class_weights = "none"
    # EMA of the parameters, used for evaluation when > 0. Off by default: with a cosine
    # schedule to zero it adds little; 0.9998 helps short or noisy runs. BatchNorm's
    # running statistics are not averaged again: evaluation pairs the EMA parameters with
    # the live model's statistics (docs/GUIDE.md, "Training", says what that means).
    config.ema_decay = 0.0
    # The train step's optimizer bookkeeping (norm, guard, update) on a few packed
    # buffers; False does it leaf by leaf with the state donated, the older, slower step.
    config.train_step = ml_collections.ConfigDict()
    config.train_step.packed_update = True
    # Dynamic loss scaling for dtype='float16'.
    config.loss_scale = ml_collections.ConfigDict()
    config.loss_scale.initial = 2.0**15
    config.loss_scale.growth_interval = 2000

    # ------------------------------------------------------------- machinery
    # Mesh axes ('data', 'model'); -1 takes the remaining devices. Data parallel by
    # default; the model axis is there so larger models can shard parameters later.
    config.mesh_shape = (-1, 1)
    config.log_every_steps = 100
    config.eval_every_steps = -1  # -1: once per epoch.
    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 1000
    config.checkpoint.keep = 3  # The latest k, plus the best by validation macro-F1.
    config.checkpoint.asynchronous = True  # Write while training continues.
    config.workdir_lock_wait_secs = 0  # Wait for a run holding the workdir (requeues); 0: refuse.
    config.profile = ml_collections.ConfigDict()
    config.profile.enabled = False  # A trace in WORKDIR/tensorboard for TensorBoard's profiler.
    config.profile.first_step = 10
    config.profile.num_steps = 5
    # `--mode export`: the platforms the jax.export artifact is lowered for (one file
    # serves them all; drop one whose lowering this JAX lacks).
    config.export_platforms = ("cpu", "cuda")

    # ------------------------------------------------------------------ plan
    # `--mode plan` compiles this run's programs for a GPU on any machine and reports
    # memory, kernels and a lower bound on step time (docs/GUIDE.md).
    config.plan = ml_collections.ConfigDict()
    config.plan.device = "h100"  # h100, h100_pcie, h200, a100, a100_40gb.
    config.plan.num_devices = 1  # 1-8 on one host, or a multiple of 8.
    config.plan.programs = ("train_step", "eval_step", "export")
    # JAX preallocates this share of GPU memory (XLA_PYTHON_CLIENT_MEM_FRACTION) and runs
    # every program inside it.
    config.plan.memory_fraction = 0.75
    # Find the largest batch that fits even when the configured one does (more compiles).
    config.plan.search_max_batch = False
    # Also write each compiled program's optimised HLO to WORKDIR/hlo/ (tens of MB).
    config.plan.save_hlo = False
    return config
