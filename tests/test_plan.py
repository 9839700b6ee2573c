"""`--mode plan`: the run's programs compiled for an NVIDIA GPU on this CPU machine, read
for memory, kernels, unaligned convolutions and a lower bound; mistakes in one line."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import flax.linen as nn
import pytest

from configs import digits
from msff_jax import console
from msff_jax.analysis.plan import kernels, memory, programs, targets
from msff_jax.analysis.plan import run as plan_run
from msff_jax.analysis.plan.beside_measurement import plan_columns

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100 = targets.get_target("h100")
KEYS = ("total", "fusion", "cudnn_conv_forward", "cudnn_conv_backward_input",
        "cudnn_conv_backward_filter", "gemm", "copy", "transpose", "collective")


def tiny_config(**plan):
    """MSFF-EComNet's tiny preset at 32 px in bfloat16: branch widths of 4 channels."""
    config = digits.get_config("tiny")
    config.dtype = "bfloat16"
    for key, value in plan.items():
        config.plan[key] = value
    return config


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("plan1")
    return workdir, plan_run.run(tiny_config(), str(workdir))


def test_plan_files_hold_every_promised_key(one_device):
    workdir, plan = one_device
    saved = json.loads((workdir / "plan.json").read_text())
    assert saved["device"] == "h100" and saved["num_devices"] == 1
    assert set(saved["programs"]) == {"train_step", "eval_step", "export"}
    for name, program in saved["programs"].items():
        assert program["compiled"] is True and program["error"] is None, name
        assert set(program["memory"]) == {"argument_bytes", "output_bytes", "temp_bytes",
                                          "alias_bytes", "peak_bytes"}
        assert program["device_memory_bytes"] == H100.memory_bytes
        assert program["fits"] is True and program["max_global_batch"] is None
        assert set(KEYS) <= set(program["kernels"])
        assert program["kernels"]["total"] == sum(
            v for k, v in program["kernels"].items() if k != "total")
        assert program["flops"] > 0 and program["bytes"] > 0 and program["lower_bound_step_s"] > 0
        assert program["kernels"]["collective"] == 0  # One device: nothing to reduce.
    train = saved["programs"]["train_step"]
    assert train["kernels"]["cudnn_conv_backward_filter"] > 0
    assert train["kernels"]["cudnn_conv_backward_input"] > 0
    assert saved["programs"]["eval_step"]["kernels"]["cudnn_conv_backward_filter"] == 0
    text = (workdir / "plan.md").read_text()
    assert "never a measurement" in text and "## train_step" in text


def test_memory_is_what_memory_analysis_reports(one_device):
    _, plan = one_device
    config = tiny_config()
    devices = programs.compile_only_devices(H100, 1)
    (evaluate,) = programs.build_programs(config, devices, ("eval_step",))
    stats = evaluate.lower(config.eval_batch_size).compile().memory_analysis()
    reported = plan["programs"]["eval_step"]["memory"]
    assert reported["temp_bytes"] == stats.temp_size_in_bytes
    assert reported["argument_bytes"] == stats.argument_size_in_bytes
    assert reported["output_bytes"] == stats.output_size_in_bytes
    assert reported["peak_bytes"] == (stats.argument_size_in_bytes + stats.output_size_in_bytes
                                      - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
    train = plan["programs"]["train_step"]["memory"]
    assert train["alias_bytes"] == 0  # The state is not donated (steps.make_train_step).
    assert train["peak_bytes"] == (train["argument_bytes"] + train["output_bytes"]
                                   - train["alias_bytes"] + train["temp_bytes"])


def test_unaligned_convolutions_are_named_by_layer(one_device):
    _, plan = one_device
    unaligned = plan["programs"]["train_step"]["unaligned_convs"]
    by_layer = {(c["layer"], c["kind"]): c for c in unaligned}
    # branch_3x3: 4 -> 4 channels, 3x3, in all three passes.
    for kind in ("forward", "backward_input", "backward_filter"):
        conv = by_layer[("stage1_block0/msp_conv/branch_3x3/0", kind)]
        assert (conv["in_channels"], conv["out_channels"], conv["kernel"]) == (4, 4, "3x3")
    # The stem's 8/16-channel convolutions are aligned, except the RGB input's 3.
    assert not any(c["layer"].startswith(("stem_1", "stem_2")) for c in unaligned)
    assert ("stem_0/0", "forward") in by_layer


def test_eight_devices_reduce_gradients(tmp_path):
    config = tiny_config(num_devices=8, programs=("train_step",))
    # Class weights come from the data's manifest when training; a plan needs no data.
    config.class_weights, config.data_dir = "balanced", str(tmp_path / "no_data_here")
    plan = plan_run.run(config, str(tmp_path))
    train = plan["programs"]["train_step"]
    assert train["compiled"] and train["num_devices"] == 8
    assert train["kernels"]["collective"] > 0 and train["collective_bytes"] > 0


def test_a_batch_that_does_not_fit_is_answered_with_the_largest_that_does(tmp_path):
    """The eval step (the quickest to compile) with the device's usable memory set between
    its peaks at batch 24 and 25: a batch of 64 is answered with 24, checked by compiling."""
    config = tiny_config(programs=("eval_step",))
    config.eval_batch_size = 64
    devices = programs.compile_only_devices(H100, 1)
    (evaluate,) = programs.build_programs(config, devices, ("eval_step",))
    peak = lambda batch: memory.memory_of(evaluate.lower(batch).compile())["peak_bytes"]  # noqa: E731
    assert peak(25) > peak(24)
    config.plan.memory_fraction = (peak(24) + peak(25)) / 2 / H100.memory_bytes
    plan = plan_run.run(config, str(tmp_path))
    result = plan["programs"]["eval_step"]
    assert result["fits"] is False
    assert result["max_global_batch"] == 24
    assert result["max_global_batch_search"]["exact"] is True
    assert result["max_global_batch_search"]["verified_over"] == 25


def test_search_keeps_to_the_batch_unit():
    """On 8 devices batches are multiples of 8; an affine memory curve is found exactly."""
    calls = []

    def peak_at(batch):
        calls.append(batch)
        return 1000 + 10 * batch

    found = memory.largest_fitting_batch(peak_at, 8, usable=1000 + 10 * 100, known={800: 9000})
    assert found["max_global_batch"] == 96 and found["verified_over"] == 104 and found["exact"]
    assert all(b % 8 == 0 for b in calls) and len(calls) <= 4


def test_nothing_fits():
    found = memory.largest_fitting_batch(lambda b: 10.0 * b, 1, usable=5.0, known={})
    assert found["max_global_batch"] == 0


def test_compiler_refusal_is_one_line_naming_the_program():
    class Refused:
        def compile(self):
            raise RuntimeError("INTERNAL: ptxas exited\nwith lots of detail\n" + "x" * 2000)

    program = programs.Program("eval_step", 8, 1, 1, lambda batch: Refused())
    result = plan_run.plan_program(program, H100, 1e9, search_max_batch=False)
    assert result["compiled"] is False
    assert result["error"].startswith("eval_step does not compile for h100: INTERNAL: ptxas exited")
    assert "\n" not in result["error"] and len(result["error"]) < 600


class Branch(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(41, (3, 3), use_bias=False, dtype=jnp.bfloat16, name="branch")(x)
        return nn.Dense(24, use_bias=False, dtype=jnp.bfloat16, name="head")(x.mean((1, 2)))


def test_kernels_count_flops_and_name_layers():
    """A 3x3 convolution to 41 channels and a dense layer, compiled for an H100: the
    convolution is named by its module and its FLOPs are 2 x outputs x window x inputs."""
    device = programs.compile_only_devices(H100, 1)[0]
    one = jax.sharding.SingleDeviceSharding(device)
    module = Branch()
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 16)))
    variables = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=one), variables)
    images = jax.ShapeDtypeStruct((2, 16, 16, 16), jnp.float32, sharding=one)
    compiled = jax.jit(module.apply).lower(variables, images).compile()
    summary = kernels.analyse(compiled.as_text(), H100, 1)
    assert summary["kernels"]["cudnn_conv_forward"] == 1
    conv_flops = 2 * (2 * 16 * 16 * 41) * 9 * 16
    dense_flops = 2 * 2 * 24 * 41
    assert summary["flops"] == conv_flops + dense_flops
    assert summary["unaligned_convs"] == [{"layer": "branch", "kind": "forward", "in_channels": 16,
                                           "out_channels": 41, "kernel": "3x3"}]
    columns = plan_columns(compiled.as_text(), platform="gpu", device_kind="NVIDIA H100 80GB HBM3",
                           num_devices=1, measured_step_s=1e-3)
    assert columns["plan_kernels"] == summary["kernels"]["total"]
    assert columns["time_over_plan_bound"] == pytest.approx(1e-3 / summary["lower_bound_step_s"])
    assert plan_columns(compiled.as_text(), platform="cpu", device_kind="cpu", num_devices=1,
                        measured_step_s=1e-3)["plan_kernels"] is None


def test_layer_names_drop_transformations_and_the_primitive():
    assert kernels.layer_of("jit(train_step)/transpose(jvp(MSFFNet))/stage1_block0/iasm/spatial/"
                            "conv/conv_general_dilated") == "stage1_block0/iasm/spatial/conv"
    assert kernels.layer_of("jit(eval_step)/MSFFNet/stem_0/0/conv_general_dilated") == "stem_0/0"
    assert kernels.layer_of("jit(train_step)/add") == ""
    assert kernels.phase_of("jit(f)/transpose(jvp(MSFFNet))/x/dot_general") == "backward"
    assert kernels.phase_of("jit(f)/jvp(MSFFNet)/x/dot_general") == "forward"
    assert kernels.phase_of("jit(f)/mul") == "update"


def _launch_plan(tmp_path, *extra, env_changes=None, prelude=""):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(env_changes or {})
    argv = ["launch.py", "--mode", "plan", "--config", "configs/digits.py:tiny",
            "--workdir", str(tmp_path / "w"), *extra]
    script = prelude + f"import sys\nsys.argv = {argv!r}\nfrom msff_jax import main\nmain.run()\n"
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


def _error_line(result) -> str:
    assert result.returncode == console.EXIT_ERROR, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def test_unknown_device_lists_the_known_ones(tmp_path):
    line = _error_line(_launch_plan(tmp_path, "--config.plan.device=h300"))
    assert "config.plan.device='h300'" in line
    for name in targets.TARGETS:
        assert name in line


def test_missing_plugin_names_the_package(tmp_path):
    """JAX's CUDA plugin hidden from the import system, as on a machine without it."""
    hide = (
        "import importlib.abc, sys\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.startswith(('jax_plugins.xla_cuda', 'jax_cuda')):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n")
    line = _error_line(_launch_plan(tmp_path, prelude=hide, env_changes={"JAX_PLATFORMS": "cpu"}))
    assert "jax-cuda12-plugin==" in line and "jax-cuda12-pjrt==" in line
    assert not (tmp_path / "w" / "plan.json").exists()


def test_cpu_programs_print_nothing_of_the_cuda_plugin(tmp_path):
    """With the plugin installed and no GPU, and no JAX_PLATFORMS set by the user, a CPU
    run's console carries no CUDA notice and no plugin traceback."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    result = subprocess.run(
        [sys.executable, "launch.py", "--mode", "summary", "--config", "configs/digits.py:tiny",
         "--workdir", str(tmp_path / "s")], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    for noise in ("cudart_stub", "cuda drivers", "CUDA", "Traceback", "plugin", "absl::InitializeLog"):
        assert noise not in result.stderr, result.stderr[-2000:]
