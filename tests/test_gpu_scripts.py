"""The GPU scripts (benchmarks/gpu_check.sh, gpu_probe.py, gpu_user_path.py) on the CPU.

They are written for one GPU call; here the driver runs them once at tiny sizes, with
TensorFlow hidden as on the GPU machine, and the outputs are checked: the probe's rows
(a JAX baseline with inference and a kernel profile, the old step against it through a
model option and a config field, PyTorch eager and max-autotune jobs in a child
process; the plan columns empty on the CPU), and the user path's checks (SIGTERM,
resume from the saved step, eval, export, predict on two platforms) passing with the
loop's stand-in writer. The pieces that choose and judge (row sets, the fastest row,
the guard for a model option this checkout lacks, targets, the table's plan columns)
are checked directly.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_probe

REPO = Path(__file__).resolve().parents[1]
PROBE_ROWS = ["jax:resnet50", "jax:resnet50:old_step", "torch:msff_ecomnet:eager",
              "torch:msff_ecomnet:max-autotune"]
JAX_ROWS = PROBE_ROWS[:2]


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


def test_probe_rows_ratios_plan_columns_and_profiles(gpu_check):
    root, _ = gpu_check
    data = json.loads((root / "out" / "gpu_probe.json").read_text())
    rows = data["rows"]
    assert set(rows) == set(PROBE_ROWS)
    for name in PROBE_ROWS:
        assert rows[name]["status"] == "ok", (name, rows[name])
        assert rows[name]["train_img_s"] > 0
        if name != "jax:resnet50:old_step":  # Variants time training only.
            assert rows[name]["infer_img_s"] > 0
    assert rows["jax:resnet50"]["train_img_s"] == pytest.approx(
        rows["jax:resnet50"]["batch_size"] / (rows["jax:resnet50"]["train_ms"] / 1e3))
    # The old step's config field reached the step; today's default packs.
    assert rows["jax:resnet50"]["packed_update"] is True
    assert rows["jax:resnet50:old_step"]["packed_update"] is False
    # No GPU ran the rows: every plan column is there and empty (null), never zero.
    for name in JAX_ROWS:
        assert {key: rows[name][key] for key in gpu_probe.PLAN_COLUMNS} == dict.fromkeys(
            gpu_probe.PLAN_COLUMNS), name
    # Kernel profiles: the JAX baseline (host events on a CPU) and both PyTorch jobs.
    for name in ("jax:resnet50", "torch:msff_ecomnet:eager", "torch:msff_ecomnet:max-autotune"):
        profile = rows[name]["profile"]
        assert profile["kernel_ms_per_step"] > 0
        assert {k["kind"] for k in profile["kinds"]} <= set(gpu_probe.KIND_ORDER)
    torch_kinds = {k["kind"] for k in rows["torch:msff_ecomnet:eager"]["profile"]["kinds"]}
    assert {"conv forward", "conv gradients (one op)"} <= torch_kinds
    table = (root / "out" / "gpu_probe.md").read_text()
    ratio = rows["jax:resnet50:old_step"]["train_img_s"] / rows["jax:resnet50"]["train_img_s"]
    assert f"| {ratio:.3f}x |" in table
    baseline_line = next(line for line in table.splitlines() if line.startswith("| jax:resnet50 |"))
    assert baseline_line.endswith("|  |  |  |  | ok |"), baseline_line  # Empty plan cells.
    assert "- ResNet-50 JAX train >= 1.1x fastest PyTorch: not measured" in table
    assert "- MSFF-EComNet JAX train >= 1.1x fastest PyTorch twin: not measured" in table
    assert "Kernel time per training step by kind" in table
    assert "| jax:resnet50 | `" in table  # Its top kernels.


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


def test_rows_run_in_plan_order_and_sets_expand():
    names = [item.name for item in gpu_probe.PLAN]
    assert len(set(names)) == len(names)
    # What decides comes first: the default, the recommended setting, the old step.
    assert names[:4] == ["jax:msff_ecomnet", "jax:msff:unaligned", "jax:msff:old_step", "jax:resnet50"]
    assert names.index("profile:best") < names.index("torch:msff_ecomnet:default")
    args = argparse.Namespace(only=["targets", "jax:msff_msp"], skip=["torch:resnet50:default"],
                              no_torch=False, tiny=False)
    chosen = [item.name for item in gpu_probe.select_rows(args)]
    assert chosen == [name for name in names if name in set(gpu_probe.ROW_SETS["targets"])
                      | {"jax:msff_msp"} and name != "torch:resnet50:default"]
    # Each change alone sits on the old step: only its own settings differ from it.
    rows = {item.name: item for item in gpu_probe.PLAN}
    old = rows["jax:msff:old_step"]
    for key, _, model, config in gpu_probe.CHANGES:
        row = rows[f"jax:msff:old+{key}"]
        assert row.baseline == old.name
        changed = {k for k in row.overrides if row.overrides[k] != old.overrides.get(k)}
        changed |= {k for k in row.config if row.config[k] != old.config.get(k)}
        assert changed == set(model) | set(config), key


def test_an_unknown_row_is_a_command_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_probe.main(["--only", "jax:msff:no_triton_gemm", "--list"])
    assert exit_info.value.code == 2
    assert "unknown rows ['jax:msff:no_triton_gemm']" in capsys.readouterr().err


def test_a_model_option_this_checkout_lacks_fails_its_row_with_the_reason():
    item = gpu_probe.Item("jax:msff:x", "jax", "msff_ecomnet", overrides={"no_such_option": 1})
    reason = gpu_probe.unsupported_options(item)
    assert "no_such_option" in reason and "msff_ecomnet" in reason
    assert "accepted" not in reason  # The option named, not the model's whole list.
    assert gpu_probe.unsupported_options(gpu_probe.Item("jax:msff:y", "jax", "msff_ecomnet")) is None


_IASM_SPATIAL_PENDING = gpu_probe.unsupported_options(
    gpu_probe.Item("x", "jax", "msff_ecomnet", overrides={"iasm_spatial": "cudnn"})) is not None


@pytest.mark.xfail(_IASM_SPATIAL_PENDING, strict=True,
                   reason="the model option iasm_spatial is not in this checkout yet")
def test_every_jax_row_builds_in_this_checkout():
    from configs import benchmark as benchmark_config

    for item in gpu_probe.PLAN:
        if item.framework == "jax":
            assert gpu_probe.unsupported_options(item) is None, item.name
            gpu_probe.set_config_fields(benchmark_config.get_config(), item.config)


def test_config_fields_of_a_row_must_exist():
    from configs import benchmark as benchmark_config

    config = benchmark_config.get_config()
    gpu_probe.set_config_fields(config, {"train_step.packed_update": False})
    assert config.train_step.packed_update is False
    with pytest.raises(KeyError, match="train_step.packed_updates"):
        gpu_probe.set_config_fields(config, {"train_step.packed_updates": False})
    with pytest.raises(KeyError, match="no 'trainstep'"):
        gpu_probe.set_config_fields(config, {"trainstep.packed_update": False})


@pytest.mark.parametrize("tiny", [False, True])
def test_a_row_starts_from_its_own_model_defaults(tiny):
    """MSFF rows start aligned and fused as configs/default.py ships them; ResNet-50 gets
    none of the MSFF options; a row's own options and config fields come last."""
    runner = gpu_probe.JaxRunner.__new__(gpu_probe.JaxRunner)
    runner.args = argparse.Namespace(tiny=tiny)
    rows = {item.name: item for item in gpu_probe.PLAN}
    default = runner.config(rows["jax:msff_ecomnet"])
    assert (default.model_overrides.channel_alignment, default.model_overrides.fuse_pointwise) == (8, True)
    unaligned = runner.config(rows["jax:msff:unaligned"])
    assert (unaligned.model_overrides.channel_alignment, unaligned.model_overrides.fuse_pointwise) == (1, False)
    resnet = runner.config(rows["jax:resnet50:old_step"])
    assert resnet.model == "resnet50" and "channel_alignment" not in resnet.model_overrides
    assert resnet.model_overrides.batch_norm_backward == "autodiff"
    assert resnet.train_step.packed_update is False and default.train_step.packed_update is True
    assert ("stage_sizes" in resnet.model_overrides) == tiny


def test_fastest_row_counts_only_that_model_and_framework():
    results = {"jax:msff_ecomnet": {"train_img_s": 100.0}, "jax:msff:unaligned": {"train_img_s": 120.0},
               "jax:msff_msp": {"train_img_s": 150.0}, "torch:msff_ecomnet:default": {"train_img_s": 200.0},
               "jax:msff:old_step": {"status": "failed: ..."}}
    assert gpu_probe.fastest_row(results, "jax", "msff_ecomnet") == "jax:msff:unaligned"
    assert gpu_probe.fastest_row(results, "torch", "msff_ecomnet") == "torch:msff_ecomnet:default"
    assert gpu_probe.fastest_row(results, "jax", "resnet50") is None


def test_the_table_shows_the_plan_columns_of_a_gpu_row():
    results = {"_batch": 256, "jax:msff_ecomnet": {
        "status": "ok", "train_img_s": 3000.0, "train_ms": 85.33, "compile_s": 40.0,
        "plan_kernels": 1083, "plan_gb_at_boundaries": 71.44, "plan_lower_bound_ms": 21.86,
        "time_over_plan_bound": 3.9}}
    args = argparse.Namespace(tiny=False)
    table = gpu_probe.render(results, list(gpu_probe.PLAN), {"device": "NVIDIA H100 80GB HBM3"}, args)
    line = next(line for line in table.splitlines() if line.startswith("| jax:msff_ecomnet |"))
    assert line.endswith("| 1,083 | 71.4 | 21.86 | 3.90 | ok |"), line


def test_targets_give_verdicts_with_figures():
    results = {"jax:msff_ecomnet": {"train_img_s": 3000.0, "infer_img_s": 9000.0},
               "jax:msff:unaligned": {"train_img_s": 3400.0},
               "jax:msff_msp": {"train_img_s": 9000.0},  # Another model: not counted.
               "torch:msff_ecomnet:eager": {"train_img_s": 2000.0, "infer_img_s": 9500.0},
               "torch:msff_ecomnet:default": {"train_img_s": 3000.0},
               "jax:resnet50": {"train_img_s": 5600.0}}
    lines = gpu_probe.targets(results)
    assert lines[0].startswith("- MSFF-EComNet JAX train >= 1.1x fastest PyTorch twin: PASS: 3,400.0 "
                               "(jax:msff:unaligned) vs 3,000.0 (torch:msff_ecomnet:default) = 1.133x")
    assert lines[1].startswith("- MSFF-EComNet JAX train > JAX ResNet-50: FAIL")
    assert "not measured" in lines[2]
    assert lines[3].startswith("- msff_ecomnet JAX inference no slower than fastest PyTorch: FAIL")
    # Rows measured on a CPU (the rehearsal) keep their figures but get no verdict.
    rehearsal = gpu_probe.targets(results, verdicts=False)
    assert rehearsal[0].startswith("- MSFF-EComNet JAX train >= 1.1x fastest PyTorch twin: no verdict "
                                   "(not a GPU): 3,400.0 (jax:msff:unaligned)")
    assert not any("PASS" in line or "FAIL" in line for line in rehearsal)
    table = gpu_probe.render(results, list(gpu_probe.PLAN), {"platform": "cpu"}, argparse.Namespace(tiny=True))
    assert "PASS" not in table and "no verdict (not a GPU)" in table


def test_plan_figures_of_a_gpu_row_come_from_its_own_compiled_step():
    """The runner reads the plan of the executable it timed (compiled here for an H100
    without one); a plan it cannot read costs the columns, not the row."""
    import types

    import jax
    import jax.numpy as jnp

    from msff_jax.analysis.plan import programs, targets as plan_targets

    device = programs.compile_only_devices(plan_targets.TARGETS["h100"], 1)[0]
    one = jax.sharding.SingleDeviceSharding(device)
    matrix = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16, sharding=one)
    compiled = jax.jit(lambda a, b: jnp.tanh(a @ b)).lower(matrix, matrix).compile()
    runner = gpu_probe.JaxRunner.__new__(gpu_probe.JaxRunner)
    runner.device = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    runner.mesh = types.SimpleNamespace(size=1)
    figures = runner.plan_figures(compiled, measured_step_s=1e-3)
    assert figures["plan_kernels"] >= 1 and figures["plan_gb_at_boundaries"] > 0
    assert figures["time_over_plan_bound"] == pytest.approx(1.0 / figures["plan_lower_bound_ms"])

    class Unreadable:
        def as_text(self):
            raise RuntimeError("no text")

    figures = runner.plan_figures(Unreadable(), measured_step_s=1e-3)
    assert {key: figures[key] for key in gpu_probe.PLAN_COLUMNS} == dict.fromkeys(gpu_probe.PLAN_COLUMNS)
    assert figures["plan_error"] == "RuntimeError: no text"
    runner.device = types.SimpleNamespace(platform="cpu", device_kind="cpu")
    assert runner.plan_figures(Unreadable(), measured_step_s=1e-3) == dict.fromkeys(gpu_probe.PLAN_COLUMNS)
