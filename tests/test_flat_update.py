"""The train step's bookkeeping on packed buffers (`flat_update`) computes what optax
computes leaf by leaf: packing round-trips, optimizer states pack and unpack for SGD and
AdamW, and a real train step (SGD with Nesterov momentum and decay, then AdamW with
clipping and EMA) updates parameters, moments and EMA as the per-leaf update would."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from msff_jax.models import TINY_OVERRIDES
from msff_jax.train import flat_update
from msff_jax.train import mesh as mesh_lib
from msff_jax.train import optimizers
from msff_jax.train import state as train_state_lib
from msff_jax.train import steps
from tests.test_train_steps import _batches, tiny_config


def _tree():
    return {"conv": {"kernel": jnp.arange(24.0).reshape(2, 3, 2, 2)},
            "norm": {"scale": jnp.ones(4), "bias": jnp.full(4, 0.5)},
            "head": {"kernel": jnp.arange(6.0).reshape(3, 2), "bias": jnp.zeros(2)}}


def test_pack_round_trips_and_groups_by_decay():
    tree = _tree()
    layout = flat_update.FlatLayout.for_parameters(tree)
    packed = layout.pack(tree)
    assert packed[flat_update.DECAYED].shape == (1, 24 + 6)
    assert packed[flat_update.OTHERS].shape == (1, 4 + 4 + 2)
    assert optimizers.decay_mask(packed) == {flat_update.DECAYED: True, flat_update.OTHERS: False}
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(layout.unpack(packed))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("tx", [
    optax.chain(optax.add_decayed_weights(1e-2, mask=optimizers.decay_mask),
                optax.sgd(0.1, momentum=0.9, nesterov=True)),
    optax.chain(optax.clip_by_global_norm(1.0),
                optax.adamw(1e-2, weight_decay=0.05, mask=optimizers.decay_mask)),
])
def test_packed_update_equals_the_per_leaf_update(tx):
    params = _tree()
    layout = flat_update.FlatLayout.for_parameters(params)
    grads = jax.tree.map(lambda p: jnp.cos(p) + 0.1, params)
    state = tx.init(params)
    for _ in range(3):  # A few steps, so the moments are not zero.
        updates, state_next = tx.update(grads, state, params)
        packed_updates, packed_state = tx.update(layout.pack(grads), layout.pack_state(state),
                                                 layout.pack(params))
        for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(layout.unpack(packed_updates))):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        unpacked = layout.unpack_state(packed_state)
        assert jax.tree.structure(unpacked) == jax.tree.structure(state_next)
        for a, b in zip(jax.tree.leaves(state_next), jax.tree.leaves(unpacked)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        params, state = optax.apply_updates(params, updates), state_next
        grads = jax.tree.map(lambda g: 0.7 * g - 0.05, grads)


@pytest.mark.parametrize("changes", [
    {},  # SGD, Nesterov momentum, decay on kernels: the default recipe.
    {"optimizer.name": "adamw", "optimizer.base_learning_rate": 0.01, "grad_clip_norm": 0.5,
     "ema_decay": 0.9},
])
def test_train_step_updates_as_optax_does_leaf_by_leaf(changes):
    """The real step against its own gradients pushed through optax tree by tree."""
    config = tiny_config(**changes)
    mesh = mesh_lib.make_mesh(config.mesh_shape, devices=jax.devices()[:1])
    model = train_state_lib.build_model(config)
    tx = optimizers.make_optimizer(config, steps_per_epoch=10)
    state = train_state_lib.create_train_state(config, model, tx, mesh, jax.random.PRNGKey(0))
    step = steps.make_train_step(config, model, tx, mesh)
    grad_fn = jax.jit(jax.grad(steps.make_loss_fn(config, model), has_aux=True))
    for batch in _batches(mesh, 2):
        rng = jax.random.fold_in(state.rng, state.step)
        grads, _ = grad_fn(state.params, state.batch_stats, batch["image"], batch["label"], rng,
                           jnp.ones((), jnp.float32))
        updates, expected_opt = tx.update(grads, state.opt_state, state.params)
        expected_params = optax.apply_updates(state.params, updates)
        expected_ema = None if state.ema_params is None else jax.tree.map(
            lambda e, p: config.ema_decay * e + (1 - config.ema_decay) * p, state.ema_params,
            expected_params)
        state, metrics = step(state, batch)
        assert bool(metrics["finite"])
        np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
        for expected, got in ((expected_params, state.params), (expected_opt, state.opt_state),
                              (expected_ema, state.ema_params)):
            assert jax.tree.structure(expected) == jax.tree.structure(got)
            for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
                np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_per_leaf_step_equals_the_packed_step_and_donates_its_state():
    """`train_step.packed_update=False` (the step before packing, kept for GPU
    measurements) updates as the packed step does, skips a non-finite step alike, and
    donates its state again. The tiny ResNet compiles fastest."""
    finals = {}
    for packed in (True, False):
        config = tiny_config(ema_decay=0.9, model="resnet50", **{"train_step.packed_update": packed})
        config.model_overrides = TINY_OVERRIDES["resnet50"]
        mesh = mesh_lib.make_mesh(config.mesh_shape, devices=jax.devices()[:1])
        model = train_state_lib.build_model(config)
        tx = optimizers.make_optimizer(config, steps_per_epoch=10)
        state = train_state_lib.create_train_state(config, model, tx, mesh, jax.random.PRNGKey(0))
        step = steps.make_train_step(config, model, tx, mesh)
        norms = []
        for batch in _batches(mesh, 2):
            given = state
            state, metrics = step(state, batch)
            assert bool(metrics["finite"])
            norms.append(float(metrics["grad_norm"]))
            # Donated buffers are gone after the call; the packed step keeps its input.
            assert jax.tree.leaves(given.params)[0].is_deleted() is not packed
        # A NaN parameter: the loss is not finite, and the step changes nothing but its count.
        leaves, treedef = jax.tree.flatten(state.params)
        leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
        poisoned = state.replace(params=jax.tree.unflatten(treedef, leaves))
        expected = jax.device_get(poisoned)
        after, metrics = step(poisoned, next(_batches(mesh, 1, seed=5)))
        assert not bool(metrics["finite"])
        after = jax.device_get(after)
        assert int(after.step) == int(expected.step) + 1
        for a, b in zip(jax.tree.leaves(expected.replace(step=after.step)), jax.tree.leaves(after)):
            np.testing.assert_array_equal(a, b)
        finals[packed] = (jax.device_get(state), norms)
    (packed_state, packed_norms), (leaf_state, leaf_norms) = finals[True], finals[False]
    np.testing.assert_allclose(packed_norms, leaf_norms, rtol=1e-5)
    assert jax.tree.structure(packed_state) == jax.tree.structure(leaf_state)
    for a, b in zip(jax.tree.leaves(packed_state), jax.tree.leaves(leaf_state)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
