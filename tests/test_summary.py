"""Model summary: parameter count, XLA FLOPs, and the launch.py entry point."""

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from msff_jax.models import TINY_OVERRIDES, get_model
from msff_jax.analysis import flops
from msff_jax.analysis.summary import forward_flops, print_summary, summarize

TORCHVISION_RESNET50_GMACS = 4.09


def test_resnet50_summary_matches_torchvision_parameters_and_flops():
    summary = summarize(get_model("resnet50", 1000), image_size=224, table_depth=1)
    assert summary.num_params == 25_557_032
    # XLA counts a multiply-add as 2 FLOPs; torchvision's table is in MACs.
    assert summary.gmacs == pytest.approx(TORCHVISION_RESNET50_GMACS, rel=0.05)
    assert summary.gmacs == pytest.approx(summary.flops / 2e9)
    assert "layer4_2" in summary.table and "ResNet" in summary.table
    assert "\x1b[" not in summary.table  # plain text for logs, no terminal colours


def test_flops_grow_with_image_area():
    module = get_model("mobilenet_v3_large", 15, **TINY_OVERRIDES["mobilenet_v3_large"])
    variables = jax.eval_shape(
        lambda x: module.init(jax.random.key(0), x, train=False),
        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
    )

    def flops(size):
        images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        return forward_flops(module, variables, images)

    small, large = flops(32), flops(64)
    assert small > 0
    # Everything but the classifier scales with the area (4x).
    assert 3.0 < large / small < 4.2


def test_summary_without_a_flop_count_says_why(monkeypatch):
    monkeypatch.setattr(flops, "counted_on_cpu", lambda *args: None)
    module = get_model("mobilenet_v3_large", 15, **TINY_OVERRIDES["mobilenet_v3_large"])
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), images)
    with pytest.raises(RuntimeError, match="no FLOP count for MobileNetV3"):
        forward_flops(module, variables, images)


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
