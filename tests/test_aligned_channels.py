"""`channel_alignment`: MSP-Conv and IASM on channel counts padded to a multiple, inside
the forward, with the true parameters. It must change nothing but speed: the same
parameter tree, logits, BatchNorm statistic updates and gradients as alignment 1.

A one-conv stem of 6 channels and stage widths (20, 44) give block inputs of 6 and 20
channels, branch widths 5 and 11 and block widths 20 and 44, none a multiple of 8, so
alignment 8 pads every block input, every branch and every IASM.
Parameters are random values poured into the model's tree (`jax.eval_shape` of `init`),
not an `init` run, to keep compilation to one program per model variant, compiled at
XLA's lowest backend optimisation level (the same level for the reference and the
aligned model) because compiling dominates these tests' time.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msff_jax.models import MODEL_NAMES, TINY_OVERRIDES, get_model
from tests.test_speed_options import train_forward_and_grads

WIDTHS = {"stem_widths": (6,), "stage_widths": (20, 44)}
IMAGES = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)


def _model(name, **options):
    return get_model(name, 15, **{**TINY_OVERRIDES[name], **WIDTHS, **options})


def _shapes(model):
    return jax.eval_shape(model.init, jax.random.key(0), IMAGES)


@functools.cache
def _variables(name, **options):
    """Random parameters and running statistics (positive variances) in the tree of
    `name` with `options` at alignment 1."""
    rng = np.random.default_rng(1)

    def fill(path, leaf):
        values = rng.normal(scale=0.5, size=leaf.shape)
        if path[-1].key == "var":
            values = rng.uniform(0.5, 2.0, size=leaf.shape)
        return jnp.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, _shapes(_model(name, **options)))


def _everything(model, variables):
    """Eval logits, train logits, updated statistics and parameter gradients."""
    train_logits, stats, grads = train_forward_and_grads(model, variables, IMAGES, dropout_seed=2)
    return model.apply(variables, IMAGES), train_logits, stats, grads


def _run(model, variables):
    compiled = jax.jit(functools.partial(_everything, model)).lower(variables).compile(
        {"xla_backend_optimization_level": 0}
    )
    return compiled(variables)


@functools.cache
def _reference(name, **options):
    return _run(_model(name, **options), _variables(name, **options))


def _largest_relative_difference(a, b):
    def relative(x, y):  # In numpy: no small XLA programs to compile per leaf shape.
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        return float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) + 1e-12))

    return max(jax.tree.leaves(jax.tree.map(relative, a, b)))


@pytest.mark.parametrize(
    "name, options, gradient_tolerance",
    [
        ("msff_ecomnet", {}, 1e-5),
        # The fused 1x1 convolutions of a plain and a strided block, padded; compared
        # with the unfused model, whose gradients fusion itself moves by float
        # summation order (tests/test_speed_options.py allows 1e-4).
        ("msff_ecomnet", {"fuse_pointwise": True}, 1e-4),
        # The single conv unit of the ablations, and ECA's descriptor.
        ("msff_iasm", {"channel_attention": "eca"}, 1e-5),
    ],
)
def test_alignment_keeps_parameters_outputs_statistics_and_gradients(
    name, options, gradient_tolerance
):
    aligned = _model(name, channel_alignment=8, **options)
    reference_options = {k: v for k, v in options.items() if k != "fuse_pointwise"}

    # The same tree, names and shapes: checkpoints load under any alignment.
    assert _shapes(aligned) == _shapes(_model(name, **reference_options))

    variables = _variables(name, **reference_options)
    expected = _reference(name, **reference_options)
    eval_logits, train_logits, stats, grads = _run(aligned, variables)

    np.testing.assert_allclose(eval_logits, expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(train_logits, expected[1], rtol=1e-5, atol=1e-5)
    assert jax.tree.structure(stats) == jax.tree.structure(expected[2])
    assert _largest_relative_difference(expected[2], stats) < 1e-5
    assert jax.tree.structure(grads) == jax.tree.structure(expected[3])
    assert _largest_relative_difference(expected[3], grads) < gradient_tolerance


def test_registry_accepts_channel_alignment_for_every_msff_model():
    names = [n for n in MODEL_NAMES if n.startswith("msff_")]
    assert names
    for name in names:
        assert get_model(name, 15, channel_alignment=8).channel_alignment == 8
    assert get_model("msff_ecomnet", 15).channel_alignment == 1


@pytest.mark.parametrize("alignment", [0, -8, 2.0, True])
def test_bad_alignment_is_refused(alignment):
    model = _model("msff_ecomnet", channel_alignment=alignment)
    with pytest.raises(ValueError, match="channel_alignment must be a positive int"):
        _shapes(model)
