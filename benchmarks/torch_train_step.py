"""The PyTorch training step that does the work of our JAX step, for the peer benchmark.

A throughput ratio means something only when both sides do the same work per step. This
step repeats, for any `nn.Module` classifier, what `msff_jax.train.steps.make_train_step`
does with the optimizer of `msff_jax.train.optimizers.make_optimizer`, reading the same
recipe from `configs/default.py` (`recipe_from_config`) rather than a second copy of it:

- Input: a uint8 batch of shape (batch, height, width, 3), as the JAX step receives it,
  normalised on the device with the config's mean and standard deviation on the 0..255
  scale (`normalize_images`). Its NCHW view is channels-last in memory at no cost.
- Loss: softmax cross-entropy in float32 on smoothed labels. `F.cross_entropy`'s
  `label_smoothing=a` mixes the one-hot target with the uniform distribution as
  `(1 - a) * one_hot + a / num_classes`, the formula of `optax.smooth_labels`.
- Bookkeeping: the global gradient norm, and a step whose loss or gradient norm is not
  finite changes nothing (parameters, momentum, BatchNorm statistics, the schedule's
  count) and reports `finite=False`, as the JAX step's guard does.
- Update, in optax's order: clipping by the global norm when `grad_clip_norm > 0`;
  weight decay added to the gradient (coupled L2, what `torch.optim.SGD(weight_decay=)`
  does) for parameters with more than one dimension only, i.e. convolution and dense
  kernels, not biases or BatchNorm; momentum `m = mu * m + g` and the Nesterov direction
  `g + mu * m`; the step `-lr * direction`, with the learning rate of
  `optax.warmup_cosine_decay_schedule` (linear warm-up from 0, then cosine) computed on
  the device from the count of applied updates.
- Metrics: loss, accuracy, gradient norm and the finite flag, left on the device.

`torch.optim.SGD` computes the same update for a kept step, but it cannot skip a
non-finite one without reading the flag on the host, so the update is written out with
`torch._foreach_*` ops (the multi-tensor kernels `torch.optim` itself uses). Calling a
`TrainStep` runs the step eagerly; `torch.compile(step.__call__)` compiles the whole of
it: Dynamo splits the function at `loss.backward()`, compiling the forward pass and loss
(with its backward, through AOTAutograd) as one graph and the update as another.
`tests/test_torch_train_step.py` checks loss, gradients and updated parameters against
the JAX step on the same weights and batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from msff_jax.train import optimizers

# The JAX benchmark's schedule length (`analysis/benchmark/run.py`): the schedule needs
# one, and its value changes the learning rate, not the work of a step.
NOMINAL_STEPS_PER_EPOCH = 1000


@dataclasses.dataclass(frozen=True)
class TrainRecipe:
    """What the step needs from a training config, as plain numbers."""

    label_smoothing: float
    peak_learning_rate: float
    warmup_steps: int
    decay_steps: int  # Warm-up included, as optax counts it.
    end_learning_rate: float
    momentum: float
    nesterov: bool
    weight_decay: float
    grad_clip_norm: float
    mean_rgb: Sequence[float]
    stddev_rgb: Sequence[float]


def recipe_from_config(config, steps_per_epoch: int = NOMINAL_STEPS_PER_EPOCH) -> TrainRecipe:
    """The recipe of a training config (`configs/default.py` and its variants).

    The schedule's step counts are `optimizers.make_schedule`'s (`schedule_steps`);
    parts of the JAX step this twin does not repeat (AdamW, micro-batches, the EMA, class
    weights in the loss) are refused, not ignored.
    """
    opt = config.optimizer
    class_weights = config.get("class_weights", "none")
    refusals = (
        ("optimizer.name", opt.name, opt.name != "sgd", "the twin implements SGD only"),
        ("grad_accum_steps", config.grad_accum_steps, int(config.grad_accum_steps) != 1,
         "the twin takes the whole batch in one step"),
        ("ema_decay", config.ema_decay, config.ema_decay > 0,
         "the twin keeps no EMA of the parameters"),
        ("class_weights", class_weights, class_weights != "none",
         "the twin's loss weighs every image the same"),
    )
    for field, value, refused, why in refusals:
        if refused:
            raise ValueError(f"config.{field}={value!r}: {why}; use the default recipe's value")
    warmup, decay = optimizers.schedule_steps(config, steps_per_epoch)
    return TrainRecipe(
        label_smoothing=float(config.label_smoothing),
        peak_learning_rate=float(optimizers.peak_learning_rate(config)),
        warmup_steps=warmup,
        decay_steps=decay,
        end_learning_rate=float(opt.end_learning_rate),
        momentum=float(opt.momentum or 0.0),
        nesterov=bool(opt.nesterov),
        weight_decay=float(opt.weight_decay or 0.0),
        grad_clip_norm=float(config.grad_clip_norm or 0.0),
        mean_rgb=tuple(float(v) for v in config.mean_rgb),
        stddev_rgb=tuple(float(v) for v in config.stddev_rgb),
    )


def learning_rate(recipe: TrainRecipe, count: torch.Tensor) -> torch.Tensor:
    """`optax.warmup_cosine_decay_schedule` at `count` updates, computed on the device."""
    count = count.to(torch.float32)
    peak, end = recipe.peak_learning_rate, recipe.end_learning_rate
    warmup = recipe.warmup_steps
    decay = recipe.decay_steps - warmup
    alpha = 0.0 if peak == 0.0 else end / peak
    rising = count * (peak / warmup) if warmup > 0 else torch.zeros_like(count)
    progress = torch.clamp(count - warmup, 0.0, float(decay))
    cosine = 0.5 * (1.0 + torch.cos(math.pi * progress / decay))
    falling = peak * ((1.0 - alpha) * cosine + alpha)
    return torch.where(count < warmup, rising, falling)


def normalize_images(
    images_uint8: torch.Tensor, mean: torch.Tensor, stddev: torch.Tensor
) -> torch.Tensor:
    """(batch, height, width, 3) uint8 -> (batch, 3, height, width) float32, channels-last.

    `mean` and `stddev` have shape (1, 3, 1, 1) on the 0..255 scale. The arithmetic is in
    float32, as in `msff_jax.models.inputs.normalize_images`; under autocast
    the first convolution casts the result.
    """
    images = images_uint8.permute(0, 3, 1, 2).to(torch.float32)
    return (images - mean) / stddev


def autocast_context(device: torch.device, dtype: Optional[torch.dtype]):
    """bfloat16 (or float16) autocast on `device`; a null context for float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class TrainStep:
    """The optimizer state of one model and the step that trains it on one batch.

    Calling it with `(images_uint8, labels)` returns the metrics; the parameters,
    momentum, BatchNorm statistics and count change in place. The model should be in
    train mode; `forward` alone is the inference the benchmark times in eval mode.
    """

    def __init__(
        self,
        model: nn.Module,
        recipe: TrainRecipe,
        autocast_dtype: Optional[torch.dtype] = None,
    ):
        params = [p for p in model.parameters() if p.requires_grad]
        # Kernels first, so weight decay is one multi-tensor op over a prefix.
        self.params = [p for p in params if p.ndim > 1] + [p for p in params if p.ndim <= 1]
        self.num_decayed = sum(p.ndim > 1 for p in params)
        self.model = model
        self.recipe = recipe
        self.autocast_dtype = autocast_dtype
        self.device = self.params[0].device
        self.momentum = (
            [torch.zeros_like(p) for p in self.params] if recipe.momentum else []
        )
        # Running statistics (and BatchNorm's batch counters), restored after a bad step.
        self.buffers = list(model.buffers())
        # Applied updates: the schedule's position, like the count in optax's state.
        self.count = torch.zeros((), dtype=torch.int64, device=self.device)
        self.mean, self.stddev = (
            torch.tensor(values, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
            for values in (recipe.mean_rgb, recipe.stddev_rgb))

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """float32 logits of the normalised batch (train or eval, as the model is set)."""
        images = normalize_images(images_uint8, self.mean, self.stddev)
        with autocast_context(self.device, self.autocast_dtype):
            logits = self.model(images)
        return logits.to(torch.float32)

    def __call__(
        self, images_uint8: torch.Tensor, labels: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        for p in self.params:
            p.grad = None
        statistics_before = [b.clone() for b in self.buffers]
        logits = self.forward(images_uint8)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.recipe.label_smoothing)
        loss.backward()
        with torch.no_grad():
            grads = [p.grad for p in self.params]
            grad_norm = torch.nn.utils.get_total_norm(grads)
            finite = torch.isfinite(grad_norm) & torch.isfinite(loss)
            self._update(grads, grad_norm, finite)
            for buffer, before in zip(self.buffers, statistics_before):
                buffer.copy_(torch.where(finite, buffer, before))
            correct = (logits.argmax(dim=-1) == labels).sum()
        return {
            "loss": loss.detach(),
            "accuracy": correct / labels.shape[0],
            "grad_norm": grad_norm,
            "finite": finite,
        }

    def _update(self, grads, grad_norm: torch.Tensor, finite: torch.Tensor) -> None:
        """optax's chain (clip, add_decayed_weights, trace, scale by -lr) on kept steps.

        A skipped step replaces the gradients (whatever they hold) by zeros, decays the
        momentum by 1 instead of `mu` and steps with learning rate 0: the momentum and
        parameters come out bit-for-bit unchanged without a select over either.
        """
        recipe = self.recipe
        if recipe.grad_clip_norm > 0:
            limit = recipe.grad_clip_norm
            factor = torch.where(grad_norm < limit, 1.0, limit / grad_norm)
            grads = list(torch._foreach_mul(grads, factor))
        if recipe.weight_decay:
            k = self.num_decayed
            decayed = torch._foreach_add(grads[:k], self.params[:k], alpha=recipe.weight_decay)
            grads = list(decayed) + grads[k:]
        zero = torch.zeros((), dtype=grads[0].dtype, device=self.device)
        grads = [torch.where(finite, g, zero) for g in grads]
        if recipe.momentum:
            mu = recipe.momentum
            torch._foreach_mul_(self.momentum, torch.where(finite, mu, 1.0))
            torch._foreach_add_(self.momentum, grads)
            direction = (torch._foreach_add(grads, self.momentum, alpha=mu)
                         if recipe.nesterov else self.momentum)
        else:
            direction = grads
        step_size = torch.where(finite, -learning_rate(recipe, self.count), 0.0)
        torch._foreach_add_(self.params, torch._foreach_mul(direction, step_size))
        self.count += finite.to(self.count.dtype)
