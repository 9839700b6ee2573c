"""The GPU scripts (benchmarks/gpu_check.sh, gpu_probe.py, gpu_user_path.py) on the CPU.

They are written for one GPU call; here the driver runs them once at tiny sizes, with
TensorFlow hidden as on the GPU machine, and the outputs are checked: the probe's rows
(a JAX baseline with inference and a kernel profile, an option variant against it,
PyTorch eager and max-autotune jobs in a child process), and the user path's checks
(SIGTERM, resume from the saved step, eval, export, predict on two platforms) passing
with the loop's stand-in writer. The parsing pieces (kernel kinds, winners, targets) are
checked directly.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_probe

REPO = Path(__file__).resolve().parents[1]
PROBE_ROWS = ["jax:resnet50", "jax:resnet50:scatter", "torch:msff_ecomnet:eager",
              "torch:msff_ecomnet:max-autotune"]


@pytest.fixture(scope="module")
def gpu_check(tmp_path_factory):
    """One run of the driver: the probe (four rows), then the user path."""
    root = tmp_path_factory.mktemp("gpu_check")
    hide = root / "hide_tf"
    hide.mkdir()
    # What the GPU machine looks like: no TensorFlow.
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['tensorflow'] = None\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # One CPU device.
    env.update(OUT=str(root / "out"), GPU_CHECK_TINY="1", PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([str(hide), str(REPO)]), PROBE_BUDGET_S="900",
               PROBE_ARGS="--only " + " ".join(PROBE_ROWS), USER_PATH_LIMIT_S="1200",
               USER_PATH_ARGS=f"--keep {root / 'kept'}")
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=1500)
    return root, result


def test_driver_writes_both_tables_and_exits_zero(gpu_check):
    root, result = gpu_check
    out = root / "out"
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_check.log", "gpu_probe.json", "gpu_probe.md", "user_path.json", "user_path.md"]
    assert "no TensorFlow: training logs through the stand-in writer" in result.stdout
    # Both tables printed last.
    assert result.stdout.rstrip().endswith((out / "user_path.md").read_text().rstrip())


def test_probe_rows_ratios_and_profiles(gpu_check):
    root, _ = gpu_check
    data = json.loads((root / "out" / "gpu_probe.json").read_text())
    rows = data["rows"]
    assert set(rows) == set(PROBE_ROWS)
    for name in PROBE_ROWS:
        assert rows[name]["status"] == "ok", (name, rows[name])
        assert rows[name]["train_img_s"] > 0
        if name != "jax:resnet50:scatter":  # Option variants time training only.
            assert rows[name]["infer_img_s"] > 0
    assert rows["jax:resnet50"]["train_img_s"] == pytest.approx(
        rows["jax:resnet50"]["batch_size"] / (rows["jax:resnet50"]["train_ms"] / 1e3))
    # Kernel profiles: the JAX baseline (host events on a CPU) and both PyTorch jobs.
    for name in ("jax:resnet50", "torch:msff_ecomnet:eager", "torch:msff_ecomnet:max-autotune"):
        profile = rows[name]["profile"]
        assert profile["kernel_ms_per_step"] > 0
        assert {k["kind"] for k in profile["kinds"]} <= set(gpu_probe.KIND_ORDER)
    torch_kinds = {k["kind"] for k in rows["torch:msff_ecomnet:eager"]["profile"]["kinds"]}
    assert {"conv forward", "conv gradients (one op)"} <= torch_kinds
    table = (root / "out" / "gpu_probe.md").read_text()
    ratio = rows["jax:resnet50:scatter"]["train_img_s"] / rows["jax:resnet50"]["train_img_s"]
    assert f"| {ratio:.3f}x |" in table
    assert "- ResNet-50 JAX train >= 1.1x fastest PyTorch: not measured" in table
    assert "- MSFF-EComNet JAX train >= 1.1x fastest PyTorch twin: not measured" in table
    assert "Kernel time per training step by kind" in table


def test_user_path_checks_pass_without_tensorflow(gpu_check):
    root, _ = gpu_check
    data = json.loads((root / "out" / "user_path.json").read_text())
    verdicts = {what: verdict for what, verdict, _ in data["checks"]}
    for check in ("shards made", "SIGTERM mid-run saves and stops", "rerun resumes from the saved step",
                  "rerun finishes with the final report", "--mode eval of the best checkpoint",
                  "--mode export", "predict with the export on default", "predict with the export on cpu",
                  "probabilities default vs cpu"):
        assert verdicts.get(check) == "PASS", (check, data["checks"])
    assert not [c for c in data["checks"] if c[1] == "FAIL"]
    assert verdicts["TensorBoard writer"] == "INFO"
    figures = data["figures"]
    assert figures["packages"]["tensorflow"] is False
    assert figures["time_to_first_step_s"] > figures["loop_reported_first_step_s"] > 0
    # The loop's own figure, compared with the probe's row for the same step.
    assert figures["loop_images_per_s"] > 0
    assert figures["benchmark_source"].startswith("gpu_probe row jax:resnet50")
    assert figures["predict_max_abs_prob_diff"] == 0.0  # Same platform, same artifact.
    # Degraded gracefully: scalars still written, one warning per training process.
    kept = root / "kept"
    scalars = [json.loads(line) for line in
               (kept / "run" / "tensorboard" / "scalars.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/images_per_sec"} <= set(scalars[0])
    assert any(s.get("val/macro_f1") is not None for s in scalars)
    for log in ("train_first.log", "train_resumed.log"):
        assert (kept / log).read_text().count("TensorFlow is not importable") == 1, log


def test_winners_take_the_best_value_of_each_option_above_the_margin():
    plan = [dataclass for dataclass in gpu_probe.PLAN]
    rates = {"jax:msff_ecomnet": 100.0, "jax:msff:scatter": 100.5, "jax:msff:fuse_pointwise": 104.0,
             "jax:msff:align8": 103.0, "jax:msff:align16": 108.0, "jax:msff:align32": 90.0}
    results = {name: {"train_img_s": rate} for name, rate in rates.items()}
    overrides, options, names = gpu_probe.winners(results, plan, margin=0.01)
    assert overrides == {"fuse_pointwise": True, "channel_alignment": 16}
    assert options == {} and names == ["jax:msff:align16", "jax:msff:fuse_pointwise"]
    results["jax:msff:no_triton_gemm"] = {"train_img_s": 120.0}
    _, options, _ = gpu_probe.winners(results, plan, margin=0.01)
    assert options == {"xla_gpu_enable_triton_gemm": False}
    assert gpu_probe.winners({"jax:msff_ecomnet": {"train_img_s": 100.0},
                              "jax:msff:scatter": {"train_img_s": 100.9}}, plan, 0.01)[2] == []


def test_targets_give_verdicts_with_figures():
    results = {"jax:msff_ecomnet": {"train_img_s": 3000.0, "infer_img_s": 9000.0},
               "jax:msff:winners": {"train_img_s": 3400.0},
               "torch:msff_ecomnet:eager": {"train_img_s": 2000.0, "infer_img_s": 9500.0},
               "torch:msff_ecomnet:default": {"train_img_s": 3000.0},
               "jax:resnet50": {"train_img_s": 5600.0}}
    lines = gpu_probe.targets(results)
    assert lines[0].startswith("- MSFF-EComNet JAX train >= 1.1x fastest PyTorch twin: PASS: 3,400.0 "
                               "(jax:msff:winners) vs 3,000.0 (torch:msff_ecomnet:default) = 1.133x")
    assert lines[1].startswith("- MSFF-EComNet JAX train > JAX ResNet-50: FAIL")
    assert "not measured" in lines[2]
    assert lines[3].startswith("- msff_ecomnet JAX inference no slower than fastest PyTorch: FAIL")
