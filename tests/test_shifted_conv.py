"""`shifted_conv` is `lax.conv_general_dilated` (stride 1, same size, odd kernels) in
value and in both gradients, and `ShiftedConv` is `nn.Conv`'s parameter (`models/
shifted_conv.py`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from msff_jax.models.shifted_conv import ShiftedConv, shifted_conv


def _conv(x, kernel):
    rows, cols = (kernel.shape[0] - 1) // 2, (kernel.shape[1] - 1) // 2
    return lax.conv_general_dilated(
        x, kernel, (1, 1), ((rows, rows), (cols, cols)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST,
    )


def _value_and_grads(fn, x, kernel, cotangent):
    out, vjp = jax.vjp(fn, x, kernel)
    return (out, *vjp(cotangent))


@pytest.mark.parametrize(
    "in_channels, out_channels, kernel_size",
    [(2, 1, (7, 7)), (3, 2, (3, 5)), (1, 1, (1, 1))],
    ids=["iasm_2to1_7x7", "3to2_3x5", "1x1"],
)
def test_equals_lax_convolution_with_both_gradients(in_channels, out_channels, kernel_size):
    rng = np.random.default_rng(0)
    # Smaller than the kernel along one axis: taps that see only padding must count 0.
    x = jnp.asarray(rng.normal(size=(2, 9, 4, in_channels)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(*kernel_size, in_channels, out_channels)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(2, 9, 4, out_channels)), jnp.float32)
    ours = jax.jit(lambda *a: _value_and_grads(shifted_conv, *a))(x, kernel, cotangent)
    reference = _value_and_grads(_conv, x, kernel, cotangent)
    for name, a, b in zip(("output", "input gradient", "kernel gradient"), ours, reference):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def test_bfloat16_results_and_gradients_keep_their_dtypes():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 2)), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=(7, 7, 2, 1)), jnp.bfloat16)
    cotangent = jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.bfloat16)
    ours = _value_and_grads(shifted_conv, x, kernel, cotangent)
    exact = _value_and_grads(_conv, *(a.astype(jnp.float32) for a in (x, kernel, cotangent)))
    for a, b in zip(ours, exact):
        assert a.dtype == jnp.bfloat16
        # float32 arithmetic, one rounding to bfloat16 (8 significant bits) at the end.
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=2**-8, atol=1e-6)


def test_module_has_nn_conv_parameter_and_function():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 10, 10, 2)), jnp.float32)
    conv = nn.Conv(1, (7, 7), padding=((3, 3), (3, 3)), use_bias=False)
    shifted = ShiftedConv(1, (7, 7))
    key = jax.random.key(3)
    ours, theirs = shifted.init(key, x), conv.init(key, x)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    np.testing.assert_array_equal(ours["params"]["kernel"], theirs["params"]["kernel"])
    np.testing.assert_allclose(shifted.apply(ours, x), conv.apply(theirs, x), rtol=1e-5, atol=1e-5)
    # dtype as nn.Conv takes it: computation in `dtype`, parameter in `param_dtype`.
    half = ShiftedConv(1, (7, 7), dtype=jnp.bfloat16)
    assert half.apply(ours, x).dtype == jnp.bfloat16
    assert half.init(key, x)["params"]["kernel"].dtype == jnp.float32


@pytest.mark.parametrize(
    "x_shape, kernel_shape, error",
    [
        ((2, 8, 8, 2), (6, 6, 2, 1), "odd kernel sizes; got 6x6"),
        ((2, 8, 8, 3), (7, 7, 2, 1), "kernel (kh, kw, in, out)"),
        ((8, 8, 2), (7, 7, 2, 1), "x (batch, h, w, in)"),
    ],
)
def test_shapes_it_cannot_compute_are_refused(x_shape, kernel_shape, error):
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace(")", r"\)")):
        shifted_conv(jnp.zeros(x_shape), jnp.zeros(kernel_shape))
    with pytest.raises(TypeError, match="floating-point"):
        shifted_conv(jnp.zeros((2, 8, 8, 2), jnp.int32), jnp.zeros((3, 3, 2, 1)))
