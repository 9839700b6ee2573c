"""Guards the torchvision -> Flax weight mapping of the three baselines.

The first tests do the real thing: torchvision's (and timm's) own model, with random
weights and random BatchNorm statistics, saved to safetensors, converted, and compared
logit for logit at 64 px. The others pin the converter's strictness on tiny models,
without torch.
"""

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import save_file as save_numpy

from benchmarks.check_torch_equivalence import TIMM_FLAX_OVERRIDES, compare, torchvision_model
from msff_jax.models import TINY_OVERRIDES, get_model
from msff_jax.models.torch_weights import (
    CONVERTIBLE_MODELS,
    HEAD_PREFIXES,
    WeightConversionError,
    convert_torchvision,
    load_pretrained,
    load_safetensors,
    torch_key,
)


@pytest.fixture(scope="module", autouse=True)
def exact_float32():
    """Both frameworks in exact float32, so only rounding separates the logits."""
    previous = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    # One thread: on a shared 2-core machine, two OpenMP threads spin-wait on each
    # other and run ~10x slower.
    torch.set_num_threads(1)
    yield
    jax.config.update("jax_default_matmul_precision", previous)


@pytest.mark.parametrize("name", CONVERTIBLE_MODELS)
def test_converted_torchvision_model_gives_the_same_logits(name, tmp_path):
    from safetensors.torch import save_file

    torch_model = torchvision_model(name, num_classes=1000, seed=0, image_size=64)
    path = tmp_path / f"{name}.safetensors"
    save_file(torch_model.state_dict(), str(path))

    result = compare(name, torch_model, path, image_size=64, batch_size=2,
                     num_classes=1000, seed=0)

    assert 0.1 < result["logit_scale"] < 10, result
    assert result["max_abs"] < 1e-4, result


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "efficientnet_b0"])
def test_converted_timm_model_gives_the_same_logits(name, tmp_path):
    """timm names its modules differently; load_pretrained renames them."""
    from safetensors.torch import save_file

    torch_model = torchvision_model(name, num_classes=10, seed=2, image_size=64,
                                    source="timm")
    path = tmp_path / f"timm_{name}.safetensors"
    save_file(torch_model.state_dict(), str(path))

    result = compare(name, torch_model, path, image_size=64, batch_size=2, num_classes=10,
                     seed=2, flax_overrides=TIMM_FLAX_OVERRIDES.get(name))

    assert 0.1 < result["logit_scale"] < 10, result
    assert result["max_abs"] < 1e-4, result


def test_timm_resnet50_uses_torchvision_names():
    import timm
    import torchvision

    timm_keys = set(timm.create_model("resnet50", pretrained=False).state_dict())
    assert timm_keys == set(torchvision.models.resnet50().state_dict())


# ---- torch-free checks on tiny models -------------------------------------------------


def tiny_variables(name, num_classes=15, seed=0):
    """A tiny model's variable tree filled with random numbers (traced, not compiled)."""
    module = get_model(name, num_classes, **TINY_OVERRIDES[name])
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), images)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda leaf: rng.standard_normal(leaf.shape).astype(leaf.dtype), shapes
    )


def as_torch_state_dict(variables):
    """Flax variables written as torchvision would store them (the inverse mapping)."""
    state = {}
    for collection in ("params", "batch_stats"):
        for path, value in traverse_util.flatten_dict(variables[collection]).items():
            array = np.asarray(value)
            if path[-1] == "kernel":
                array = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
            state[torch_key(collection, path)] = np.ascontiguousarray(array)
            if path[-1] == "mean":
                prefix = torch_key(collection, path)[: -len(".running_mean")]
                state[f"{prefix}.num_batches_tracked"] = np.array(3, np.int64)
    return state


@pytest.fixture(scope="module")
def tiny():
    return {name: tiny_variables(name) for name in CONVERTIBLE_MODELS}


def assert_trees_equal(a, b):
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]),
                                      err_msg=str(key))


@pytest.mark.parametrize("name", CONVERTIBLE_MODELS)
def test_round_trip_fills_every_leaf_with_its_own_tensor(name, tiny):
    variables = tiny[name]
    converted = convert_torchvision(name, as_torch_state_dict(variables), variables)
    assert_trees_equal(converted, variables)


def test_torch_keys_follow_torchvision_names():
    assert torch_key("params", ("layer2_0", "downsample_1", "scale")) == (
        "layer2.0.downsample.1.weight")
    assert torch_key("batch_stats", ("features_2_1", "block_0", "1", "var")) == (
        "features.2.1.block.0.1.running_var")
    assert torch_key("params", ("features_4", "block_2", "fc1", "kernel")) == (
        "features.4.block.2.fc1.weight")


def test_missing_key_is_named(tiny):
    state = as_torch_state_dict(tiny["resnet50"])
    del state["layer1.0.bn2.running_var"]
    missing = r"1 missing key\(s\): layer1\.0\.bn2\.running_var"
    with pytest.raises(WeightConversionError, match=missing):
        convert_torchvision("resnet50", state, tiny["resnet50"])


def test_unexpected_key_is_named(tiny):
    state = as_torch_state_dict(tiny["mobilenet_v3_large"])
    state["features.99.0.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    unexpected = r"unexpected key\(s\): features\.99\.0\.weight"
    with pytest.raises(WeightConversionError, match=unexpected):
        convert_torchvision("mobilenet_v3_large", state, tiny["mobilenet_v3_large"])


def test_shape_mismatch_names_the_key_and_both_shapes(tiny):
    state = as_torch_state_dict(tiny["efficientnet_b0"])
    key = "features.0.0.weight"
    expected = state[key].shape
    state[key] = np.zeros((expected[0] + 1,) + expected[1:], np.float32)
    with pytest.raises(WeightConversionError) as error:
        convert_torchvision("efficientnet_b0", state, tiny["efficientnet_b0"])
    message = str(error.value)
    assert key in message
    assert str(tuple(state[key].shape)) in message and str(tuple(expected)) in message


def test_other_head_width_is_refused_without_skip_head(tiny):
    state = as_torch_state_dict(tiny_variables("resnet50", num_classes=1000))
    with pytest.raises(WeightConversionError) as error:
        convert_torchvision("resnet50", state, tiny["resnet50"])
    assert "fc.weight: checkpoint (1000, 256), model expects (15, 256)" in str(error.value)
    assert "skip_head=True" in str(error.value)


@pytest.mark.parametrize("name", CONVERTIBLE_MODELS)
def test_skip_head_keeps_the_template_head(name, tiny):
    template = tiny[name]
    pretrained = tiny_variables(name, num_classes=1000, seed=1)
    converted = convert_torchvision(name, as_torch_state_dict(pretrained), template,
                                    skip_head=True)

    head = HEAD_PREFIXES[name]
    flat_converted = traverse_util.flatten_dict(converted["params"])
    flat_template = traverse_util.flatten_dict(template["params"])
    flat_pretrained = traverse_util.flatten_dict(pretrained["params"])
    heads = [path for path in flat_template if torch_key("params", path).startswith(head)]
    assert len(heads) == 2  # kernel and bias
    for path in flat_template:
        source = flat_template if path in heads else flat_pretrained
        np.testing.assert_array_equal(np.asarray(flat_converted[path]),
                                      np.asarray(source[path]), err_msg=str(path))


def test_skip_head_accepts_a_headless_checkpoint(tiny):
    state = as_torch_state_dict(tiny["efficientnet_b0"])
    del state["classifier.1.weight"], state["classifier.1.bias"]
    converted = convert_torchvision("efficientnet_b0", state, tiny["efficientnet_b0"],
                                    skip_head=True)
    assert_trees_equal(converted, tiny["efficientnet_b0"])


def test_unknown_model_lists_the_convertible_ones(tiny):
    with pytest.raises(ValueError, match="resnet50, mobilenet_v3_large, efficientnet_b0"):
        convert_torchvision("msff_ecomnet", {}, tiny["resnet50"])


def test_load_pretrained_reads_safetensors(tiny, tmp_path):
    path = tmp_path / "tiny_resnet.safetensors"
    save_numpy(as_torch_state_dict(tiny["resnet50"]), str(path))
    assert set(load_safetensors(path)) == set(as_torch_state_dict(tiny["resnet50"]))
    converted = load_pretrained("resnet50", path, tiny["resnet50"], skip_head=False)
    assert_trees_equal(converted, tiny["resnet50"])


def test_missing_file_is_named(tmp_path, tiny):
    path = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_pretrained("resnet50", path, tiny["resnet50"], skip_head=True)


def test_a_file_that_is_not_safetensors_is_named(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"\x80\x02not a safetensors file")
    with pytest.raises(WeightConversionError, match="model.pth"):
        load_safetensors(path)


def test_errors_from_a_file_name_the_file(tmp_path, tiny):
    state = as_torch_state_dict(tiny["resnet50"])
    del state["fc.bias"]
    path = tmp_path / "broken.safetensors"
    save_numpy(state, str(path))
    with pytest.raises(WeightConversionError, match=r"broken\.safetensors.*\n.*fc\.bias"):
        load_pretrained("resnet50", path, tiny["resnet50"], skip_head=False)
