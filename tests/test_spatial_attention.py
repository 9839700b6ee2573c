"""IASM's spatial attention in its compiled form: the mean and max maps from one
reduction that also counts the maxima's ties, and the 7x7 2->1 convolution as shifted
multiply-adds (`models/attention.py`, `models/exact_max.py`, `models/shifted_conv.py`).

The modules must equal the formulation they replace, an `nn.Conv` over the concatenated
`jnp.mean` and `jnp.max` maps (the max differentiated in float32, the convention
`exact_max` keeps in every dtype), in value and gradient, in float32 and bfloat16, with
and without channel padding, with the same parameters; and compiled for an H100 they
must launch no cuDNN convolution and read the attended features once for both maps.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msff_jax.analysis.plan import hlo, kernels, programs, targets
from msff_jax.models.attention import ChannelAttentionMLP, ResidualAttention, SpatialAttention


class FormerSpatialAttention(nn.Module):
    """The formulation before: `nn.Conv` over `[mean, max]` of the real channels."""

    kernel_size: int = 7
    dtype: Any = jnp.float32
    true_channels: int | None = None

    @nn.compact
    def __call__(self, x):
        real = x[..., : self.true_channels or x.shape[-1]].astype(jnp.float32)
        pooled = jnp.concatenate(
            [jnp.mean(real, -1, keepdims=True), jnp.max(real, -1, keepdims=True)], -1
        ).astype(x.dtype)
        pad = (self.kernel_size - 1) // 2
        logits = nn.Conv(1, (self.kernel_size,) * 2, padding=((pad, pad), (pad, pad)),
                         use_bias=False, dtype=self.dtype, name="conv")(pooled)
        return nn.sigmoid(logits)


def _former_residual_attention(params, features, dtype, true_channels):
    kinds = {"dtype": dtype, "true_channels": true_channels}
    channel = ChannelAttentionMLP(reduction=4, **kinds)
    weights = channel.apply({"params": params["channel"]}, features)
    refined = weights * features
    spatial = FormerSpatialAttention(**kinds).apply({"params": params["spatial"]}, refined)
    return features + spatial * refined


def _features(dtype, true_channels, channels=16):
    """ReLU-like features with tied maxima (zero maps, repeated values); channels past
    `true_channels` are padding zeros."""
    rng = np.random.default_rng(0)
    x = np.maximum(np.round(2 * rng.normal(size=(2, 12, 10, channels))) / 2, 0.0)
    x[0, :3] = 0.0  # Every channel tied at 0 over these pixels.
    if true_channels:
        x[..., true_channels:] = 0.0
    return jnp.asarray(x, dtype)


def _value_and_grads(apply, params, features, cotangent):
    out, vjp = jax.vjp(apply, params, features)
    return out, *vjp(cotangent.astype(out.dtype))


def _assert_close(ours, former, tolerance, what):
    """Each leaf within `tolerance` of the former's largest magnitude."""
    assert jax.tree.structure(ours) == jax.tree.structure(former), what
    for path, a in jax.tree_util.tree_leaves_with_path(ours):
        b = dict(jax.tree_util.tree_leaves_with_path(former))[path]
        assert a.shape == b.shape and a.dtype == b.dtype, (what, path)
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = max(float(np.max(np.abs(b))), 1e-30)
        error = float(np.max(np.abs(a - b)))
        assert error <= tolerance * scale, (what, path, error, scale)


# float32: summation order only. bfloat16: the forward rounds the same values the same
# way but for the logits (float32 taps against cuDNN's accumulation), and a logit one
# bfloat16 step off moves every gradient behind it by about that step.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2**-6}


@pytest.mark.parametrize("true_channels", [None, 11], ids=["all_channels", "padded"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_spatial_attention_equals_the_former_formulation(dtype, true_channels):
    features = _features(dtype, true_channels)
    ours_module = SpatialAttention(dtype=dtype, true_channels=true_channels)
    former_module = FormerSpatialAttention(dtype=dtype, true_channels=true_channels)
    key = jax.random.key(1)
    params = ours_module.init(key, features)["params"]
    former_params = former_module.init(key, features)["params"]
    # Same parameter tree and initial values: checkpoints and converted weights load.
    assert jax.tree.structure(params) == jax.tree.structure(former_params)
    np.testing.assert_array_equal(params["conv"]["kernel"], former_params["conv"]["kernel"])
    assert params["conv"]["kernel"].shape == (7, 7, 2, 1)

    cotangent = jnp.asarray(np.random.default_rng(2).normal(size=features.shape[:3] + (1,)))
    ours = jax.jit(lambda p, f: _value_and_grads(
        lambda p, f: ours_module.apply({"params": p}, f), p, f, cotangent))(params, features)
    former = jax.jit(lambda p, f: _value_and_grads(
        lambda p, f: former_module.apply({"params": p}, f), p, f, cotangent))(params, features)
    _assert_close(ours, former, TOLERANCE[dtype], "spatial attention")
    if true_channels:
        np.testing.assert_array_equal(np.asarray(ours[2][..., true_channels:], np.float32), 0.0)


@pytest.mark.parametrize("true_channels", [None, 11], ids=["all_channels", "padded"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_residual_attention_equals_the_former_formulation(dtype, true_channels):
    features = _features(dtype, true_channels)
    module = ResidualAttention(reduction=4, dtype=dtype, true_channels=true_channels)
    params = module.init(jax.random.key(3), features)["params"]
    cotangent = jnp.asarray(np.random.default_rng(4).normal(size=features.shape))
    ours = jax.jit(lambda p, f: _value_and_grads(
        lambda p, f: module.apply({"params": p}, f), p, f, cotangent))(params, features)
    former = jax.jit(lambda p, f: _value_and_grads(
        lambda p, f: _former_residual_attention(p, f, dtype, true_channels), p, f, cotangent
    ))(params, features)
    _assert_close(ours, former, TOLERANCE[dtype], "residual attention")
    if true_channels:  # The padding stays zero; only the residual's identity reaches it.
        np.testing.assert_array_equal(np.asarray(ours[0][..., true_channels:], np.float32), 0.0)
        np.testing.assert_array_equal(ours[2][..., true_channels:],
                                      cotangent.astype(dtype)[..., true_channels:])


def test_h100_plan_reads_the_features_once_and_calls_no_cudnn_convolution():
    """Compiled for an H100 (no GPU needed): the forward reads the attended features in
    one kernel, the mean and max maps' reduction (the former formulation read them in
    two, a max and a sum), and neither pass calls cuDNN (the former: forward, input
    and weight gradients on 1-2 channels)."""
    device = programs.compile_only_devices(targets.get_target("h100"), 1)[0]
    one = jax.sharding.SingleDeviceSharding(device)
    module = SpatialAttention(dtype=jnp.bfloat16)
    features = jax.ShapeDtypeStruct((4, 16, 16, 32), jnp.bfloat16, sharding=one)
    variables = jax.eval_shape(module.init, jax.random.key(0), features)
    variables = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=one),
                             variables)

    def train(variables, features):
        out, vjp = jax.vjp(module.apply, variables, features)
        return out, vjp(out)

    def launched(fn):
        text = jax.jit(fn).lower(variables, features).compile().as_text()
        return kernels.launched_kernels(hlo.parse_module(text))

    feature_bytes = 4 * 16 * 16 * 32 * 2
    forward = launched(module.apply)
    assert len([k for k in forward if k.bytes >= feature_bytes]) == 1, forward
    for kernel in forward + launched(train):
        assert not kernel.kind.startswith("cudnn"), kernel
