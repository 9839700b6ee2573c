"""Model summary: parameter count, XLA FLOPs, and the launch.py entry point."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from msff_jax.models import TINY_OVERRIDES, get_model
from msff_jax.summary import _cost_flops, forward_flops, print_summary, summarize

TORCHVISION_RESNET50_GMACS = 4.09


def test_tiny_summary_counts_parameters_and_flops():
    module = get_model("msff_ecomnet", 15, **TINY_OVERRIDES["msff_ecomnet"])
    summary = summarize(module, image_size=32)
    params = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
    assert summary.num_params == sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    assert summary.flops > 0 and summary.gmacs == pytest.approx(summary.flops / 2e9)
    assert "stage1_block0" in summary.table and "MSFFEComNet" in summary.table
    # Plain text: no terminal colour codes in logs.
    assert "\x1b[" not in summary.table


def test_flops_grow_with_image_area():
    module = get_model("msff_ecomnet", 15, **TINY_OVERRIDES["msff_ecomnet"])
    small = summarize(module, image_size=32, table_depth=1).flops
    large = summarize(module, image_size=64, table_depth=1).flops
    assert 3.5 < large / small < 4.5


def test_resnet50_flops_agree_with_torchvision_table():
    module = get_model("resnet50", 1000)
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), images)
    flops = forward_flops(module, variables, images)
    assert flops / (2 * TORCHVISION_RESNET50_GMACS * 1e9) == pytest.approx(1, abs=0.05)


def test_cost_analysis_in_either_jax_format():
    assert _cost_flops({"flops": 10.0}) == 10.0
    assert _cost_flops([{"flops": 12.0}]) == 12.0
    with pytest.raises(RuntimeError, match="flops"):
        _cost_flops([])


def test_print_summary_from_a_config(capsys):
    config = ml_collections.ConfigDict(
        {
            "model": "mobilenet_v3_large",
            "model_overrides": {
                k: [list(row) for row in v] if k == "block_settings" else v
                for k, v in TINY_OVERRIDES["mobilenet_v3_large"].items()
            },
            "num_classes": 7,
            "image_size": 32,
            "dtype": "bfloat16",
        }
    )
    summary = print_summary(config)
    out = capsys.readouterr().out
    assert "mobilenet_v3_large" in out
    assert f"parameters: {summary.num_params:,}" in out
    assert "GMACs" in out and summary.flops > 0
