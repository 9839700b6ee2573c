"""The jitted train step: sharding-invariant, exact resume-friendly, NaN-safe, fp16-capable."""

import jax
import numpy as np
import pytest

from configs import default
from msff_jax.train import mesh as mesh_lib
from msff_jax.train import optimizers
from msff_jax.train import steps
from msff_jax.train import loop as train
from msff_jax.train import state as train_state_lib
from msff_jax.models import TINY_OVERRIDES

BATCH, SIZE, CLASSES = 16, 32, 15


def tiny_config(**changes):
    config = default.get_config()
    config.model_overrides = TINY_OVERRIDES["msff_ecomnet"]
    config.image_size, config.batch_size, config.dtype = SIZE, BATCH, "float32"
    config.optimizer.base_learning_rate = 0.8  # Large, so a few steps move the weights visibly.
    config.optimizer.warmup_epochs = 0
    config.num_train_steps = 100
    for key, value in changes.items():
        node = config
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return config


def _batches(mesh, num, seed=0):
    rng = np.random.default_rng(seed)
    sharding = mesh_lib.batch_sharding(mesh)
    for _ in range(num):
        yield {"image": jax.device_put(rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), np.uint8), sharding),
               "label": jax.device_put(rng.integers(0, CLASSES, (BATCH,), np.int32), sharding)}


def _train(config, devices, num_steps=3):
    mesh = mesh_lib.make_mesh(config.mesh_shape, devices=devices)
    model = train_state_lib.build_model(config)
    tx = optimizers.make_optimizer(config, steps_per_epoch=10)
    state = train_state_lib.create_train_state(config, model, tx, mesh, jax.random.PRNGKey(0))
    initial_params = jax.device_get(state.params)  # Before the donated buffers are reused.
    step = steps.make_train_step(config, model, tx, mesh)
    history = []
    for batch in _batches(mesh, num_steps):
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history, initial_params


def test_eight_devices_match_one_with_accumulation_ema_and_clipping():
    """Same global batch on a 1-device and an 8-device mesh: BatchNorm statistics are over
    the global batch in both, so losses and parameters agree to float tolerance."""
    config = tiny_config(grad_accum_steps=2, ema_decay=0.9, grad_clip_norm=1.0)
    one, history_one, initial = _train(config, jax.devices()[:1])
    eight, history_eight, _ = _train(config, jax.devices())
    losses_one = [m["loss"] for m in history_one]
    np.testing.assert_allclose(losses_one, [m["loss"] for m in history_eight], rtol=1e-5)
    assert all(m["finite"] for m in history_one + history_eight)
    assert int(eight.step) == 3
    for name, a, b in (("params", one.params, eight.params), ("ema", one.ema_params, eight.ema_params),
                       ("batch_stats", one.batch_stats, eight.batch_stats)):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=name), a, b)
    # The step really trained: parameters moved, EMA lags behind them, clipping held.
    moved = lambda a, b: max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert moved(eight.params, initial) > 1e-3
    assert 0 < moved(eight.ema_params, initial) < moved(eight.params, initial)


def test_float16_loss_scaling_and_nonfinite_guard():
    """float16 with dynamic loss scaling; a NaN input (stddev 0) gives a non-finite loss:
    the step reports it, keeps the parameters and halves the loss scale."""
    config = tiny_config(dtype="float16", stddev_rgb=(0.0, 0.0, 0.0))
    mesh = mesh_lib.make_mesh((-1, 1))
    model = train_state_lib.build_model(config)
    tx = optimizers.make_optimizer(config, 10)
    state = train_state_lib.create_train_state(config, model, tx, mesh, jax.random.PRNGKey(0))
    before = jax.device_get(state.params)
    scale = float(state.loss_scale.scale)
    step = steps.make_train_step(config, model, tx, mesh)
    state, metrics = step(state, next(_batches(mesh, 1)))
    metrics = jax.device_get(metrics)
    assert not metrics["finite"] and not np.isfinite(metrics["loss"])
    assert float(metrics["loss_scale"]) == scale / 2
    jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(state.params))
    assert int(state.step) == 1


def test_nonfinite_loss_message_names_the_step():
    good = {"loss": np.float32(1.0), "grad_norm": np.float32(1.0), "finite": np.bool_(True)}
    bad = {"loss": np.float32(np.nan), "grad_norm": np.float32(np.nan), "finite": np.bool_(False)}
    assert train._host_metrics([good, good], 11, latest_checkpoint=10)["loss"] == 1.0
    with pytest.raises(train.NonFiniteLossError, match=r"step 13 .*checkpoint \(step 10\) is kept"):
        train._host_metrics([good, good, bad, good], 11, latest_checkpoint=10)


def test_optimizer_schedule_and_decay_mask():
    config = tiny_config(batch_size=512)
    config.optimizer.warmup_epochs = 2
    schedule = optimizers.make_schedule(config, steps_per_epoch=10)
    assert float(schedule(0)) == 0.0
    assert float(schedule(20)) == pytest.approx(0.8 * 512 / 256)  # Linear scaling rule, at peak.
    assert float(schedule(99)) < 0.01
    mask = optimizers.decay_mask({"conv": {"kernel": np.zeros((3, 3, 1, 2)), "bias": np.zeros(2)},
                                  "bn": {"scale": np.zeros(2)}})
    assert mask == {"conv": {"kernel": True, "bias": False}, "bn": {"scale": False}}
    with pytest.raises(ValueError, match="optimizer.name"):
        optimizers.make_optimizer(tiny_config(**{"optimizer.name": "lamb"}), 10)
