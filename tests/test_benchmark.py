"""The benchmark mode: its timing rules, FLOP counting, output files, and a tiny run.

The tiny run goes through the real path (launch.py's benchmark mode, the real train
step, the grain reader over real shards for the end-to-end row), on tiny models at
32 px, so it checks plumbing and units, not speed.
"""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from msff_jax.analysis import flops
from msff_jax.analysis.benchmark import device_peaks, outputs, timing

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ device peaks
@pytest.mark.parametrize(
    "kind, dtype, expected",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
        ("NVIDIA H100 80GB HBM3", "float32", 67e12),
        ("NVIDIA H100 PCIe", "bfloat16", 756e12),
        ("NVIDIA H200", "bfloat16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
        ("cpu", "float32", None),
        ("NVIDIA H100 80GB HBM3", "float16-unknown", None),
    ],
)
def test_peak_flops_by_device_kind(kind, dtype, expected):
    assert device_peaks.peak_flops_per_second(kind, dtype) == expected


def test_mfu_counts_three_forward_passes_per_trained_image():
    # 4 GFLOPs forward, 1,000 images/s: 12 TFLOP/s of training, 10% of 120 TFLOP/s.
    assert device_peaks.model_flops_utilisation(4e9, 1000.0, 120e12) == pytest.approx(0.1)
    assert device_peaks.model_flops_utilisation(4e9, 1000.0, None) is None
    assert device_peaks.model_flops_utilisation(None, 1000.0, 120e12) is None


# ------------------------------------------------------------------------ timing
class _FakeSteps:
    """Counts steps; each "step" advances a fake clock, so timings are exact."""

    def __init__(self, monkeypatch, seconds_per_step):
        self.calls = []
        self.now = 0.0
        self.seconds_per_step = seconds_per_step
        monkeypatch.setattr(timing.time, "perf_counter", lambda: self.now)

    def __call__(self, count):
        self.calls.append(count)
        self.now += count * self.seconds_per_step[len(self.calls) - 1]
        return jnp.zeros(())


def test_time_per_step_excludes_warmup_and_takes_the_median(monkeypatch):
    # Warm-up at 1 s/step, then repeats at 0.1, 0.5 (an outlier) and 0.2 s/step.
    steps = _FakeSteps(monkeypatch, [1.0, 0.1, 0.5, 0.2])
    median, per_repeat = timing.time_per_step(steps, warmup_steps=3, timed_steps=4, repeats=3)
    assert steps.calls == [3, 4, 4, 4]
    assert per_repeat == pytest.approx([0.1, 0.5, 0.2])
    assert median == pytest.approx(0.2)


def test_time_per_step_rejects_empty_timings():
    with pytest.raises(ValueError, match="timed_steps"):
        timing.time_per_step(lambda n: None, warmup_steps=0, timed_steps=0, repeats=1)


def test_analysed_flops_reads_dict_and_list_forms():
    class Stage:
        def __init__(self, analysis):
            self.analysis = analysis

        def cost_analysis(self):
            return self.analysis

    assert flops.analysed_flops(Stage({"flops": 10.0})) == 10.0
    assert flops.analysed_flops(Stage([{"flops": 12.0}])) == 12.0  # Older JAX.
    assert flops.analysed_flops(Stage(None)) is None
    assert flops.analysed_flops(Stage({"flops": -1.0})) is None


def test_analysed_flops_counts_a_matmul_as_two_flops_per_multiply_add():
    lowered = jax.jit(lambda a, b: a @ b).lower(jnp.ones((8, 16)), jnp.ones((16, 32)))
    assert flops.analysed_flops(lowered) == 2 * 8 * 16 * 32


def test_resnet50_forward_costs_about_4_1_gmacs_at_224px():
    """The published figure for ResNet-50 is 4.1 GMACs per 224-px image (timm: 4.11).

    XLA counts only the multiply-adds that touch real input, not zero padding, which
    puts it about 3% under counters that charge every kernel tap (3.97 here). Lowering
    only (no compilation), so this costs seconds even at full size.
    """
    from msff_jax.models import get_model

    model = get_model("resnet50", 15)
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False), images
    )
    lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images)
    gmacs = flops.analysed_flops(lowered) / 2 / 2e9
    assert 3.9 < gmacs < 4.15, gmacs


# ----------------------------------------------------------------------- outputs
def _row(model, framework, train, params=10.0, **extra):
    row = {c: None for c in outputs.CSV_COLUMNS}
    row.update(
        model=model,
        framework=framework,
        train_samples_per_sec=train,
        train_step_time=1000 * 256 / train,
        train_batch_size=256,
        param_count=params,
        gmacs=1.5,
        device="NVIDIA H100 80GB HBM3",
        dtype="bfloat16",
    )
    row.update(extra)
    return row


def test_csv_round_trip_and_ratio_table(tmp_path):
    rows = [
        _row("resnet50", "jax", 4400.0, 25.5, mfu=0.21, input="synthetic"),
        _row("resnet50", "jax", 2200.0, 25.5, input="shards (8 workers)"),
    ]
    outputs.write_csv(tmp_path / "jax.csv", rows)
    with open(tmp_path / "jax.csv") as f:
        header = next(csv.reader(f))
    assert tuple(header[: len(outputs.CSV_COLUMNS)]) == outputs.CSV_COLUMNS
    back = outputs.read_csv(tmp_path / "jax.csv")
    assert back[0]["train_samples_per_sec"] == 4400.0 and back[0]["mfu"] == 0.21
    assert back[1]["input"] == "shards (8 workers)" and back[1]["mfu"] is None

    # A PyTorch CSV has only the standard columns; the merged table compares both.
    torch_rows = [_row("resnet50", "pytorch+compile", 4000.0, 25.6)]
    outputs.write_csv(tmp_path / "torch.csv", torch_rows)
    table = outputs.markdown_table(back + outputs.read_csv(tmp_path / "torch.csv"))
    assert "| resnet50 | jax | synthetic | bfloat16 | 4,400.0 |" in table
    assert "21.0%" in table
    # Only the synthetic-input JAX row enters the ratio: 4400 / 4000.
    assert "| resnet50 | 1.10x |" in table


def test_read_csv_names_file_and_line_of_a_bad_cell(tmp_path):
    path = tmp_path / "bad.csv"
    outputs.write_csv(path, [_row("resnet50", "jax", 100.0)])
    lines = path.read_text().splitlines()
    lines.append(lines[1].replace("100", "fast", 1))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: column 'train_samples_per_sec'"):
        outputs.read_csv(path)
    (tmp_path / "short.csv").write_text("model,train_samples_per_sec\nx,1\n")
    with pytest.raises(ValueError, match="missing benchmark CSV columns"):
        outputs.read_csv(tmp_path / "short.csv")


def test_input_bound_table_compares_shards_with_synthetic():
    rows = [
        _row("msff_ecomnet", "jax", 5000.0, input="synthetic"),
        _row("msff_ecomnet", "jax", 4000.0, input="shards (14 workers)"),
    ]
    table = outputs.markdown_table(rows)
    assert "| msff_ecomnet | jax | shards (14 workers) | 5,000.0 | 4,000.0 | 0.80 |" in table


# ------------------------------------------------------------ the benchmark mode
def test_config_errors_stop_before_compiling(tmp_path):
    from configs import benchmark as benchmark_config
    from msff_jax.analysis.benchmark import run as benchmark

    config = benchmark_config.get_config("cpu_tiny")
    config.benchmark.end_to_end = True
    config.data_dir = str(tmp_path / "no_shards_here")
    with pytest.raises(ValueError, match="no_shards_here/manifest.json does not exist"):
        benchmark.run(config, tmp_path / "work")
    config.benchmark.end_to_end = False
    config.benchmark.timed_steps = 0
    with pytest.raises(ValueError, match="timed_steps=0 must be at least 1"):
        benchmark.run(config, tmp_path / "work")


def test_module_options_merge_tiny_preset_config_and_per_model_overrides():
    from configs import benchmark as benchmark_config
    from msff_jax.analysis.benchmark import run as benchmark
    from msff_jax.models import TINY_OVERRIDES

    config = benchmark_config.get_config("cpu_tiny")
    config.model_overrides = {"max_pool_backward": "scatter", "dropout_rate": 0.0}
    config.benchmark.per_model_overrides = {"msff_ecomnet": {"fuse_pointwise": True,
                                                             "dropout_rate": 0.5}}
    msff = benchmark._config_for_model(config, "msff_ecomnet").model_overrides.to_dict()
    assert msff == {**TINY_OVERRIDES["msff_ecomnet"], "max_pool_backward": "scatter",
                    "fuse_pointwise": True, "dropout_rate": 0.5}
    resnet = benchmark._config_for_model(config, "resnet50").model_overrides.to_dict()
    assert resnet == {**TINY_OVERRIDES["resnet50"], "max_pool_backward": "scatter",
                      "dropout_rate": 0.0}


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """A synthetic DeepFashion of small JPEGs, converted to shards by the real tools."""
    from data_pipeline.conversion import deepfashion
    from data_pipeline.conversion import synthetic

    root = tmp_path_factory.mktemp("bench_data")
    synthetic.generate(root / "deepfashion", 120, seed=0, image_size=64)
    deepfashion.convert(root / "deepfashion", root / "shards", max_images=0, num_workers=1)
    return root / "shards"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_shards):
    """launch.py's benchmark mode on two tiny models, with the end-to-end row and
    PyTorch rows to merge. Runs as a subprocess: the command users type, on two CPU
    devices (the batch is sharded), with XLA's backend optimisation off because this
    run checks plumbing and units, not speed, and compiling dominates its cost."""
    workdir = tmp_path_factory.mktemp("bench_run")
    torch_csv = workdir / "torch.csv"
    outputs.write_csv(
        torch_csv,
        [_row("msff_ecomnet_tiny", "pytorch+compile", 50.0, 0.02, device="cpu")],
    )
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
    )
    command = [
        sys.executable, "launch.py", "--mode", "benchmark",
        "--config", "configs/benchmark.py:cpu_tiny", "--workdir", str(workdir / "out"),
        "--config.benchmark.end_to_end=True", f"--config.data_dir={tiny_shards}",
        f"--config.benchmark.torch_csv={torch_csv}",
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir / "out", result.stdout


def test_tiny_run_writes_positive_consistent_figures(tiny_run):
    from msff_jax.models import TINY_OVERRIDES, get_model

    out, stdout = tiny_run
    rows = outputs.read_csv(out / "benchmark.csv")
    with open(out / "benchmark.csv") as f:
        assert tuple(next(csv.reader(f))[: len(outputs.CSV_COLUMNS)]) == outputs.CSV_COLUMNS
    assert [(r["model"], r["input"]) for r in rows] == [
        ("msff_ecomnet_tiny", "synthetic"),
        ("msff_ecomnet_tiny", "shards (0 workers)"),
        ("resnet50_tiny", "synthetic"),
    ]
    for row in rows:
        assert row["framework"] == "jax" and row["device"] == "cpu x2"
        assert row["dtype"] == "float32" and row["train_batch_size"] == 8
        assert row["train_samples_per_sec"] > 0 and row["gmacs"] > 0
        # images/s and ms/step describe the same median.
        assert row["train_samples_per_sec"] * row["train_step_time"] / 1e3 == pytest.approx(8, rel=1e-3)
        assert row["mfu"] is None  # No known peak for a CPU.
        assert f"benchmark {row['model']} [{row['input']}]: train" in stdout
    synthetic_rows = [r for r in rows if r["input"] == "synthetic"]
    for row in synthetic_rows:
        assert row["infer_samples_per_sec"] > 0 and row["compile_s"] > 0
        assert row["train_memory_gb"] > 0
        # Parameters in millions, counted independently of the benchmark.
        name = row["model"].removesuffix("_tiny")
        model = get_model(name, 15, **TINY_OVERRIDES[name])
        shapes = jax.eval_shape(
            lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
        )
        expected = sum(math.prod(p.shape) for p in jax.tree.leaves(shapes["params"]))
        assert row["param_count"] == pytest.approx(expected / 1e6, rel=1e-4)


def test_tiny_run_training_costs_about_three_forward_passes(tiny_run):
    """XLA's own count of the train step backs the 3x convention MFU uses."""
    out, _ = tiny_run
    details = json.loads((out / "benchmark.json").read_text())
    for model in details["models"]:
        ratio = model["train_step_flops_per_image"] / model["forward_flops_per_image"]
        assert 2.5 < ratio < 3.6, (model["model"], ratio)
    assert details["environment"]["device_count"] == 2


def test_tiny_run_table_and_plot_merge_the_pytorch_rows(tiny_run):
    out, _ = tiny_run
    table = (out / "benchmark.md").read_text()
    assert "| msff_ecomnet_tiny | jax | synthetic | float32 |" in table
    assert "| msff_ecomnet_tiny | pytorch+compile | synthetic | bfloat16 | 50.0 |" in table
    assert "JAX / pytorch+compile (train)" in table
    assert "| msff_ecomnet_tiny | jax | shards (0 workers) |" in table  # input-bound table
    png = (out / "throughput_vs_params.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_benchmark_config_knows_every_model():
    """configs/benchmark.py lists the models without importing JAX; the list must be the
    registry's, so every model gets its own default options."""
    from configs import benchmark as benchmark_config
    from msff_jax.models import MODEL_NAMES

    assert set(benchmark_config.MODEL_NAMES) == set(MODEL_NAMES)
    config = benchmark_config.get_config()
    assert dict(config.benchmark.per_model_overrides.msff_ecomnet)["channel_alignment"] == 8
    assert not dict(config.benchmark.per_model_overrides.resnet50)
