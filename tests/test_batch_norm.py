"""BatchNorm with its two-pass backward is flax's BatchNorm: the same forward, statistics
and parameter tree, gradients equal within float tolerance (alone, followed by ReLU, in
a whole model and over a sharded batch)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from msff_jax.models import get_model, TINY_OVERRIDES
from msff_jax.models import batch_norm
from msff_jax.models.batch_norm import AutodiffBatchNorm, BatchNorm


class FlaxBatchNorm(nn.BatchNorm):
    """flax's BatchNorm (autodiff backward), plus the residual and the ReLU: the reference."""

    relu: bool = False

    def __call__(self, x, use_running_average=None, *, residual=None):
        y = super().__call__(x, use_running_average)
        if residual is not None:
            y = y + residual
        return nn.relu(y) if self.relu else y


def _apply(module, variables, x, residual=None):
    def loss(params, x, residual):
        y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                  residual=residual, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(3 * y.astype(jnp.float32))), (y, updates)

    argnums = (0, 1) if residual is None else (0, 1, 2)
    (value, (y, updates)), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(
        variables["params"], x, residual)
    return y, updates, grads


def _relative(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12))


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("relu, with_residual", [(False, False), (True, False), (True, True),
                                                 (False, True)])
def test_same_forward_statistics_and_gradients_as_flax(dtype, tolerance, relu, with_residual):
    x = (jax.random.normal(jax.random.PRNGKey(1), (8, 5, 5, 12)) * 2 + 0.3).astype(dtype)
    residual = None
    if with_residual:
        residual = jax.random.normal(jax.random.PRNGKey(5), x.shape).astype(dtype)
    kwargs = dict(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype, relu=relu)
    reference, ours = FlaxBatchNorm(**kwargs), BatchNorm(**kwargs)
    variables = reference.init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(variables) == jax.tree.structure(ours.init(jax.random.PRNGKey(0), x))
    variables = {"params": {"scale": jnp.linspace(0.5, 1.5, 12), "bias": jnp.linspace(-0.2, 0.3, 12)},
                 "batch_stats": {"mean": jnp.full(12, 0.1), "var": jnp.full(12, 2.0)}}
    y_ref, stats_ref, grads_ref = _apply(reference, variables, x, residual)
    y, stats, grads = _apply(ours, variables, x, residual)
    assert y.dtype == y_ref.dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    for a, b in zip(jax.tree.leaves(stats_ref), jax.tree.leaves(stats)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(grads_ref), jax.tree.leaves(grads)):
        assert _relative(a, b) <= tolerance


def test_evaluation_uses_the_running_statistics():
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 3, 3, 6))
    variables = {"params": {"scale": jnp.arange(1.0, 7.0), "bias": jnp.ones(6)},
                 "batch_stats": {"mean": jnp.full(6, 0.5), "var": jnp.full(6, 4.0)}}
    for relu in (False, True):
        expected = FlaxBatchNorm(use_running_average=True, relu=relu).apply(variables, x)
        got = BatchNorm(use_running_average=True, relu=relu).apply(variables, x)
        np.testing.assert_array_equal(got, expected)


def test_sharded_batch_statistics_are_global():
    """Eight devices, each with its slice of the batch: the statistics and gradients of the
    whole batch, as on one device."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    x = jax.random.normal(jax.random.PRNGKey(3), (16, 4, 4, 8)) + jnp.arange(16.0)[:, None, None, None]
    module = BatchNorm(use_running_average=False, momentum=0.9, relu=True)
    variables = module.init(jax.random.PRNGKey(0), x)
    one = _apply(module, variables, x)
    sharded = jax.jit(functools.partial(_apply, module))(
        variables, jax.device_put(x, NamedSharding(mesh, P("data"))))
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(sharded)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


@pytest.fixture
def float64():
    """Double precision for one test: the same function must agree to rounding of 1e-16,
    where float32 BatchNorm over a tiny batch amplifies summation order to 1e-4."""
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("name", ["msff_ecomnet", "resnet50", "mobilenet_v3_large"])
def test_whole_models_match_flax_batch_norm(name, monkeypatch, float64):
    """Every model builds its BatchNorm through `layers.conv_and_norm`: with flax's in its
    place the parameter tree is the same and so are the loss, the statistics and every
    gradient (in float64, so that only the arithmetic is compared)."""
    model = get_model(name, 5, dtype=jnp.float64, param_dtype=jnp.float64, **TINY_OVERRIDES[name])
    images = jax.random.normal(jax.random.PRNGKey(4), (4, 32, 32, 3), jnp.float64)
    labels = jnp.arange(4) % 5

    def loss_and_grads(variables):
        def loss(params):
            logits, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                          images, train=True, mutable=["batch_stats"],
                                          rngs={"dropout": jax.random.PRNGKey(0)})
            onehot = jax.nn.one_hot(labels, 5)
            return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), updates

        return jax.value_and_grad(loss, has_aux=True)(variables["params"])

    variables = model.init(jax.random.PRNGKey(0), images, train=False)
    (loss, stats), grads = jax.jit(loss_and_grads)(variables)
    monkeypatch.setitem(batch_norm.BACKWARDS, "two_pass", FlaxBatchNorm)
    reference_variables = model.init(jax.random.PRNGKey(0), images, train=False)
    assert jax.tree.structure(reference_variables) == jax.tree.structure(variables)
    (loss_ref, stats_ref), grads_ref = jax.jit(loss_and_grads)(variables)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(stats_ref), jax.tree.leaves(stats)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    largest = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_ref))
    for a, b in zip(jax.tree.leaves(grads_ref), jax.tree.leaves(grads)):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12 * largest)


def test_autodiff_option_is_flax_batch_norm():
    """`batch_norm_backward='autodiff'` (the speed option the GPU probe measures against)
    is flax's BatchNorm: the same outputs and gradients as the test's own reference."""
    x = jax.random.normal(jax.random.PRNGKey(6), (4, 3, 3, 6))
    residual = jax.random.normal(jax.random.PRNGKey(7), x.shape)
    kwargs = dict(use_running_average=False, relu=True)
    variables = FlaxBatchNorm(**kwargs).init(jax.random.PRNGKey(0), x)
    expected = _apply(FlaxBatchNorm(**kwargs), variables, x, residual)
    got = _apply(AutodiffBatchNorm(**kwargs), variables, x, residual)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)
    model = get_model("resnet50", 5, batch_norm_backward="autodiff", **TINY_OVERRIDES["resnet50"])
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="batch_norm_backward"):
        get_model("resnet50", 5, batch_norm_backward="fast", **TINY_OVERRIDES["resnet50"]).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
