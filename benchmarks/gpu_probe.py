"""The GPU speed probe: variants of the training step, JAX and PyTorch, in one call.

    python -m benchmarks.gpu_probe --budget_s 480 --out_dir $OUT      # one GPU
    python -m benchmarks.gpu_probe --only targets --out_dir $OUT      # a second call
    python -m benchmarks.gpu_probe --tiny --out_dir /tmp/probe        # CPU check
    python -m benchmarks.gpu_probe --list                             # the rows, in order

A device lease is short and a fresh machine compiles everything from scratch, so the
JAX variants run in this one process, one after another, sharing XLA's in-memory
compilation and autotuning caches: a variant only pays for what differs. Each builds
exactly what training builds (`msff_jax.train`: model, optimizer, state, jitted step,
on-device normalisation) from the benchmark config with the row's model options and
config fields, compiles it ahead of time (XLA options of a variant go to
`Lowered.compile(compiler_options=...)`, so they too need no new process) and times it
like benchmark mode (`analysis.benchmark.timing`: warm-up, `block_until_ready`, median
of repeats). Beside each JAX row measured on a GPU stand the figures of its own compiled
plan (`analysis.plan.beside_measurement`): kernels, GB at kernel boundaries, the lower
bound on step time, and the measured time over that bound; on a CPU they stay empty.
The PyTorch rows (`benchmarks.torch_peers`: the twin's step compiled whole by
`torch.compile`, default and max-autotune; eager last) run in child processes, so a
crash or hang there costs only its own rows, and the JAX process does not preallocate
the GPU's memory (`XLA_PYTHON_CLIENT_PREALLOCATE=false`).

Rows run in `PLAN` order (what decides first) while `--budget_s` lasts; the rest are
listed as not reached, and `--only`/`--skip` run them in a later call. The MSFF-EComNet
default carries a per-kernel profile by kind (convolution forward, input-gradient and
weight-gradient, matmul, reductions, elementwise, copies and transposes, pooling;
`kernel_profile.kernel_kind`) and its top kernels, and so does the fastest MSFF-EComNet
row once the rows that compete are timed (`profile:best`); PyTorch rows are profiled
by PyTorch's profiler. Results: gpu_probe.md (the table, the targets, the profiles;
printed last) and gpu_probe.json (every figure) in `--out_dir`, rewritten after every
item so a run cut short keeps what it measured.
"""

from __future__ import annotations

import os

# Before JAX starts: the PyTorch children need GPU memory this process would hold.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from msff_jax.analysis.benchmark import kernel_profile

REPO = Path(__file__).resolve().parents[1]
MD_NAME, JSON_NAME = "gpu_probe.md", "gpu_probe.json"
KIND_ORDER = kernel_profile.KIND_ORDER
PLAN_COLUMNS = ("plan_kernels", "plan_gb_at_boundaries", "plan_lower_bound_ms", "time_over_plan_bound")
TOP_KERNELS = 10  # Top kernels per profiled row in gpu_probe.md (25 in the JSON).


@dataclasses.dataclass
class Item:
    """One row: a JAX variant (timed here), a PyTorch job (timed in a child process), or
    the profile of the fastest MSFF-EComNet row (framework 'profile')."""

    name: str
    framework: str  # 'jax', 'torch' or 'profile'.
    model: str
    what: str = ""
    overrides: dict = dataclasses.field(default_factory=dict)  # JAX model options.
    config: dict = dataclasses.field(default_factory=dict)  # Config fields, dotted names.
    compiler_options: dict = dataclasses.field(default_factory=dict)  # JAX XLA options.
    torch_mode: str = ""  # 'eager', 'default' or 'max-autotune'.
    torch_group: str = ""  # Jobs of one group share a child process and its time limit.
    infer: bool = False
    profile: bool = False
    baseline: str = ""  # The row this one's training rate is divided by.


ALIGNED = {"channel_alignment": 8, "fuse_pointwise": True}  # The recommended setting's.
UNALIGNED = {"channel_alignment": 1, "fuse_pointwise": False}
# The training step before the four changes the compiled plan asked for: flax's own
# BatchNorm backward, the optimizer bookkeeping leaf by leaf (state donated), IASM's
# 7x7 2->1 convolution through cuDNN, MSP-Conv neither aligned nor fused. Every field is
# set, so the row keeps its meaning when a default changes.
OLD_MODEL = {"batch_norm_backward": "autodiff", "iasm_spatial": "cudnn", **UNALIGNED}
OLD_CONFIG = {"train_step.packed_update": False}
# Each change alone on top of the old step: (model options, config fields).
CHANGES = (
    ("two_pass_bn", "BatchNorm two-pass backward", {"batch_norm_backward": "two_pass"}, {}),
    ("packed_update", "bookkeeping on packed buffers", {}, {"train_step.packed_update": True}),
    ("shifted_iasm", "IASM convolution as shifted multiply-adds", {"iasm_spatial": "shifted"}, {}),
    ("aligned", "channel_alignment=8 + fuse_pointwise", dict(ALIGNED), {}),
)


def _msff(name, what, overrides=None, config=None, compiler_options=None,
          baseline="jax:msff_ecomnet", **kw) -> Item:
    return Item(name, "jax", "msff_ecomnet", what, overrides or {}, config or {},
                compiler_options or {}, baseline=baseline, **kw)


def _torch(model, mode, group, profile=True) -> Item:
    return Item(f"torch:{model}:{mode}", "torch", model, f"PyTorch {mode}", torch_mode=mode,
                torch_group=group, infer=True, profile=profile and model in ("msff_ecomnet", "resnet50"))


PLAN: tuple[Item, ...] = (
    _msff("jax:msff_ecomnet", "defaults: all four changes, aligned and fused (the recommended "
          "setting)", infer=True, profile=True),
    _msff("jax:msff:unaligned", "defaults with channel_alignment=1, fuse_pointwise=False (the "
          "default before the recommended setting)", dict(UNALIGNED)),
    _msff("jax:msff:old_step", "the step before the four changes (autodiff BN, per-leaf "
          "bookkeeping, cuDNN IASM convolution, no alignment)", dict(OLD_MODEL), dict(OLD_CONFIG)),
    Item("jax:resnet50", "jax", "resnet50", "defaults", infer=True, profile=True,
         baseline="jax:resnet50"),
    _msff("jax:msff:old_step+scatter", "the old step with the select-and-scatter max-pool "
          "backward: the step of the H100 record of 2026-11-26",
          {**OLD_MODEL, "max_pool_backward": "scatter"}, dict(OLD_CONFIG), baseline="jax:msff:old_step"),
    *(_msff(f"jax:msff:old+{key}", f"the old step + {words}", {**OLD_MODEL, **model},
            {**OLD_CONFIG, **config}, baseline="jax:msff:old_step")
      for key, words, model, config in CHANGES),
    Item("jax:resnet50:old_step", "jax", "resnet50", "the step before the changes (autodiff BN, "
         "per-leaf bookkeeping)", {"batch_norm_backward": "autodiff"}, dict(OLD_CONFIG),
         baseline="jax:resnet50"),
    _msff("jax:msff:no_command_buffers", "defaults, XLA command buffers (CUDA graphs) off",
          compiler_options={"xla_gpu_enable_command_buffer": ""}),
    Item("profile:best", "profile", "msff_ecomnet",
         "kernel profile of the fastest MSFF-EComNet row (when not the default)"),
    Item("jax:msff_msp", "jax", "msff_msp", "defaults; MSP-Conv without IASM (what IASM costs)",
         baseline="jax:msff_ecomnet"),
    _torch("msff_ecomnet", "default", "msff_compile"),
    _torch("resnet50", "default", "resnet50_compile"),
    _torch("msff_ecomnet", "max-autotune", "msff_autotune"),
    _torch("resnet50", "max-autotune", "resnet50_autotune"),
    _msff("jax:msff:scatter", "defaults + max_pool_backward='scatter'", {"max_pool_backward": "scatter"}),
    Item("jax:mobilenet_v3_large", "jax", "mobilenet_v3_large", "defaults", infer=True,
         baseline="jax:mobilenet_v3_large"),
    Item("jax:efficientnet_b0", "jax", "efficientnet_b0", "defaults", infer=True,
         baseline="jax:efficientnet_b0"),
    _torch("mobilenet_v3_large", "default", "small_models"),
    _torch("efficientnet_b0", "default", "small_models"),
    _torch("msff_ecomnet", "eager", "eager"),
    _torch("resnet50", "eager", "eager"),
    _torch("mobilenet_v3_large", "eager", "small_models_eager"),
    _torch("efficientnet_b0", "eager", "small_models_eager"),
)
MODEL_OF = {item.name: item.model for item in PLAN}
# Names `--only` accepts for a set of rows. The speed targets compare JAX rows with
# PyTorch rows timed in the same run on the same GPU; the twin's compiles are too long
# for both compile modes to fit one call after the rows that decide the defaults.
ROW_SETS = {
    "targets": ("jax:msff_ecomnet", "jax:resnet50", "torch:msff_ecomnet:default",
                "torch:resnet50:default"),
    "autotune": ("jax:msff_ecomnet", "jax:resnet50", "torch:msff_ecomnet:max-autotune",
                 "torch:resnet50:max-autotune"),
}
# The tiny run's PyTorch jobs (one child process, so the test pays one torch import).
TINY_TORCH = {"torch:msff_ecomnet:eager", "torch:msff_ecomnet:default",
              "torch:msff_ecomnet:max-autotune"}
TINY_GROUP = "tiny"
# Seconds a PyTorch group needs at least (below that its compile cannot finish) and may
# take at most, on a GPU. The twin compiles its whole step (forward, backward and
# update); on the H100 of 2026-11-26, compiling the older twin's forward and backward
# alone took 113 s for MSFF-EComNet and 64 s for ResNet-50 (torch.compile default).
GROUP_LIMIT_S = {
    "msff_compile": (150, 300), "resnet50_compile": (90, 200),
    "msff_autotune": (240, 540), "resnet50_autotune": (180, 480),
    "small_models": (90, 300), "eager": (40, 120), "small_models_eager": (40, 120),
    TINY_GROUP: (30, 600),
}
MIN_JAX_S = 25  # A JAX item is not started with less budget left.
MIN_PROFILE_S = 10


# ------------------------------------------------------------------------------ JAX
def set_config_fields(config, fields: dict) -> None:
    """Sets dotted config fields (`train_step.packed_update`); a name the config does not
    have is an error, never a new field that nothing reads."""
    for dotted, value in fields.items():
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            if part not in node:
                raise KeyError(f"config has no field {dotted!r} (no {part!r})")
            node = node[part]
        if leaf not in node:
            raise KeyError(f"config has no field {dotted!r}")
        node[leaf] = value


def unsupported_options(item: Item) -> Optional[str]:
    """Why this checkout cannot build the row's model with its options (an option the
    model code does not have yet), or None. Checked before anything is compiled."""
    from msff_jax.models import get_model

    try:
        get_model(item.model, 15, **item.overrides)
    except (ValueError, TypeError) as error:
        return " ".join(str(error).split()).split("; accepted:")[0]  # Not the whole list.
    return None


class JaxRunner:
    """Builds and times training and inference steps in this process."""

    def __init__(self, args):
        import jax

        from msff_jax.train import mesh as mesh_lib

        self.args = args
        self.jax = jax
        self.mesh = mesh_lib.make_mesh((-1, 1))
        self.sharding = mesh_lib.batch_sharding(self.mesh)
        self.device = self.mesh.devices.flat[0]
        # The fastest MSFF-EComNet row timed without a profile: its name, rate and
        # `run_train`, kept (one compiled step and state) for `profile:best`.
        self.kept: Optional[tuple[str, float, Callable]] = None

    def config(self, item: Item):
        """Benchmark mode's config for the row's model: that model's own default options
        (`configs/default.py:MODEL`; MSFF models are aligned and fused), the tiny preset
        on a CPU, then the row's options and config fields."""
        from configs import benchmark as benchmark_config
        from configs import default as default_config
        from msff_jax.models import TINY_OVERRIDES
        from msff_jax.train.config_model import plain

        config = benchmark_config.get_config("cpu_tiny" if self.args.tiny else "")
        config.model = item.model
        overrides = dict(plain(default_config.get_config(item.model).model_overrides) or {})
        if self.args.tiny:
            overrides.update(TINY_OVERRIDES[item.model])
        overrides.update(item.overrides)
        config.model_overrides = overrides
        set_config_fields(config, item.config)
        return config

    def run(self, item: Item, scratch: Path) -> dict[str, Any]:
        from msff_jax.analysis.benchmark import run as benchmark_run
        from msff_jax.analysis.benchmark import timing
        from msff_jax.models import count_params
        from msff_jax.train import optimizers, steps
        from msff_jax.train import state as train_state

        jax, args = self.jax, self.args
        config = self.config(item)
        model = train_state.build_model(config)
        tx = optimizers.make_optimizer(config, 1000)  # The schedule's length changes no work.
        state = train_state.create_train_state(config, model, tx, self.mesh, jax.random.PRNGKey(0))
        result: dict[str, Any] = {"model": item.model, "params_m": count_params({"params": state.params}) / 1e6,
                                  "batch_size": config.batch_size, "dtype": config.dtype,
                                  "image_size": config.image_size,
                                  "packed_update": steps.packs_update(config)}
        options = dict(item.compiler_options) or None
        batch = benchmark_run._synthetic_batch(config, config.batch_size, self.sharding, seed=0)
        start = time.perf_counter()
        compiled = steps.make_train_step(config, model, tx, self.mesh).lower(state, batch).compile(options)
        result["compile_s"] = time.perf_counter() - start
        result["train_memory_gb"] = (timing.compiled_memory_bytes(compiled) or 0) / 1e9 or None
        holder = {"state": state}
        del state  # The step may donate it: only `holder` may refer to the live buffers.

        def run_train(count: int):
            for _ in range(count):
                holder["state"], metrics = compiled(holder["state"], batch)
            return holder["state"], metrics

        seconds, repeats = timing.time_per_step(
            run_train, warmup_steps=args.warmup_steps, timed_steps=args.timed_steps,
            repeats=args.repeats)
        benchmark_run._check_finite_loss(run_train, item.name)
        result.update(train_img_s=config.batch_size / seconds, train_ms=1e3 * seconds,
                      train_ms_per_repeat=[1e3 * s for s in repeats])
        result.update(self.plan_figures(compiled, seconds))
        if item.profile and args.profile_steps:
            result["profile"] = self.profile(run_train, scratch / "trace" / item.name)
        elif item.model == "msff_ecomnet" and (self.kept is None or result["train_img_s"] > self.kept[1]):
            self.kept = (item.name, result["train_img_s"], run_train)
        if item.infer:
            variables = holder["state"].eval_variables()
            infer_batch = benchmark_run._synthetic_batch(config, config.benchmark.infer_batch_size,
                                                         self.sharding, seed=1)
            forward = steps.make_eval_step(config, model, self.mesh).lower(
                variables, infer_batch).compile(options)

            def run_infer(count: int):
                return [forward(variables, infer_batch) for _ in range(count)]

            infer_s, _ = timing.time_per_step(
                run_infer, warmup_steps=args.warmup_steps, timed_steps=args.timed_steps,
                repeats=args.repeats)
            batch_size = config.benchmark.infer_batch_size
            result.update(infer_img_s=batch_size / infer_s, infer_ms=1e3 * infer_s)
        result["allocator_peak_gb"] = (timing.allocator_peak_bytes(self.device) or 0) / 1e9 or None
        return result

    def plan_figures(self, compiled, measured_step_s: float) -> dict[str, Any]:
        """The compiled plan's figures of the step just timed (GPU only; empty elsewhere).
        A plan the analysis cannot read costs its columns, not the row."""
        from msff_jax.analysis.plan.beside_measurement import plan_columns

        platform = self.device.platform
        try:
            return plan_columns(compiled.as_text() if platform == "gpu" else None, platform=platform,
                                device_kind=self.device.device_kind, num_devices=self.mesh.size,
                                measured_step_s=measured_step_s)
        except Exception as error:  # noqa: BLE001: the timing stands without the plan
            traceback.print_exc()
            return {**dict.fromkeys(PLAN_COLUMNS),
                    "plan_error": f"{type(error).__name__}: {str(error)[:200]}"}

    def profile(self, run_train: Callable, trace_dir: Path) -> dict[str, Any]:
        trace = kernel_profile.trace_steps(run_train, self.args.profile_steps, trace_dir)
        return kernel_profile.summarise_trace(
            trace, self.args.profile_steps, expect_device=self.device.platform != "cpu",
            classify=kernel_profile.kernel_kind)

    def profile_best(self, results: dict[str, dict], scratch: Path) -> dict[str, Any]:
        """Profiles the fastest MSFF-EComNet row measured so far, unless it has its profile."""
        name = fastest_row(results, "jax", "msff_ecomnet")
        if name is None:
            return {"status": "no MSFF-EComNet row measured: nothing to profile"}
        if results[name].get("profile"):
            return {"status": f"ok: the fastest row, {name}, has its profile", "row": name}
        if self.kept is None or self.kept[0] != name:
            return {"status": f"failed: the step of {name} was not kept"}
        results[name]["profile"] = self.profile(self.kept[2], scratch / "trace" / name)
        self.kept = None
        return {"status": f"ok: profiled {name}", "row": name}

    def environment(self) -> dict[str, Any]:
        jax = self.jax
        return {"jax": jax.__version__, "device": self.device.device_kind,
                "platform": self.device.platform, "device_count": self.mesh.size,
                "xla_flags": os.environ.get("XLA_FLAGS", "")}


# ---------------------------------------------------------------------------- torch
def torch_child(spec_json: str) -> int:
    """Child process: the PyTorch jobs of one group, one JSON line each to spec['out']."""
    import torch

    from benchmarks import msff_torch, torch_peers
    from msff_jax.models import TINY_OVERRIDES

    spec = json.loads(spec_json)
    tiny = spec["tiny"]
    if tiny:
        torch.set_num_threads(1)  # Two OpenMP threads on a shared 2-core machine spin-wait.
        twin_tiny = {k: v for k, v in TINY_OVERRIDES["msff_ecomnet"].items()}
        torch_peers.MODEL_BUILDERS["msff_ecomnet"] = (
            lambda n: msff_torch.build_twin("msff_ecomnet", n, **twin_tiny))
    for job in spec["jobs"]:
        mode = job["mode"]
        argv = ["--models", job["model"], "--num_classes", "15"]
        if tiny:
            argv += ["--batch_size", "4", "--image_size", "32", "--warmup", "1", "--steps", "2",
                     "--repeats", "2", "--dtype", "float32", "--device", "cpu",
                     "--compile_backend", "eager"]  # Checks the plumbing; inductor on a CPU takes minutes.
        else:
            argv += ["--batch_size", "256", "--image_size", "224", "--warmup", "5", "--steps", "15",
                     "--repeats", "3", "--dtype", "bfloat16"]
        if mode == "max-autotune":
            argv += ["--compile_mode", "max-autotune"]
        args = torch_peers.parse_args(argv)
        device = torch.device(args.device)
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        torch.backends.cudnn.benchmark = True
        profile: dict[str, Any] = {}

        def after_timing(train_step, infer_step):
            del infer_step
            if job["profile"] and spec["profile_steps"]:
                profile.update(profile_torch(train_step, device, spec["profile_steps"]))

        record: dict[str, Any] = {"name": job["name"]}
        try:
            start = time.perf_counter()
            row = torch_peers.benchmark_model(
                job["model"], compile_model=mode != "eager", args=args, device=device,
                device_name=device_name, after_timing=after_timing)
            record.update(row=row, wall_s=time.perf_counter() - start, profile=profile or None,
                          torch=torch.__version__)
        except Exception as error:  # noqa: BLE001: one failure must not stop the group
            traceback.print_exc()
            record["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        with open(spec["out"], "a") as out:
            out.write(json.dumps(record, default=str) + "\n")
        print(f"gpu_probe torch job {job['name']}: {record.get('error', 'done')}", flush=True)
    return 0


def profile_torch(train_step, device, steps: int) -> dict[str, Any]:
    """PyTorch's profiler over `steps` train steps: device kernels on a GPU, aten ops
    (self time) on a CPU; summarised like the JAX traces."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            train_step()
        if cuda:
            torch.cuda.synchronize(device)
    by_name: dict[str, list[float]] = {}
    for event in prof.key_averages():
        if cuda:
            if str(getattr(event, "device_type", "")).split(".")[-1] != "CUDA":
                continue
            us = getattr(event, "self_device_time_total", None)
            if us is None:
                us = event.self_cuda_time_total
        else:
            if not event.key.startswith("aten::"):
                continue
            us = event.self_cpu_time_total
        if us > 0:
            by_name[event.key] = [us / 1e3, event.count]
    summary = kernel_profile.summarise_kernels(by_name, steps, classify=kernel_profile.kernel_kind)
    summary["source"] = "device" if cuda else "host (aten ops)"
    return summary


def run_torch_group(group: str, items: list[Item], args, limit_s: float, scratch: Path) -> dict[str, dict]:
    out = scratch / f"torch_{group}.jsonl"
    spec = {"tiny": args.tiny, "out": str(out), "profile_steps": args.profile_steps,
            "jobs": [{"name": i.name, "model": i.model, "mode": i.torch_mode, "profile": i.profile}
                     for i in items]}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    stopped = None
    try:
        subprocess.run([sys.executable, "-m", "benchmarks.gpu_probe", "--torch_child", json.dumps(spec)],
                       cwd=REPO, env=env, timeout=limit_s, check=False)
    except subprocess.TimeoutExpired:
        stopped = f"stopped at the group's {limit_s:.0f}s limit"
    records = {}
    if out.exists():
        for line in out.read_text().splitlines():
            record = json.loads(line)
            records[record["name"]] = record
    results = {}
    for item in items:
        record = records.get(item.name)
        if record is None:
            results[item.name] = {"status": stopped or "no result (the child process failed; see the log)"}
        elif "error" in record:
            results[item.name] = {"status": f"failed: {record['error']}"}
        else:
            results[item.name] = _torch_result(record)
    return results


def _torch_result(record: dict) -> dict[str, Any]:
    row = record["row"]

    def number(key):
        value = row.get(key)
        return float(value) if value not in (None, "") else None

    return {"status": "ok", "train_img_s": number("train_samples_per_sec"),
            "train_ms": number("train_step_time"), "infer_img_s": number("infer_samples_per_sec"),
            "infer_ms": number("infer_step_time"), "compile_s": number("compile_s"),
            "params_m": number("param_count"), "batch_size": number("train_batch_size"),
            "dtype": row.get("dtype"), "device": row.get("device"), "torch": record.get("torch"),
            "profile": record.get("profile"), "wall_s": record.get("wall_s")}


# ------------------------------------------------------------------------- choosing
def fastest_row(results: dict[str, dict], framework: str, model: str,
                key: str = "train_img_s") -> Optional[str]:
    """The name of the fastest measured row of `framework` ('jax', 'torch') for `model`."""
    rows = [(r[key], name) for name, r in results.items()
            if isinstance(r, dict) and r.get(key) and name.startswith(framework + ":")
            and MODEL_OF.get(name) == model]
    return max(rows)[1] if rows else None


def select_rows(args) -> list[Item]:
    """The plan's rows this call runs, in plan order (copies)."""
    only = None
    if args.only is not None:
        only = set()
        for name in args.only:
            only.update(ROW_SETS.get(name, (name,)))
    return [dataclasses.replace(item) for item in PLAN
            if (only is None or item.name in only) and item.name not in args.skip
            and not (args.no_torch and item.framework == "torch")
            and not (args.tiny and item.framework == "torch" and item.name not in TINY_TORCH)]


def torch_group(item: Item, args) -> str:
    return TINY_GROUP if args.tiny else item.torch_group


# ---------------------------------------------------------------------------- table
def _fmt(value, spec=",.1f") -> str:
    return "" if value is None else format(value, spec)


GPU_PLATFORMS = ("gpu", "cuda", "rocm")  # What jax.Device.platform says for a GPU.


def render(results: dict[str, dict], plan: list[Item], environment: dict, args) -> str:
    lines = [f"# GPU probe: {environment.get('device', '?')} ({environment.get('platform', '?')}), "
             f"JAX {environment.get('jax', '?')}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             "", f"Training step of the default recipe (batch {results.get('_batch', '?')}, "
             f"{'tiny models, 32 px, float32, CPU' if args.tiny else '224 px, bfloat16'}); "
             "median of repeats; inference batch as benchmark mode. The plan columns are the "
             "figures of each JAX row's own compiled step (`--mode plan`'s analysis): kernels "
             "launched, GB at kernel boundaries, the lower bound on step time (an estimate "
             "from the plan) and the measured time over it; empty where no GPU ran the row.", "",
             "| row | model | what | train img/s | ms/step | vs baseline | infer img/s | infer ms | "
             "compile s | step GB | plan kernels | plan GB | plan bound ms | measured / bound | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for item in plan:
        r = results.get(item.name)
        if r is None:
            continue
        base = results.get(item.baseline, {}).get("train_img_s") if item.baseline else None
        ratio = (f"{r['train_img_s'] / base:.3f}x" if base and r.get("train_img_s")
                 and item.baseline != item.name else "")
        what = r.get("what", item.what)
        if ratio:
            what += f" (vs {item.baseline})"
        lines.append(
            f"| {item.name} | {item.model} | {what} | {_fmt(r.get('train_img_s'))} | "
            f"{_fmt(r.get('train_ms'), '.2f')} | {ratio} | {_fmt(r.get('infer_img_s'))} | "
            f"{_fmt(r.get('infer_ms'), '.2f')} | {_fmt(r.get('compile_s'), '.1f')} | "
            f"{_fmt(r.get('train_memory_gb'), '.2f')} | {_fmt(r.get('plan_kernels'), ',d')} | "
            f"{_fmt(r.get('plan_gb_at_boundaries'), '.1f')} | {_fmt(r.get('plan_lower_bound_ms'), '.2f')} | "
            f"{_fmt(r.get('time_over_plan_bound'), '.2f')} | {r.get('status', '')} |")
    on_gpu = environment.get("platform") in GPU_PLATFORMS and not args.tiny
    lines += ["", "## Targets", "", *targets(results, verdicts=on_gpu), ""]
    profiled = [(item.name, results[item.name]["profile"]) for item in plan
                if results.get(item.name, {}).get("profile")]
    if profiled:
        lines += ["## Kernel time per training step by kind (ms; share)", "",
                  "| row | source | kernels ms/step | launches/step | "
                  + " | ".join(KIND_ORDER) + " |", "|---|---|---|---|" + "---|" * len(KIND_ORDER)]
        for name, p in profiled:
            kinds = {k["kind"]: k for k in p["kinds"]}
            cells = [f"{kinds[k]['ms_per_step']:.2f} ({100 * kinds[k]['share']:.0f}%)" if k in kinds else ""
                     for k in KIND_ORDER]
            lines.append(f"| {name} | {p.get('source', '')} | {p['kernel_ms_per_step']:.2f} | "
                         f"{p['launches_per_step']:.0f} | " + " | ".join(cells) + " |")
        lines += ["", "Profiled steps may launch kernels one by one where timed ones replay CUDA "
                  "graphs.", "", f"## Top {TOP_KERNELS} kernels of each profiled row", "",
                  "| row | kernel | kind | ms/step | launches/step | share |", "|---|---|---|---|---|---|"]
        for name, p in profiled:
            for k in p.get("top_kernels", [])[:TOP_KERNELS]:
                kernel = k["name"].replace("|", "/")
                kernel = kernel if len(kernel) <= 80 else kernel[:77] + "..."
                lines.append(f"| {name} | `{kernel}` | {k['kind']} | {k['ms_per_step']:.3f} | "
                             f"{k['launches_per_step']:.1f} | {100 * k['share']:.1f}% |")
        lines += ["", "The top 25 of each are in gpu_probe.json.", ""]
    return "\n".join(lines) + "\n"


def targets(results: dict[str, dict], verdicts: bool = True) -> list[str]:
    """Issue 21's GPU targets, each PASS/FAIL with its figures, or 'not measured'. The
    best JAX row of a model counts (every row is a setting a user can choose). Without
    `verdicts` (rows not measured on a GPU at full size, as in the CPU rehearsal) the
    figures stand without PASS or FAIL: they say nothing about a GPU target."""
    lines = []

    def best(framework, model, key="train_img_s"):
        name = fastest_row(results, framework, model, key)
        return (results[name][key], name) if name else (None, "")

    def check(label, mine, peer, factor):
        (a, a_name), (b, b_name) = mine, peer
        if a is None or b is None:
            lines.append(f"- {label}: not measured ({a_name or 'no JAX row'} / {b_name or 'no peer row'})")
            return
        verdict = ("PASS" if a >= factor * b else "FAIL") if verdicts else "no verdict (not a GPU)"
        lines.append(f"- {label}: {verdict}: {a:,.1f} ({a_name}) vs {b:,.1f} ({b_name}) = "
                     f"{a / b:.3f}x, target >= {factor:g}x")

    check("MSFF-EComNet JAX train >= 1.1x fastest PyTorch twin", best("jax", "msff_ecomnet"),
          best("torch", "msff_ecomnet"), 1.1)
    check("MSFF-EComNet JAX train > JAX ResNet-50", best("jax", "msff_ecomnet"),
          best("jax", "resnet50"), 1.0 + 1e-9)
    check("ResNet-50 JAX train >= 1.1x fastest PyTorch", best("jax", "resnet50"),
          best("torch", "resnet50"), 1.1)
    for model in ("msff_ecomnet", "resnet50", "mobilenet_v3_large", "efficientnet_b0"):
        check(f"{model} JAX inference no slower than fastest PyTorch",
              best("jax", model, "infer_img_s"), best("torch", model, "infer_img_s"), 1.0)
    return lines


# ----------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_probe")))
    parser.add_argument("--budget_s", type=float, default=480.0)
    parser.add_argument("--tiny", action="store_true", help="tiny models, 32 px, on the CPU")
    parser.add_argument("--only", nargs="*", default=None,
                        help=f"run only these rows (names as in the table, or {sorted(ROW_SETS)})")
    parser.add_argument("--skip", nargs="*", default=(), help="leave these rows out")
    parser.add_argument("--no_torch", action="store_true")
    parser.add_argument("--list", action="store_true", help="print the rows in plan order and exit")
    parser.add_argument("--warmup_steps", type=int, default=None)
    parser.add_argument("--timed_steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--profile_steps", type=int, default=3)
    parser.add_argument("--torch_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_child:
        return torch_child(args.torch_child)
    defaults = (1, 2, 2) if args.tiny else (5, 15, 3)
    for field, value in zip(("warmup_steps", "timed_steps", "repeats"), defaults):
        if getattr(args, field) is None:
            setattr(args, field, value)
    known = {item.name for item in PLAN}
    unknown = sorted((set(args.only or ()) - set(ROW_SETS) | set(args.skip)) - known)
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {sorted(known)} and the sets {sorted(ROW_SETS)}")
    plan = select_rows(args)
    if args.list:
        for index, item in enumerate(plan, 1):
            settings = {**item.overrides, **item.config, **item.compiler_options}
            print(f"{index:2d}. {item.name}: {item.what}" + (f" {settings}" if settings else ""))
        return 0

    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    runner = JaxRunner(args)
    environment = runner.environment()
    results: dict[str, dict] = {}
    print(f"=== gpu_probe: {len(plan)} rows, budget {args.budget_s:.0f}s, {environment}", flush=True)

    def write():
        results["_batch"] = results.get("_batch")
        (args.out_dir / JSON_NAME).write_text(json.dumps(
            {"environment": environment, "args": {k: str(v) for k, v in vars(args).items()},
             "rows": {k: v for k, v in results.items() if not k.startswith("_")},
             "plan": [dataclasses.asdict(i) for i in plan]}, indent=1, default=str))
        (args.out_dir / MD_NAME).write_text(render(results, plan, environment, args))

    def not_reached(left: float) -> dict:
        return {"status": f"not reached ({left:.0f}s of the budget left)"}

    done: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="gpu_probe_") as scratch:
        for item in plan:
            if item.name in done:
                continue
            left = args.budget_s - (time.perf_counter() - start)
            if item.framework == "torch":
                group = torch_group(item, args)
                members = [i for i in plan if i.framework == "torch" and torch_group(i, args) == group
                           and i.name not in done]
                need_s, limit_s = GROUP_LIMIT_S[group]
                limit = min(limit_s, left)
                done.update(i.name for i in members)
                reported = [i.name for i in members]
                if limit < need_s:
                    results.update({i.name: not_reached(left) for i in members})
                else:
                    print(f"=== torch group {group}: {[i.name for i in members]} (limit {limit:.0f}s)",
                          flush=True)
                    results.update(run_torch_group(group, members, args, limit, Path(scratch)))
            elif item.framework == "profile":
                done.add(item.name)
                reported = [item.name]
                if left < MIN_PROFILE_S:
                    results[item.name] = not_reached(left)
                else:
                    try:
                        results[item.name] = runner.profile_best(results, Path(scratch))
                    except Exception as error:  # noqa: BLE001: the rows stand without it
                        traceback.print_exc()
                        results[item.name] = {"status": f"failed: {type(error).__name__}: {str(error)[:200]}"}
            else:
                done.add(item.name)
                reported = [item.name]
                if left < MIN_JAX_S:
                    results[item.name] = not_reached(left)
                    continue
                print(f"=== {item.name}: {item.what}", flush=True)
                item_start = time.perf_counter()
                reason = unsupported_options(item)
                if reason:
                    result = {"status": f"failed: this checkout cannot build it: {reason[:200]}"}
                else:
                    try:
                        result = runner.run(item, Path(scratch))
                        result["status"] = "ok"
                        results["_batch"] = result["batch_size"]
                    except Exception as error:  # noqa: BLE001: one variant must not stop the others
                        traceback.print_exc()
                        result = {"status": f"failed: {type(error).__name__}: {str(error)[:200]}"}
                result["status"] = result["status"].replace("|", "/")
                result["what"] = item.what
                result["wall_s"] = time.perf_counter() - item_start
                results[item.name] = result
            for name in reported:
                r = results[name]
                rates = "".join(f" {label} {_fmt(r[key])} img/s" for label, key in
                                (("train", "train_img_s"), ("infer", "infer_img_s")) if r.get(key))
                print(f"=== {name}: {r.get('status')}{rates} ({time.perf_counter() - start:.0f}s)", flush=True)
            write()
    write()
    print(f"=== gpu_probe done in {time.perf_counter() - start:.0f}s; {args.out_dir}\n", flush=True)
    print((args.out_dir / MD_NAME).read_text())
    measured = [k for k, v in results.items() if not k.startswith("_") and v.get("train_img_s")]
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
