"""Model options that change speed only: same function, same gradient, same parameters.

`max_pool_backward="gather"` replaces XLA's select-and-scatter in the max-pool
gradient; `fuse_pointwise=True` runs MSP-Conv's 1x1 convolutions on the block input as
one. Whether either is faster is a GPU question (benchmarks/speed_experiments.py); what
a CPU can check, and these tests do, is that switching them changes nothing else.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msff_jax.models import TINY_OVERRIDES, get_model
from msff_jax.models.max_pool import max_pool_3x3


def _pool_and_grad(x, g, strides, backward):
    y, vjp = jax.vjp(lambda x: max_pool_3x3(x, strides, backward), x)
    return y, vjp(g)[0]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("height, width", [(7, 7), (8, 6), (5, 9), (1, 1), (2, 3)])
def test_gather_max_pool_routes_gradients_exactly_as_select_and_scatter(
    dtype, strides, height, width
):
    rng = np.random.default_rng(100 * height + 10 * width + strides)
    x = rng.normal(size=(2, height, width, 3))
    # Ties, as after a ReLU, and repeated values: both backwards must pick the same
    # (first, row-major) maximum of each window.
    x = np.where(rng.random(x.shape) < 0.4, 0.0, np.round(2 * x) / 2)
    out_shape = (2, (height - 1) // strides + 1, (width - 1) // strides + 1, 3)
    # Small integers: every sum of routed gradients is exact in both dtypes, so any
    # difference would be a gradient sent to a different input.
    g = rng.integers(-8, 8, size=out_shape)
    x, g = jnp.asarray(x, dtype), jnp.asarray(g, dtype)

    y_scatter, grad_scatter = _pool_and_grad(x, g, strides, "scatter")
    y_gather, grad_gather = _pool_and_grad(x, g, strides, "gather")

    assert y_gather.shape == out_shape and y_gather.dtype == dtype
    assert grad_gather.shape == x.shape and grad_gather.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y_gather, np.float32), np.asarray(y_scatter, np.float32))
    np.testing.assert_array_equal(
        np.asarray(grad_gather, np.float32), np.asarray(grad_scatter, np.float32)
    )
    # A gradient that cannot vanish: every output sends its gradient somewhere.
    assert float(jnp.sum(grad_gather.astype(jnp.float32))) == pytest.approx(
        float(jnp.sum(g.astype(jnp.float32)))
    )


def test_gather_max_pool_matches_on_random_gradients_and_under_jit():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 12, 10, 5)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(3, 6, 5, 5)), jnp.float32)
    scatter = jax.jit(lambda x, g: _pool_and_grad(x, g, 2, "scatter"))(x, g)
    gather = jax.jit(lambda x, g: _pool_and_grad(x, g, 2, "gather"))(x, g)
    np.testing.assert_array_equal(gather[0], scatter[0])
    np.testing.assert_allclose(gather[1], scatter[1], rtol=1e-6, atol=1e-6)


def test_gather_max_pool_under_vmap_and_remat():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 3, 9, 9, 4)), jnp.float32)  # A vmapped batch axis.

    def loss(x, backward):
        pool = jax.checkpoint(lambda x: max_pool_3x3(x, 2, backward))
        return jnp.sum(jax.vmap(pool)(x) ** 2)

    np.testing.assert_allclose(
        jax.grad(loss)(x, "gather"), jax.grad(loss)(x, "scatter"), rtol=1e-6, atol=1e-6
    )


def test_defaults_are_the_gather_backward_and_separate_convolutions():
    model = get_model("msff_ecomnet", 15)
    assert (model.max_pool_backward, model.fuse_pointwise) == ("gather", False)
    assert get_model("resnet50", 15).max_pool_backward == "gather"


def test_unknown_max_pool_backward_is_refused():
    with pytest.raises(ValueError, match="must be one of \\('scatter', 'gather'\\); got 'fast'"):
        max_pool_3x3(jnp.zeros((1, 4, 4, 1)), 1, "fast")
    model = get_model("msff_ecomnet", 3, **TINY_OVERRIDES["msff_ecomnet"], max_pool_backward="fast")
    with pytest.raises(ValueError, match="max_pool_backward must be one of"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def train_forward_and_grads(model, variables, images, dropout_seed=1):
    """Train-mode logits, updated BatchNorm statistics and parameter gradients (of the sum
    of squared logits): what a speed option must leave alone (also used by
    tests/test_aligned_channels.py)."""

    def loss(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(dropout_seed)},
        )
        return jnp.sum(logits**2), (logits, updates["batch_stats"])

    # Compiled: op by op, a model's forward and backward cost ten times longer here.
    (_, (logits, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables["params"])
    return logits, stats, grads


def _largest_relative_difference(a, b):
    def relative(x, y):
        return float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(x)) + 1e-12))

    return max(jax.tree.leaves(jax.tree.map(relative, a, b)))


@pytest.mark.parametrize(
    "name, reference, options",
    [
        ("msff_ecomnet", {"max_pool_backward": "scatter"}, {"max_pool_backward": "gather"}),
        ("msff_ecomnet", {"fuse_pointwise": False}, {"fuse_pointwise": True}),
        ("msff_ecomnet", {"max_pool_backward": "scatter", "fuse_pointwise": False},
         {"max_pool_backward": "gather", "fuse_pointwise": True}),
        ("msff_msp", {"fuse_pointwise": False}, {"fuse_pointwise": True}),
        ("resnet50", {"max_pool_backward": "scatter"}, {"max_pool_backward": "gather"}),
        # The old form the GPU probe measures the new one against (batch_norm_backward's
        # two forms are compared in float64 by tests/test_batch_norm.py).
        ("msff_ecomnet", {"iasm_spatial": "cudnn"}, {"iasm_spatial": "shifted"}),
    ],
)
def test_speed_options_keep_parameters_outputs_statistics_and_gradients(name, reference, options):
    """Tiny presets: two MSFF stages, so both the plain and the strided MSP-Conv (where
    `branch_1x1` strides and stays out of the fused convolution) are covered."""
    images = jnp.asarray(
        np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3)), jnp.float32
    )
    plain = get_model(name, 15, **TINY_OVERRIDES[name], **reference)
    fast = get_model(name, 15, **TINY_OVERRIDES[name], **options)
    plain_vars = plain.init(jax.random.key(0), images)
    fast_vars = fast.init(jax.random.key(0), images)

    # The same tree and the same initial values: checkpoints and torch weights load
    # into either.
    assert jax.tree.structure(fast_vars) == jax.tree.structure(plain_vars)
    jax.tree.map(np.testing.assert_array_equal, fast_vars, plain_vars)

    plain_logits, plain_stats, plain_grads = train_forward_and_grads(plain, plain_vars, images)
    fast_logits, fast_stats, fast_grads = train_forward_and_grads(fast, plain_vars, images)
    np.testing.assert_allclose(fast_logits, plain_logits, rtol=1e-5, atol=1e-5)
    assert _largest_relative_difference(plain_stats, fast_stats) < 1e-5
    assert _largest_relative_difference(plain_grads, fast_grads) < 1e-4
    # Eval mode too: the inference path uses the same modules.
    np.testing.assert_allclose(
        fast.apply(plain_vars, images), plain.apply(plain_vars, images), rtol=1e-5, atol=1e-5
    )
