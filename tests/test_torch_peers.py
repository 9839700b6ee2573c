"""The PyTorch peer benchmark runs on the CPU at tiny sizes, and the twin is our model.

`benchmarks/torch_peers.py` is meant for a GPU; here it runs through `main()` at 32 px
so its CSV contract (the columns the JAX benchmark also writes) is checked in CI. The
MSFF-EComNet twin must be the same network as the Flax model: same parameter count for
every ablation, and the same logits from the same weights.
"""

import csv

import jax
import numpy as np
import pytest
import torch

from benchmarks import msff_torch, torch_peers
from msff_jax.models import TINY_OVERRIDES, get_model

MSFF_NAMES = tuple(msff_torch.PRESETS)
TINY_RUN = ["--batch_size", "2", "--image_size", "32", "--warmup", "1", "--steps", "2",
            "--repeats", "2", "--compile", "off", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    # One thread: on a shared 2-core machine, two OpenMP threads spin-wait on each
    # other and run ~10x slower.
    torch.set_num_threads(1)


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.reader(file))


def test_tiny_cpu_run_appends_rows_in_the_shared_format(tmp_path):
    out = tmp_path / "bench.csv"
    rows = torch_peers.main(["--models", "resnet50", "msff_ecomnet", *TINY_RUN,
                             "--csv", str(out)])
    torch_peers.main(["--models", "mobilenet_v3_large", *TINY_RUN, "--csv", str(out)])

    table = read_csv(out)
    assert table[0] == [
        "model", "infer_samples_per_sec", "infer_step_time", "infer_batch_size",
        "train_samples_per_sec", "train_step_time", "train_batch_size", "param_count",
        "gmacs", "framework", "device", "dtype", "mfu", "compile_s"]
    records = [dict(zip(table[0], row)) for row in table[1:]]
    assert [r["model"] for r in records] == ["resnet50", "msff_ecomnet", "mobilenet_v3_large"]
    for record in records:
        for column in ("infer_samples_per_sec", "infer_step_time", "train_samples_per_sec",
                       "train_step_time", "gmacs"):
            assert float(record[column]) > 0, (record["model"], column)
        # samples/s and step time describe the same measurement.
        assert float(record["train_samples_per_sec"]) == pytest.approx(
            2 / (float(record["train_step_time"]) / 1e3), rel=1e-2)
        assert (record["infer_batch_size"], record["train_batch_size"]) == ("2", "2")
        assert (record["framework"], record["device"], record["dtype"]) == (
            "pytorch", "cpu", "float32")
        assert record["mfu"] == "" and record["compile_s"] == ""  # no known peak; eager
    assert float(records[0]["param_count"]) == 23.538767  # torchvision's, at 15 classes
    # torchvision's table: ResNet-50 is 4.09 GMACs at 224 px, i.e. ~0.0835 at 32 px.
    assert float(records[0]["gmacs"]) == pytest.approx(4.09 * (32 / 224) ** 2, rel=0.05)
    twin = msff_torch.build_twin("msff_ecomnet", 15)
    assert rows[1]["param_count"] == pytest.approx(
        sum(p.numel() for p in twin.parameters()) / 1e6, abs=1e-6)


def test_compiled_bfloat16_run_of_the_twin(monkeypatch):
    """torch.compile's tracing of the whole train step (the 'eager' backend: no C++
    build) and bf16 autocast, on the tiny twin (tracing the full one takes ~20 s here)."""
    monkeypatch.setitem(torch_peers.MODEL_BUILDERS, "msff_ecomnet", lambda n: msff_torch.build_twin(
        "msff_ecomnet", n, **TINY_OVERRIDES["msff_ecomnet"]))
    rows = torch_peers.main(["--models", "msff_ecomnet", *TINY_RUN, "--compile", "on",
                             "--compile_backend", "eager", "--dtype", "bfloat16"])
    (row,) = rows
    assert (row["framework"], row["dtype"]) == ("pytorch+compile", "bfloat16")
    assert float(row["train_samples_per_sec"]) > 0 and float(row["compile_s"]) > 0


def test_a_failing_model_gets_an_empty_row_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    def broken(num_classes):
        raise RuntimeError("no kernel for this model")

    monkeypatch.setitem(torch_peers.MODEL_BUILDERS, "resnet50", broken)
    out = tmp_path / "bench.csv"
    rows = torch_peers.main(["--models", "resnet50", "efficientnet_b0", *TINY_RUN,
                             "--csv", str(out)])
    assert "resnet50 (compile=False) failed: RuntimeError: no kernel" in capsys.readouterr().err
    assert rows[0]["model"] == "resnet50" and rows[0]["train_samples_per_sec"] == ""
    assert float(rows[1]["train_samples_per_sec"]) > 0
    assert len(read_csv(out)) == 3


def test_a_csv_with_other_columns_is_refused(tmp_path):
    out = tmp_path / "other.csv"
    out.write_text("model,images_per_second\nx,1\n")
    with pytest.raises(ValueError, match="other.csv: header"):
        torch_peers.append_rows(out, [{}])


def test_peak_table_matches_device_names():
    assert torch_peers.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert torch_peers.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert torch_peers.peak_flops("NVIDIA H200", "float32") == 67e12
    assert torch_peers.peak_flops("NVIDIA H100 80GB HBM3", "tf32") is None
    assert torch_peers.peak_flops("cpu", "bfloat16") is None


@pytest.mark.parametrize("name", MSFF_NAMES)
def test_twin_has_the_flax_models_parameter_count(name):
    module = get_model(name, 15)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32))
    flax_count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes["params"]))
    twin_count = sum(p.numel() for p in msff_torch.build_twin(name, 15).parameters())
    assert twin_count == flax_count


@pytest.mark.parametrize("name,overrides", [
    ("msff_ecomnet", {}), ("msff_base", {}), ("msff_ecomnet", {"channel_attention": "eca"})])
def test_twin_computes_the_same_function(name, overrides):
    overrides = {**TINY_OVERRIDES[name], **overrides}
    module = get_model(name, 15, **overrides)
    images = np.random.default_rng(0).standard_normal((2, 32, 32, 3), dtype=np.float32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), images)
    rng = np.random.default_rng(1)

    def random_leaf(path, leaf):
        if path[-1].key == "var":  # running variances must be positive
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return (0.5 * rng.standard_normal(leaf.shape)).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(random_leaf, shapes)
    with jax.default_matmul_precision("highest"):
        expected = np.asarray(jax.jit(lambda v, x: module.apply(v, x))(variables, images))

    twin = msff_torch.build_twin(name, 15, **overrides).eval()
    twin.load_state_dict(msff_torch.flax_variables_to_torch_state_dict(variables), strict=True)
    with torch.no_grad():
        actual = twin(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(actual, expected, atol=1e-4 * np.abs(expected).max())
