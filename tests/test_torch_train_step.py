"""The PyTorch twin's training step does the JAX step's work: same loss, gradients, update.

Both sides start from the same weights of a tiny MSFF-EComNet (the JAX initialisation,
converted) and see the same uint8 batches. The JAX side is the real
`steps.make_train_step` with `optimizers.make_optimizer`, not a copy, so a change to
either step that changes the update fails here. The recipe is the default one with
numbers that make each part visible: float32, dropout off, a warm-up whose first step
has learning rate 0, weight decay large enough that decaying the wrong parameters would
show, momentum and label smoothing as shipped.
"""

import copy
import re

import jax
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from benchmarks import msff_torch, torch_train_step
from configs import default
from msff_jax.models import TINY_OVERRIDES
from msff_jax.train import mesh as mesh_lib
from msff_jax.train import optimizers, steps
from msff_jax.train import state as train_state_lib

BATCH, SIZE, CLASSES = 8, 32, 15
STEPS_PER_EPOCH = 2
OVERRIDES = {**TINY_OVERRIDES["msff_ecomnet"], "dropout_rate": 0.0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two OpenMP threads on a shared 2-core machine spin-wait on each other.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def recipe_config(**changes):
    config = default.get_config()
    config.model_overrides = dict(OVERRIDES)
    config.num_classes, config.image_size, config.batch_size = CLASSES, SIZE, BATCH
    config.dtype = "float32"
    config.optimizer.base_learning_rate = 3.2  # A peak of 0.1 at batch 8.
    config.optimizer.warmup_epochs = 1  # Two warm-up steps: learning rates 0, then 0.05.
    config.optimizer.weight_decay = 0.05
    config.num_train_steps = 10
    config.update_from_flattened_dict(changes)
    return config


def uint8_batches(count, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), np.uint8),
             rng.integers(0, CLASSES, (BATCH,), np.int32)) for _ in range(count)]


def as_torch_names(params, batch_stats=None):
    """Flax trees -> {torch state-dict key: array}, in the twin's layouts."""
    converted = msff_torch.flax_variables_to_torch_state_dict(
        {"params": params, "batch_stats": batch_stats or {}})
    return {k: v.numpy() for k, v in converted.items() if not k.endswith("num_batches_tracked")}


def twin_step_for(config, params=None, batch_stats=None):
    """The twin's step, from converted Flax weights or, without them, torch's initialisation."""
    torch.manual_seed(0)
    twin = msff_torch.build_twin("msff_ecomnet", CLASSES, **OVERRIDES)
    if params is not None:
        twin.load_state_dict(msff_torch.flax_variables_to_torch_state_dict(
            {"params": params, "batch_stats": batch_stats}), strict=True)
    twin = twin.to(memory_format=torch.channels_last).train()
    recipe = torch_train_step.recipe_from_config(config, STEPS_PER_EPOCH)
    return torch_train_step.TrainStep(twin, recipe)


def batchnorm_counts(model):
    """Values per channel each BatchNorm normalises over, recorded on every forward."""
    counts = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(
                lambda m, inputs, _, name=name: counts.__setitem__(
                    name, inputs[0].numel() // inputs[0].shape[1]))
    return counts


def assert_close_trees(actual, expected, atol, what):
    assert set(actual) == set(expected), what
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=0, atol=atol,
                                   err_msg=f"{what}: {key}")


def max_difference(a, b):
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_twin_step_matches_the_jax_step():
    config = recipe_config()
    mesh = mesh_lib.make_mesh((1, 1), devices=jax.devices()[:1])
    model = train_state_lib.build_model(config)
    tx = optimizers.make_optimizer(config, STEPS_PER_EPOCH)
    state = train_state_lib.create_train_state(config, model, tx, mesh, jax.random.PRNGKey(0))
    jax_step = steps.make_train_step(config, model, tx, mesh)
    grad_fn = jax.jit(jax.grad(steps.make_loss_fn(config, model), has_aux=True))
    params, batch_stats = jax.device_get((state.params, state.batch_stats))
    initial = as_torch_names(params)
    twin_step = twin_step_for(config, params, batch_stats)
    twin = twin_step.model
    counts = batchnorm_counts(twin)
    momentum = 1.0 - twin.settings["norm_momentum"]  # torch's weight of the new batch

    with jax.default_matmul_precision("highest"):
        for index, (images, labels) in enumerate(uint8_batches(3)):
            if index == 0:
                jax_grads, (jax_loss, _, _) = grad_fn(
                    state.params, state.batch_stats, images, labels, jax.random.PRNGKey(0), 1.0)
            stats_before = as_torch_names({}, jax.device_get(state.batch_stats))
            twin_before = {k: v.numpy().copy() for k, v in twin.state_dict().items()}
            state, metrics = jax_step(state, {"image": images, "label": labels})
            ours = twin_step(torch.from_numpy(images), torch.from_numpy(labels).long())
            metrics = jax.device_get(metrics)

            assert bool(metrics["finite"]) and bool(ours["finite"])
            np.testing.assert_allclose(float(ours["loss"]), metrics["loss"], rtol=1e-5)
            np.testing.assert_allclose(float(ours["grad_norm"]), metrics["grad_norm"], rtol=1e-4)
            assert float(ours["accuracy"]) == pytest.approx(float(metrics["accuracy"]))
            if index == 0:
                # The loss the JAX step differentiates, and its gradients at the start.
                np.testing.assert_allclose(float(ours["loss"]), float(jax_loss), rtol=1e-5)
                expected = as_torch_names(jax.device_get(jax_grads))
                scale = max(float(np.abs(g).max()) for g in expected.values())
                twin_grads = {n: p.grad.numpy() for n, p in twin.named_parameters()}
                assert_close_trees(twin_grads, expected, 2e-5 * scale, "gradient")

            params, batch_stats = jax.device_get((state.params, state.batch_stats))
            twin_state = {k: v.numpy() for k, v in twin.state_dict().items()
                          if not k.endswith("num_batches_tracked")}
            expected = as_torch_names(params, batch_stats)
            is_weight = lambda key: not key.endswith(("running_mean", "running_var"))  # noqa: E731
            weights = {k: v for k, v in twin_state.items() if is_weight(k)}
            assert_close_trees(weights, {k: v for k, v in expected.items() if is_weight(k)},
                               1e-5, f"step {index} params")
            for name, n in counts.items():
                mean_key, var_key = f"{name}.running_mean", f"{name}.running_var"
                np.testing.assert_allclose(twin_state[mean_key], expected[mean_key], atol=1e-5)
                # torch averages the unbiased batch variance, Flax the biased one.
                torch_added = twin_state[var_key] - (1 - momentum) * twin_before[var_key]
                flax_added = expected[var_key] - (1 - momentum) * stats_before[var_key]
                np.testing.assert_allclose(torch_added * (n - 1) / n, flax_added, atol=1e-5,
                                           err_msg=var_key)

    # The comparison had something to compare: three updates moved every kind of weight.
    assert max_difference(weights, initial) > 1e-2
    assert int(twin_step.count) == 3


@pytest.mark.parametrize("changes", [
    {"grad_clip_norm": 1.0},  # Below the gradient norm (about 4): clips.
    {"grad_clip_norm": 100.0},  # Above it: leaves the gradients alone.
    {"optimizer.nesterov": False},
    {"optimizer.momentum": 0.0, "optimizer.weight_decay": 0.0},
])
def test_update_variants_match_the_jax_optimizer(changes):
    """The twin's update against `optimizers.make_optimizer`'s on the twin's own
    gradients (optax works on any tree, here the twin's tensors by name)."""
    config = recipe_config(**changes)
    twin_step = twin_step_for(config)
    named = dict(twin_step.model.named_parameters())
    params = {n: p.detach().numpy().copy() for n, p in named.items()}
    tx = optimizers.make_optimizer(config, STEPS_PER_EPOCH)
    opt_state = tx.init(params)

    @jax.jit
    def jax_update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    norms = []
    for images, labels in uint8_batches(3):
        metrics = twin_step(torch.from_numpy(images), torch.from_numpy(labels).long())
        norms.append(float(metrics["grad_norm"]))
        grads = {n: p.grad.numpy() for n, p in named.items()}
        params, opt_state = jax.device_get(jax_update(grads, opt_state, params))
        ours = {n: p.detach().numpy() for n, p in named.items()}
        assert_close_trees(ours, params, 2e-6, str(changes))
    assert int(twin_step.count) == 3
    if changes.get("grad_clip_norm") == 1.0:
        assert min(norms) > 1.0  # Clipping was active.
    elif changes.get("grad_clip_norm") == 100.0:
        assert max(norms) < 100.0


def test_schedule_is_optax_warmup_cosine():
    for changes in ({}, {"optimizer.warmup_epochs": 0}, {"optimizer.end_learning_rate": 0.01},
                    {"optimizer.warmup_epochs": 7}):  # warm-up longer than the run
        config = recipe_config(**changes)
        recipe = torch_train_step.recipe_from_config(config, STEPS_PER_EPOCH)
        schedule = optimizers.make_schedule(config, STEPS_PER_EPOCH)
        counts = np.arange(0, 14)
        ours = torch_train_step.learning_rate(recipe, torch.from_numpy(counts)).numpy()
        np.testing.assert_allclose(ours, [float(schedule(c)) for c in counts], rtol=1e-6,
                                   atol=1e-9, err_msg=str(changes))


@pytest.mark.parametrize("changes,message", [
    ({"optimizer.name": "adamw"}, "config.optimizer.name='adamw': the twin implements SGD only"),
    ({"grad_accum_steps": 2}, "config.grad_accum_steps=2"),
    ({"ema_decay": 0.999}, "config.ema_decay=0.999: the twin keeps no EMA"),
    ({"class_weights": "balanced"}, "config.class_weights='balanced': the twin's loss weighs every"),
])
def test_work_the_twin_does_not_do_is_refused(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        torch_train_step.recipe_from_config(recipe_config(**changes))


def test_a_nonfinite_step_changes_nothing():
    config = recipe_config()
    twin_step = twin_step_for(config)
    (images, labels), (more_images, more_labels) = [
        (torch.from_numpy(i), torch.from_numpy(l).long()) for i, l in uint8_batches(2)]
    twin_step(images, labels)
    twin_step(images, labels)  # The warm-up's second step: momentum and weights now move.
    with torch.no_grad():
        twin_step.model.stem_0[0].weight[0, 0, 0, 0] = float("nan")  # BatchNorm statistics go NaN.
    before = copy.deepcopy((twin_step.model.state_dict(), twin_step.momentum, twin_step.count))
    metrics = twin_step(more_images, more_labels)
    assert not bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
    after = (twin_step.model.state_dict(), twin_step.momentum, twin_step.count)
    torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)
    assert any(float(m.abs().max()) > 0 for m in twin_step.momentum)


def test_kept_steps_equal_torch_optim_sgd_with_decay_on_kernels_only():
    """The update is what a PyTorch user writes with `torch.optim.SGD(weight_decay=...)`
    and two parameter groups: coupled L2 on kernels, none on biases and BatchNorm."""
    config = recipe_config()
    ours = twin_step_for(config)
    reference = copy.deepcopy(ours.model)
    recipe = ours.recipe
    kernels = [p for p in reference.parameters() if p.ndim > 1]
    others = [p for p in reference.parameters() if p.ndim <= 1]
    sgd = torch.optim.SGD([{"params": kernels, "weight_decay": recipe.weight_decay},
                           {"params": others, "weight_decay": 0.0}],
                          lr=0.0, momentum=recipe.momentum, nesterov=recipe.nesterov)
    for count, (images, labels) in enumerate(uint8_batches(3)):
        images, labels = torch.from_numpy(images), torch.from_numpy(labels).long()
        ours(images, labels)
        for group in sgd.param_groups:
            group["lr"] = float(torch_train_step.learning_rate(recipe, torch.tensor(count)))
        sgd.zero_grad()
        logits = reference(torch_train_step.normalize_images(images, ours.mean, ours.stddev))
        F.cross_entropy(logits, labels, label_smoothing=recipe.label_smoothing).backward()
        sgd.step()
    torch.testing.assert_close(ours.model.state_dict(), reference.state_dict(),
                               rtol=0, atol=1e-6)


def test_compiled_step_equals_the_eager_step():
    """`torch.compile` of the whole step (AOTAutograd, without inductor's C++ build on
    the CPU) mutates the same state as the eager step it compiles."""
    config = recipe_config()
    eager = twin_step_for(config)
    compiled = copy.deepcopy(eager)
    run = torch.compile(compiled.__call__, backend="aot_eager")
    for images, labels in uint8_batches(3):
        images, labels = torch.from_numpy(images), torch.from_numpy(labels).long()
        expected, actual = eager(images, labels), run(images, labels)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.model.state_dict(), eager.model.state_dict(),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.momentum, eager.momentum, rtol=1e-5, atol=1e-6)
    assert int(compiled.count) == 3
