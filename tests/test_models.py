"""Model contracts: shapes, parameter counts, ablation trees, BatchNorm, dtypes, sharding.

Full-size models are only traced (`jax.eval_shape`), never compiled; everything that
runs uses the tiny presets at 32 px, and each compiled function is shared through
module-scoped fixtures.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from msff_jax.models import MODEL_NAMES, TINY_OVERRIDES, get_model

NUM_CLASSES = 15
IMAGE_SIZE = 32
BATCH = 8
MSFF_NAMES = ("msff_base", "msff_msp", "msff_iasm", "msff_ecomnet")
BASELINE_PARAMS_AT_1000 = {
    "resnet50": 25_557_032,
    "mobilenet_v3_large": 5_483_032,
    "efficientnet_b0": 5_288_548,
}
PAPER_MSFF_PARAMS = 11.79e6


@pytest.fixture(scope="module", autouse=True)
def fast_cpu_compilation():
    """XLA's CPU compiler dominates these tests; its expensive passes are not under test."""
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)  # JAX's default


def key(seed):
    """RngBitGenerator keys: deterministic like threefry, far cheaper to compile on CPU."""
    return jax.random.key(seed, impl="rbg")


def abstract_variables(module, image_size=64):
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(
        lambda x: module.init(jax.random.key(0), x, train=False), images
    )


def num_params(variables):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))


def flat_shapes(variables):
    """{'params/stage1_block0/iasm/...': shape} over params and batch_stats."""
    flat = traverse_util.flatten_dict(
        {k: v for k, v in variables.items() if k in ("params", "batch_stats")}, sep="/"
    )
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def tiny_model(name, **overrides):
    return get_model(name, NUM_CLASSES, **{**TINY_OVERRIDES[name], **overrides})


def images(seed=0, batch=BATCH, size=IMAGE_SIZE):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name", sorted(BASELINE_PARAMS_AT_1000))
def test_baseline_parameter_counts_match_torchvision(name):
    variables = abstract_variables(get_model(name, 1000))
    assert num_params(variables) == BASELINE_PARAMS_AT_1000[name]


def test_msff_ecomnet_has_the_papers_parameter_count():
    count = num_params(abstract_variables(get_model("msff_ecomnet", NUM_CLASSES)))
    assert abs(count / PAPER_MSFF_PARAMS - 1) < 0.01, count


@pytest.fixture(scope="module")
def full_size_msff_shapes():
    return {
        name: flat_shapes(abstract_variables(get_model(name, NUM_CLASSES)))
        for name in MSFF_NAMES
    }


def without(shapes, module_name):
    return {p: s for p, s in shapes.items() if f"/{module_name}/" not in p}


def test_ablations_differ_from_the_full_model_only_in_the_dropped_modules(
    full_size_msff_shapes,
):
    full = full_size_msff_shapes["msff_ecomnet"]
    msp = full_size_msff_shapes["msff_msp"]
    iasm = full_size_msff_shapes["msff_iasm"]
    base = full_size_msff_shapes["msff_base"]
    num_blocks = sum(get_model("msff_ecomnet", NUM_CLASSES).stage_sizes)

    def blocks_with(shapes, module_name):
        return {p.split("/")[1] for p in shapes if f"/{module_name}/" in p}

    # The full model has both modules in every block, the ablations only what they keep.
    assert len(blocks_with(full, "msp_conv")) == num_blocks
    assert len(blocks_with(full, "iasm")) == num_blocks
    assert len(blocks_with(iasm, "conv_unit")) == num_blocks
    assert len(blocks_with(base, "conv_unit")) == num_blocks
    assert not blocks_with(msp, "iasm") and not blocks_with(base, "iasm")
    assert not blocks_with(iasm, "msp_conv") and not blocks_with(base, "msp_conv")

    # msff_msp: the full model minus IASM, nothing else.
    assert msp == without(full, "iasm")
    # msff_iasm: the full model with each MSP-Conv swapped for one 3x3 conv unit.
    assert without(iasm, "conv_unit") == without(full, "msp_conv")
    # msff_base: both dropped.
    assert without(base, "conv_unit") == without(without(full, "msp_conv"), "iasm")
    # The swapped-in conv unit has the width of the four concatenated branches.
    branch_outputs = ("branch_1x1", "branch_3x3", "branch_5x5_b", "branch_pool")
    for block in blocks_with(full, "msp_conv"):
        msp_width = sum(
            full[f"params/{block}/msp_conv/{branch}/0/kernel"][-1] for branch in branch_outputs
        )
        assert iasm[f"params/{block}/conv_unit/0/kernel"][-1] == msp_width


# ---------------------------------------------------------------- tiny models, compiled


@functools.lru_cache(maxsize=None)
def jitted_init(name, **overrides):
    return jax.jit(functools.partial(tiny_model(name, **overrides).init, train=False))


@pytest.fixture(scope="module")
def tiny_variables():
    """Initialised variables of every tiny model."""
    return {name: jitted_init(name)(key(0), images()) for name in MODEL_NAMES}


@functools.lru_cache(maxsize=None)
def eval_and_train(name):
    """One compiled function per model: an eval forward and a training forward/backward.

    Compilation dominates on CPU, so everything the tests need from a model is
    computed by this single jitted function.
    """
    module = tiny_model(name)

    def loss_fn(params, batch_stats, x, key):
        logits, updates = module.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": key},
        )
        loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])
        return loss, (logits, updates["batch_stats"])

    def run(variables, x, key):
        eval_logits, eval_state = module.apply(
            variables, x, train=False, mutable=["intermediates", "batch_stats"]
        )
        grads, (train_logits, train_stats) = jax.grad(loss_fn, has_aux=True)(
            variables["params"], variables["batch_stats"], x, key
        )
        return {
            "eval_logits": eval_logits,
            "intermediates": eval_state["intermediates"],
            "eval_stats": eval_state["batch_stats"],
            "grads": grads,
            "train_logits": train_logits,
            "train_stats": train_stats,
        }

    return jax.jit(run)


@pytest.fixture(scope="module")
def tiny_runs(tiny_variables):
    return {
        name: eval_and_train(name)(tiny_variables[name], images(1), key(2))
        for name in MODEL_NAMES
    }


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape_dtype_and_sown_intermediates(name, tiny_runs):
    logits = tiny_runs[name]["eval_logits"]
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()

    inter = tiny_runs[name]["intermediates"]
    (features,) = inter["features"]
    assert features.ndim == 4 and features.shape[0] == BATCH

    maps = [
        leaf
        for path, leaf in traverse_util.flatten_dict(inter, sep="/").items()
        if "spatial_attention" in path
    ]
    if name in ("msff_iasm", "msff_ecomnet"):
        blocks = sum(tiny_model(name).stage_sizes)
        assert len(maps) == blocks
        for (spatial_map,) in maps:
            assert spatial_map.shape[0] == BATCH and spatial_map.shape[-1] == 1
            assert spatial_map.ndim == 4
            assert float(spatial_map.min()) >= 0 and float(spatial_map.max()) <= 1
    else:
        assert maps == []


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_training_step_updates_batch_norm_statistics(name, tiny_variables, tiny_runs):
    run = tiny_runs[name]
    grads = jax.tree_util.tree_leaves(run["grads"])
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    assert any(float(jnp.abs(g).max()) > 0 for g in grads)

    old = jax.tree_util.tree_leaves(tiny_variables[name]["batch_stats"])
    new = jax.tree_util.tree_leaves(run["train_stats"])
    assert len(old) == len(new) > 0
    assert all(not np.array_equal(o, n) for o, n in zip(old, new))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_eval_mode_leaves_batch_norm_statistics_fixed(name, tiny_variables, tiny_runs):
    jax.tree_util.tree_map(
        np.testing.assert_array_equal,
        tiny_runs[name]["eval_stats"],
        tiny_variables[name]["batch_stats"],
    )


@pytest.mark.parametrize("name", sorted(set(MODEL_NAMES) - {"resnet50"}))
def test_dropout_and_stochastic_depth_use_the_dropout_rng(name, tiny_variables, tiny_runs):
    # (torchvision's ResNet-50 has neither.)
    def train_logits(seed):
        run = eval_and_train(name)(tiny_variables[name], images(1), key(seed))
        return np.asarray(run["train_logits"])

    np.testing.assert_array_equal(train_logits(2), np.asarray(tiny_runs[name]["train_logits"]))
    assert not np.allclose(train_logits(3), train_logits(2))


@pytest.mark.parametrize(
    "name", ["msff_ecomnet", "resnet50", "mobilenet_v3_large", "efficientnet_b0"]
)
def test_bfloat16_computation_keeps_float32_parameters(name, tiny_variables):
    module = tiny_model(name, dtype=jnp.bfloat16)
    abstract = jax.eval_shape(
        functools.partial(module.init, train=False), key(0), images()
    )
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(abstract)} == {
        jnp.dtype(jnp.float32)
    }
    # Same variable structure as the float32 model, so its variables serve here.
    logits, state = jax.jit(
        lambda v, x: module.apply(v, x, train=False, mutable=["intermediates"])
    )(tiny_variables[name], images())
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    assert state["intermediates"]["features"][0].dtype == jnp.bfloat16


def test_same_seed_gives_identical_initialisation(tiny_variables):
    init = jitted_init("msff_ecomnet")
    again = init(key(0), images())
    other = init(key(1), images())
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, again, tiny_variables["msff_ecomnet"]
    )
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree_util.tree_leaves(other["params"]),
                        jax.tree_util.tree_leaves(again["params"]))
    )


def test_batch_sharded_over_eight_devices_matches_one_device(tiny_variables):
    name = "msff_ecomnet"
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py should simulate 8 CPU devices"
    mesh = Mesh(np.array(devices), ("batch",))
    batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
    replicated = NamedSharding(mesh, PartitionSpec())
    module = tiny_model(name)
    variables = tiny_variables[name]
    x = images(4)

    def forward(v, x):
        eval_logits = module.apply(v, x, train=False)
        train_logits, updates = module.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}
        )
        return eval_logits, train_logits, updates["batch_stats"]

    single = jax.jit(forward)(variables, x)
    sharded = jax.jit(forward, out_shardings=(batch_sharding, batch_sharding, replicated))(
        jax.device_put(variables, replicated), jax.device_put(x, batch_sharding)
    )
    assert sharded[0].sharding.is_equivalent_to(batch_sharding, 2)
    # Eval logits, train logits (BatchNorm over the global batch) and the new running
    # statistics all agree with the single-device computation.
    for want, got in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(sharded)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_eca_channel_attention_option(tiny_variables):
    module = tiny_model("msff_ecomnet", channel_attention="eca")
    variables = jitted_init("msff_ecomnet", channel_attention="eca")(key(0), images())
    shapes = flat_shapes(variables)
    eca = {p: s for p, s in shapes.items() if "/iasm/channel/" in p}
    assert eca and all(p.endswith("/iasm/channel/conv/kernel") for p in eca)
    assert all(len(s) == 3 and s[1:] == (1, 1) and s[0] % 2 == 1 for s in eca.values())
    # Only the channel attention differs from the CBAM default.
    cbam = flat_shapes(tiny_variables["msff_ecomnet"])
    assert {p for p in cbam if "/iasm/channel/" not in p} == {
        p for p in shapes if "/iasm/channel/" not in p
    }
    logits = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, images())
    assert logits.shape == (BATCH, NUM_CLASSES) and np.isfinite(np.asarray(logits)).all()


# ---------------------------------------------------------------- bad input


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError) as error:
        get_model("resnet18", NUM_CLASSES)
    for name in MODEL_NAMES:
        assert name in str(error.value)


def test_unknown_or_fixed_overrides_are_refused():
    with pytest.raises(ValueError, match="unknown override.*widths_typo"):
        get_model("msff_ecomnet", NUM_CLASSES, widths_typo=(1, 2))
    with pytest.raises(ValueError, match="fixed by model 'msff_base'"):
        get_model("msff_base", NUM_CLASSES, use_iasm=True)
    with pytest.raises(ValueError, match="channel_attention"):
        jax.eval_shape(
            tiny_model("msff_ecomnet", channel_attention="se").init, key(0), images(batch=1)
        )


@pytest.mark.parametrize(
    "shape", [(IMAGE_SIZE, IMAGE_SIZE, 3), (1, IMAGE_SIZE, IMAGE_SIZE, 1),
              (1, 3, IMAGE_SIZE, IMAGE_SIZE), (1, 1, IMAGE_SIZE, IMAGE_SIZE, 3)]
)
@pytest.mark.parametrize("name", ["msff_ecomnet", "resnet50"])
def test_wrong_image_shape_is_refused_naming_the_expected_shape(name, shape, tiny_variables):
    with pytest.raises(ValueError) as error:
        tiny_model(name).apply(tiny_variables[name], jnp.zeros(shape), train=False)
    message = str(error.value)
    assert "(batch, height, width, 3)" in message and str(shape) in message
