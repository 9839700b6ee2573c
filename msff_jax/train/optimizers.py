"""The optax optimizer: learning-rate schedule, weight decay mask, clipping.

`make_optimizer(config, steps_per_epoch)` reads `config.optimizer.*`,
`config.grad_clip_norm`, `config.batch_size` and the run length. Gradient accumulation
is not done here but inside the train step (a scan over micro-batches), so the update
sees the whole batch's averaged gradient in one optimizer step. BatchNorm normalises
each micro-batch by its own statistics and updates its running averages once per
micro-batch, as it would with that smaller batch.
"""

from __future__ import annotations

import jax
import optax

OPTIMIZER_NAMES = ("sgd", "adamw")


def total_train_steps(config, steps_per_epoch: int) -> int:
    """`num_train_steps` when positive; its default -1 means `num_epochs` whole epochs.
    Any other value is refused (the config rules refuse it before this is reached)."""
    steps = config.get("num_train_steps", -1)
    if steps == -1:
        return int(round(config.num_epochs * steps_per_epoch))
    if steps > 0:
        return int(steps)
    raise ValueError(f"config.num_train_steps={steps} must be -1 (num_epochs decides) or positive.")


def peak_learning_rate(config) -> float:
    """Linear scaling rule: `base_learning_rate` is per 256 images of global batch."""
    return config.optimizer.base_learning_rate * config.batch_size / 256


def schedule_steps(config, steps_per_epoch: int) -> tuple[int, int]:
    """(warm-up steps, decay steps with the warm-up included, as optax counts them); the
    warm-up never outlasts the run, and the decay is at least one step."""
    total = total_train_steps(config, steps_per_epoch)
    warmup = min(int(round(config.optimizer.warmup_epochs * steps_per_epoch)), total)
    return warmup, max(total, warmup + 1)


def make_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """Linear warm-up from 0, then cosine decay to `end_learning_rate`."""
    warmup, decay = schedule_steps(config, steps_per_epoch)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_learning_rate(config),
        warmup_steps=warmup,
        decay_steps=decay,
        end_value=config.optimizer.end_learning_rate,
    )


def decay_mask(params):
    """True for kernels; False for biases and BatchNorm scales/offsets (ndim <= 1).

    The train step updates packed parameters (`flat_update`): there the decayed group is
    decayed and the other is not."""
    from msff_jax.train import flat_update

    if flat_update.is_packed_parameters(params):
        return {group: group == flat_update.DECAYED for group in params}
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    opt = config.optimizer
    if opt.name not in OPTIMIZER_NAMES:
        raise ValueError(
            f"config.optimizer.name={opt.name!r} is unknown; use one of {OPTIMIZER_NAMES}.")
    schedule = make_schedule(config, steps_per_epoch)
    parts = []
    if config.grad_clip_norm and config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if opt.name == "sgd":
        if opt.weight_decay:
            parts.append(optax.add_decayed_weights(opt.weight_decay, mask=decay_mask))
        parts.append(optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov))
    else:
        parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                                 weight_decay=opt.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
