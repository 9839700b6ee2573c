"""IASM's max pooling differentiates exactly in any dtype (`models/exact_max.py`).

`jnp.max` counts tied maxima in the input dtype; in bfloat16 the count saturates, and
over a 56x56 map of equal values (an all-zero channel after a ReLU) the gradient of the
maximum sums to about 3 instead of 1. `exact_max` and `mean_and_max` split the cotangent
equally among the ties, as `jnp.max` does in float32, counting in int32.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from msff_jax.models.attention import ChannelAttentionMLP, ResidualAttention
from msff_jax.models.exact_max import exact_max, mean_and_max


def _f32(x):
    return np.asarray(jnp.asarray(x, jnp.float32))


@pytest.mark.parametrize(
    "shape, axis",
    [
        ((2, 56, 56, 3), (1, 2)),  # Channel attention: max over height and width.
        ((2, 2, 3, 56 * 56), -1),  # Spatial attention: max over channels.
    ],
    ids=["channel", "spatial"],
)
@pytest.mark.parametrize("value", [0.0, 1.5])
def test_pooling_gradient_over_bfloat16_ties_sums_to_one(shape, axis, value):
    x = jnp.full(shape, value, jnp.bfloat16)

    def descriptors(x):
        mean, maximum = mean_and_max(x, axis)
        return jnp.sum(mean.astype(jnp.float32)), jnp.sum(maximum.astype(jnp.float32))

    # One reduction at a time, so each gradient's total is known: 1 per reduction.
    from_mean = jax.grad(lambda x: descriptors(x)[0])(x)
    from_max = jax.grad(lambda x: descriptors(x)[1])(x)
    from_exact_max = jax.grad(lambda x: jnp.sum(exact_max(x, axis).astype(jnp.float32)))(x)
    reductions = x.size // (shape[-1] if axis == -1 else shape[1] * shape[2])
    for grad in (from_mean, from_max, from_exact_max):
        assert grad.dtype == jnp.bfloat16
        # Each share 1/n is rounded to bfloat16 (8 significant bits).
        np.testing.assert_allclose(_f32(grad).sum(axis=axis), 1.0, rtol=2**-8)
        assert float(_f32(grad).sum()) == pytest.approx(reductions, rel=2**-8)
        # Equal split: every tied entry gets the same share.
        assert np.unique(_f32(grad)).size == 1


def _inputs(seed, shape, ties):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    if ties:
        # A ReLU's zeros, whole zero maps and repeated values.
        x = np.maximum(np.round(2 * x) / 2, 0.0)
        x[:, :, :, 0] = 0.0
        x[0, 1, :, :] = 0.0
    return jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("axis", [(1, 2), -1, (0, 3)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_float32_values_and_gradients_are_jnp_max_and_mean(ties, axis, keepdims):
    x = _inputs(3, (2, 5, 4, 6), ties)
    reduced = jnp.max(x, axis=axis, keepdims=keepdims).shape
    rng = np.random.default_rng(4)
    g_mean, g_max = (jnp.asarray(rng.normal(size=reduced), jnp.float32) for _ in range(2))

    def ours(x):
        mean, maximum = mean_and_max(x, axis, keepdims=keepdims)
        alone = exact_max(x, axis, keepdims=keepdims)
        return jnp.sum(mean * g_mean) + jnp.sum(maximum * g_max) + jnp.sum(alone * g_mean)

    def plain(x):
        mean = jnp.mean(x, axis=axis, keepdims=keepdims)
        maximum = jnp.max(x, axis=axis, keepdims=keepdims)
        return jnp.sum(mean * g_mean) + jnp.sum(maximum * g_max) + jnp.sum(maximum * g_mean)

    mean, maximum = jax.jit(lambda x: mean_and_max(x, axis, keepdims=keepdims))(x)
    np.testing.assert_array_equal(maximum, jnp.max(x, axis=axis, keepdims=keepdims))
    np.testing.assert_array_equal(exact_max(x, axis, keepdims=keepdims), maximum)
    np.testing.assert_allclose(mean, jnp.mean(x, axis=axis, keepdims=keepdims), rtol=1e-6)
    np.testing.assert_allclose(
        jax.jit(jax.grad(ours))(x), jax.jit(jax.grad(plain))(x), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_valid_leaves_channel_padding_out_of_mean_max_and_gradient(dtype):
    # All real values negative: padding zeros would win an unmasked max.
    true = -jnp.abs(_inputs(5, (2, 3, 3, 5), ties=True)) - 0.5
    true = true.at[:, 0, 0, :].set(-1.0).astype(dtype)  # Ties among the real channels.
    for padding in (jnp.zeros, lambda s, d: jnp.full(s, 100.0, d)):
        padded = jnp.concatenate([true, padding((2, 3, 3, 3), dtype)], axis=-1)

        def loss(x, valid):
            mean, maximum = mean_and_max(x, -1, keepdims=True, valid=valid)
            return jnp.sum(mean.astype(jnp.float32) * 3.0 + maximum.astype(jnp.float32))

        np.testing.assert_array_equal(
            _f32(jnp.concatenate(mean_and_max(padded, -1, valid=5), axis=0)),
            _f32(jnp.concatenate(mean_and_max(true, -1), axis=0)),
        )
        grad_padded = jax.grad(loss)(padded, 5)
        np.testing.assert_array_equal(_f32(grad_padded[..., :5]), _f32(jax.grad(loss)(true, None)))
        np.testing.assert_array_equal(_f32(grad_padded[..., 5:]), 0.0)


def _attention_reference(params, features):
    """IASM (CBAM channel, then spatial attention, residual) with plain jnp.max/mean."""
    channel = params["channel"]

    def mlp(d):
        hidden = nn.relu(d @ channel["fc1"]["kernel"] + channel["fc1"]["bias"])
        return hidden @ channel["fc2"]["kernel"] + channel["fc2"]["bias"]

    weights = nn.sigmoid(
        mlp(jnp.mean(features, axis=(1, 2))) + mlp(jnp.max(features, axis=(1, 2)))
    )
    refined = weights[:, None, None, :] * features
    pooled = jnp.concatenate(
        [jnp.mean(refined, axis=-1, keepdims=True), jnp.max(refined, axis=-1, keepdims=True)],
        axis=-1,
    )
    logits = lax.conv_general_dilated(
        pooled,
        params["spatial"]["conv"]["kernel"],
        (1, 1),
        ((3, 3), (3, 3)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return features + nn.sigmoid(logits) * refined


def test_residual_attention_float32_is_unchanged():
    features = _inputs(6, (2, 9, 9, 32), ties=True)
    module = ResidualAttention()
    params = module.init(jax.random.key(0), features)["params"]
    cotangent = jnp.asarray(np.random.default_rng(7).normal(size=features.shape), jnp.float32)

    def through(apply):
        def outputs_and_gradients(params, features):
            outputs, vjp = jax.vjp(apply, params, features)
            return outputs, vjp(cotangent)

        return jax.jit(outputs_and_gradients)(params, features)

    ours = through(lambda p, f: module.apply({"params": p}, f))
    plain = through(_attention_reference)
    np.testing.assert_allclose(ours[0], plain[0], rtol=1e-6, atol=1e-6)
    assert jax.tree.structure(ours[1]) == jax.tree.structure(plain[1])
    for a, b in zip(jax.tree.leaves(ours[1]), jax.tree.leaves(plain[1])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(b))))


def test_bfloat16_channel_attention_differentiates_like_float32_over_ties():
    """The module, not just the function: in bfloat16 the gradient reaching a channel
    whose 56x56 map is all ties (zeros, or one constant) matches float32's."""
    rng = np.random.default_rng(8)
    x = np.maximum(rng.normal(size=(2, 56, 56, 16)), 0.0)
    x[..., :4] = 0.0
    x[..., 4:8] = 0.75
    x = jnp.asarray(x, jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(2, 1, 1, 16)), jnp.float32)
    params = ChannelAttentionMLP(reduction=4).init(jax.random.key(0), x)["params"]

    def input_grad(dtype):
        module = ChannelAttentionMLP(reduction=4, dtype=dtype)

        def loss(x):
            weights = module.apply({"params": params}, x.astype(dtype))
            return jnp.sum(weights.astype(jnp.float32) * cotangent)

        return _f32(jax.jit(jax.grad(loss))(x)).sum(axis=(1, 2))

    np.testing.assert_allclose(input_grad(jnp.bfloat16), input_grad(jnp.float32),
                               rtol=0.05, atol=0.02)
