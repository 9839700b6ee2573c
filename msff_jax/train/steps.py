"""The jitted train and eval steps.

Both take global `jax.Array` batches sharded over the mesh's 'data' axis and replicated
state, so one `jax.jit` program covers every device of every process. BatchNorm needs no
`axis_name`: under jit the batch mean is a mean over the global array, and XLA inserts
the cross-device reductions, so its statistics are those of the whole global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from msff_jax.train import class_weights
from msff_jax.train import config_checks
from msff_jax.train import flat_update
from msff_jax.train import mesh as mesh_lib
from msff_jax.train import state as train_state_lib
from msff_jax.models.inputs import normalize_images


def packs_update(config) -> bool:
    """`config.train_step.packed_update`; configs made before the switch pack."""
    return bool(config.get("train_step", {}).get("packed_update", True))


def _tree_where(condition, new, old):
    return jax.tree.map(lambda n, o: jnp.where(condition, n, o), new, old)


def _split_micro_batches(x, num_micro: int, mesh):
    """(B, ...) -> (num_micro, B / num_micro, ...), each micro-batch spread over all devices.

    Row i of micro-batch j is global row i * num_micro + j: the global array is split
    over devices in contiguous blocks, so this interleaving keeps every micro-batch's
    rows on every device and needs no data movement.
    """
    x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, "data")))


def make_loss_fn(config, model, weights=None):
    """Cross-entropy with label smoothing on one (micro-)batch, each image weighed by its
    class's entry of `weights` (`class_weights.for_config`; None: all alike); also returns
    new BN stats."""
    dtype = train_state_lib.compute_dtype(config)

    def loss_fn(params, batch_stats, images_uint8, labels, dropout_rng, loss_scale):
        images = normalize_images(images_uint8, config.mean_rgb, config.stddev_rgb, dtype)
        logits, updated = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_rng})
        logits = logits.astype(jnp.float32)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, config.num_classes),
                                      config.label_smoothing)
        loss = class_weights.mean_loss(optax.softmax_cross_entropy(logits, targets), labels, weights)
        correct = jnp.sum(jnp.argmax(logits, -1) == labels)
        return loss * loss_scale, (loss, correct, updated.get("batch_stats", batch_stats))

    return loss_fn


def make_train_step(config, model, tx, mesh, weights=None):
    """Returns jitted `step(state, batch) -> (state, metrics)`; `weights` are the loss's
    per-class weights (`class_weights.for_config`, read by the caller that knows the
    data), or None.

    `config.train_step.packed_update` (default True) chooses the optimizer bookkeeping:
    on packed buffers (`flat_update`: a few kernels for the gradient norm, the guard and
    the update), or leaf by leaf as optax does it on trees, the state donated, which is
    how the step worked before and is kept so a GPU can measure what packing is worth.
    The packed step does not donate its state: with its buffers donated, the compiler
    copied every convolution kernel before overwriting it in place (85 copy kernels per
    MSFF-EComNet step in the plan); a fresh state costs its size in device memory
    (~0.1 GB for MSFF-EComNet with momentum) instead.

    A step whose loss or gradients are not finite leaves parameters, statistics and
    optimizer state untouched and reports `finite=False`; the loop stops on it (for
    float16 a gradient overflow is instead the normal signal to lower the loss scale).
    """
    loss_fn = make_loss_fn(config, model, weights)
    grad_fn = jax.grad(loss_fn, has_aux=True)
    num_micro = int(config.grad_accum_steps)
    config_checks.check_batch_size(config, mesh.shape["data"])
    use_loss_scale = config.dtype == "float16"

    def compute_grads(state, batch, dropout_rng, scale):
        if num_micro == 1:
            grads, (loss, correct, batch_stats) = grad_fn(
                state.params, state.batch_stats, batch["image"], batch["label"], dropout_rng, scale)
            return grads, loss, correct, batch_stats
        images = _split_micro_batches(batch["image"], num_micro, mesh)
        labels = _split_micro_batches(batch["label"], num_micro, mesh)

        def accumulate(carry, inputs):
            grads_sum, loss_sum, correct_sum, batch_stats = carry
            micro_images, micro_labels, index = inputs
            grads, (loss, correct, batch_stats) = grad_fn(
                state.params, batch_stats, micro_images, micro_labels,
                jax.random.fold_in(dropout_rng, index), scale)
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            return (grads_sum, loss_sum + loss, correct_sum + correct, batch_stats), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        carry = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), state.batch_stats)
        (grads, loss, correct, batch_stats), _ = jax.lax.scan(
            accumulate, carry, (images, labels, jnp.arange(num_micro)))
        grads = jax.tree.map(lambda g: g / num_micro, grads)
        return grads, loss / num_micro, correct, batch_stats

    abstract = train_state_lib.abstract_train_state(config, model, tx, mesh, jax.random.PRNGKey(0))
    packed_update = packs_update(config)
    parameters = flat_update.FlatLayout.for_parameters(abstract.params)
    statistics = flat_update.FlatLayout.single(abstract.batch_stats)

    def packed_bookkeeping(state, grads, loss, batch_stats, scale):
        """Norm, guard, update and EMA on packed buffers (flat_update), then unpacked."""
        grads = jax.tree.map(lambda g: g / scale, parameters.pack(grads))
        params = parameters.pack(state.params)
        opt_state = parameters.pack_state(state.opt_state)
        grad_norm = flat_update.global_norm(grads)
        grads_finite = jnp.isfinite(grad_norm)
        keep_update = grads_finite & jnp.isfinite(loss)

        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = flat_update.where(keep_update, optax.apply_updates(params, updates), params)
        new_opt_state = flat_update.where(keep_update, new_opt_state, opt_state)
        new_batch_stats = statistics.unpack(flat_update.where(
            keep_update, statistics.pack(batch_stats), statistics.pack(state.batch_stats)))
        ema_params = state.ema_params
        if ema_params is not None:
            decay = config.ema_decay
            ema = parameters.pack(ema_params)
            ema_params = parameters.unpack(flat_update.where(
                keep_update, jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, new_params),
                ema))
        updated = state.replace(
            params=parameters.unpack(new_params), batch_stats=new_batch_stats,
            opt_state=parameters.unpack_state(new_opt_state), ema_params=ema_params)
        return updated, grad_norm, grads_finite

    def per_leaf_bookkeeping(state, grads, loss, batch_stats, scale):
        """The same on the trees, leaf by leaf, the guard a select over the whole state."""
        grads = jax.tree.map(lambda g: g / scale, grads)
        grad_norm = optax.tree.norm(grads)
        grads_finite = jnp.isfinite(grad_norm)
        keep_update = grads_finite & jnp.isfinite(loss)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = state.ema_params
        if ema_params is not None:
            decay = config.ema_decay
            ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
        updated = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state,
                                ema_params=ema_params)
        return _tree_where(keep_update, updated, state), grad_norm, grads_finite

    bookkeeping = packed_bookkeeping if packed_update else per_leaf_bookkeeping

    def train_step(state, batch):
        dropout_rng = jax.random.fold_in(state.rng, state.step)
        scale = state.loss_scale.scale if use_loss_scale else jnp.ones((), jnp.float32)
        grads, loss, correct, batch_stats = compute_grads(state, batch, dropout_rng, scale)
        new_state, grad_norm, grads_finite = bookkeeping(state, grads, loss, batch_stats, scale)
        loss_finite = jnp.isfinite(loss)
        keep_update = grads_finite & loss_finite

        loss_scale = state.loss_scale
        if use_loss_scale:
            grown = loss_scale.good_steps + 1 >= config.loss_scale.growth_interval
            loss_scale = train_state_lib.DynamicLossScale(
                scale=jnp.where(grads_finite,
                                jnp.where(grown, loss_scale.scale * 2.0, loss_scale.scale),
                                jnp.maximum(loss_scale.scale / 2.0, 1.0)),
                good_steps=jnp.where(grads_finite & ~grown, loss_scale.good_steps + 1, 0))
            # Overflowing float16 gradients are expected; only a bad loss is an error.
            finite = loss_finite
        else:
            finite = keep_update
        new_state = new_state.replace(step=state.step + 1, loss_scale=loss_scale)
        metrics = {
            "loss": loss,
            "accuracy": correct / batch["label"].shape[0],
            "grad_norm": grad_norm,
            "finite": finite,
        }
        if use_loss_scale:
            metrics["loss_scale"] = loss_scale.scale
        return new_state, metrics

    state_shardings = jax.tree.map(lambda leaf: leaf.sharding, abstract)
    batch_shardings = mesh_lib.batch_sharding(mesh)
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
        donate_argnums=() if packed_update else 0,
    )


def make_eval_step(config, model, mesh):
    """Returns jitted `step(variables, batch) -> {'logits', 'label', 'mask'}`, replicated.

    Replicated outputs are readable on every process with `np.asarray`, so the host-side
    metric accumulation sees the global batch in the same order everywhere. Padding rows
    carry `mask=False` and must be dropped by the caller.
    """
    dtype = train_state_lib.compute_dtype(config)

    def eval_step(variables, batch):
        images = normalize_images(batch["image"], config.mean_rgb, config.stddev_rgb, dtype)
        logits = model.apply(variables, images, train=False).astype(jnp.float32)
        mask = batch.get("mask")
        if mask is None:
            mask = jnp.ones(batch["label"].shape, jnp.bool_)
        return {"logits": logits, "label": batch["label"], "mask": mask}

    return jax.jit(eval_step, out_shardings=mesh_lib.replicated(mesh))
