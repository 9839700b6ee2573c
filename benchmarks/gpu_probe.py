"""The GPU speed probe: many variants of the training step, JAX and PyTorch, one call.

    python -m benchmarks.gpu_probe --budget_s 420 --out_dir $OUT      # one GPU
    python -m benchmarks.gpu_probe --tiny --out_dir /tmp/probe        # CPU check

A device lease is short and a fresh machine compiles everything from scratch, so the
JAX variants run in this one process, one after another, sharing XLA's in-memory
compilation and autotuning caches: a variant only pays for what differs. Each builds
exactly what training builds (`msff_jax.train`: model, optimizer, state, jitted step
with donated state, on-device normalisation), compiles it ahead of time (XLA options of
a variant go to `Lowered.compile(compiler_options=...)`, so they too need no new
process) and times it like benchmark mode (`analysis.benchmark.timing`: warm-up,
`block_until_ready`, median of repeats). The PyTorch rows (`benchmarks.torch_peers`:
eager, `torch.compile` default and max-autotune; the fastest is the peer to beat) run in
child processes, so a crash or hang there costs only its own rows, and the JAX process
does not preallocate the GPU's memory (`XLA_PYTHON_CLIENT_PREALLOCATE=false`).

Items run in `PLAN` order (what the targets need first) while `--budget_s` lasts; the
rest are listed as not reached, and `--only`/`--skip` run them in a later call. The
option variants that beat the baseline by more than `--win_margin` are then timed
together ("winners"). Selected rows carry a per-kernel profile by kind (convolution
forward, input-gradient and weight-gradient, matmul, reductions, elementwise, copies and
transposes, pooling; `kernel_profile.kernel_kind`), from JAX's profiler trace or PyTorch's
profiler. Results: gpu_probe.md (the table, the targets, the profiles; printed last)
and gpu_probe.json (every figure) in `--out_dir`, rewritten after every item so a run
cut short keeps what it measured.
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
from typing import Any, Optional

from msff_jax.analysis.benchmark import kernel_profile

REPO = Path(__file__).resolve().parents[1]
MD_NAME, JSON_NAME = "gpu_probe.md", "gpu_probe.json"
KIND_ORDER = kernel_profile.KIND_ORDER

@dataclasses.dataclass
class Item:
    """One row: a JAX variant (timed here) or a PyTorch job (timed in a child process)."""

    name: str
    framework: str  # 'jax' or 'torch'
    model: str
    what: str = ""
    overrides: dict = dataclasses.field(default_factory=dict)  # JAX module options.
    compiler_options: dict = dataclasses.field(default_factory=dict)  # JAX XLA options.
    torch_mode: str = ""  # 'eager', 'default' or 'max-autotune'.
    torch_group: str = ""  # Jobs of one group share a child process and its time limit.
    infer: bool = False
    profile: bool = False
    baseline: str = ""  # The row this one's training rate is divided by.
    option: str = ""  # The speed option it tries alone, for the winners.


def _msff(name, what, overrides=None, compiler_options=None, option="", **kw) -> Item:
    return Item(name, "jax", "msff_ecomnet", what, overrides or {}, compiler_options or {},
                baseline="jax:msff_ecomnet", option=option, **kw)


def _torch(model, mode, group, profile=True) -> Item:
    return Item(f"torch:{model}:{mode}", "torch", model, f"PyTorch {mode}", torch_mode=mode,
                torch_group=group, infer=True, profile=profile and model in ("msff_ecomnet", "resnet50"))


PLAN: tuple[Item, ...] = (
    Item("jax:msff_ecomnet", "jax", "msff_ecomnet", "defaults (as benchmark mode)", infer=True,
         profile=True, baseline="jax:msff_ecomnet"),
    Item("jax:resnet50", "jax", "resnet50", "defaults", infer=True, profile=True,
         baseline="jax:resnet50"),
    _torch("msff_ecomnet", "eager", "eager"),
    _torch("resnet50", "eager", "eager"),
    _torch("msff_ecomnet", "default", "compile"),
    _torch("resnet50", "default", "compile"),
    _msff("jax:msff:scatter", "max_pool_backward='scatter'", {"max_pool_backward": "scatter"},
          option="max_pool_backward", profile=True),
    _msff("jax:msff:fuse_pointwise", "fuse_pointwise=True", {"fuse_pointwise": True},
          option="fuse_pointwise"),
    _msff("jax:msff:align8", "channel_alignment=8", {"channel_alignment": 8}, option="channel_alignment"),
    _msff("jax:msff:align16", "channel_alignment=16", {"channel_alignment": 16}, option="channel_alignment"),
    _msff("jax:msff:align32", "channel_alignment=32", {"channel_alignment": 32}, option="channel_alignment"),
    _msff("jax:msff:no_triton_gemm", "XLA xla_gpu_enable_triton_gemm=False", None,
          {"xla_gpu_enable_triton_gemm": False}, option="xla_gpu_enable_triton_gemm"),
    # Placeholder: the winners' options are filled in when the plan reaches it.
    _msff("jax:msff:winners", "the options that won, together", infer=True, profile=True),
    _torch("msff_ecomnet", "max-autotune", "autotune"),
    _torch("resnet50", "max-autotune", "autotune"),
    Item("jax:mobilenet_v3_large", "jax", "mobilenet_v3_large", "defaults", infer=True,
         baseline="jax:mobilenet_v3_large"),
    Item("jax:efficientnet_b0", "jax", "efficientnet_b0", "defaults", infer=True,
         baseline="jax:efficientnet_b0"),
    _torch("mobilenet_v3_large", "eager", "small_models"),
    _torch("efficientnet_b0", "eager", "small_models"),
    _torch("mobilenet_v3_large", "default", "small_models"),
    _torch("efficientnet_b0", "default", "small_models"),
    Item("jax:resnet50:scatter", "jax", "resnet50", "max_pool_backward='scatter'",
         {"max_pool_backward": "scatter"}, baseline="jax:resnet50"),
)
TINY_SKIP = {"jax:msff:no_triton_gemm"}  # A GPU option: the CPU compiler rejects it.
# The tiny run's PyTorch jobs: one group, so the test pays one torch import.
TINY_TORCH = {"torch:msff_ecomnet:eager", "torch:msff_ecomnet:default",
              "torch:msff_ecomnet:max-autotune"}
# Seconds a PyTorch group may take at most (GPU); a tiny run scales by TINY_SCALE.
GROUP_LIMIT_S = {"eager": 60, "compile": 150, "autotune": 240, "small_models": 150}
TINY_SCALE = 3
MIN_JAX_S = 25  # A JAX item is not started with less budget left.
MIN_TORCH_S = 30


# ------------------------------------------------------------------------------ JAX
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

    def config(self, item: Item):
        from configs import benchmark as benchmark_config
        from msff_jax.models import TINY_OVERRIDES

        config = benchmark_config.get_config("cpu_tiny" if self.args.tiny else "")
        config.model = item.model
        overrides = dict(TINY_OVERRIDES[item.model]) if self.args.tiny else {}
        overrides.update(item.overrides)
        config.model_overrides = overrides
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
        result: dict[str, Any] = {"params_m": count_params({"params": state.params}) / 1e6,
                                  "batch_size": config.batch_size, "dtype": config.dtype,
                                  "image_size": config.image_size}
        options = dict(item.compiler_options) or None
        batch = benchmark_run._synthetic_batch(config, config.batch_size, self.sharding, seed=0)
        start = time.perf_counter()
        compiled = steps.make_train_step(config, model, tx, self.mesh).lower(state, batch).compile(options)
        result["compile_s"] = time.perf_counter() - start
        result["train_memory_gb"] = (timing.compiled_memory_bytes(compiled) or 0) / 1e9 or None
        holder = {"state": state}
        del state  # Donated by the step: only `holder` may refer to the live buffers.

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
        if item.profile and args.profile_steps:
            trace = kernel_profile.trace_steps(run_train, args.profile_steps, scratch / "trace" / item.name)
            result["profile"] = kernel_profile.summarise_trace(
                trace, args.profile_steps, expect_device=self.device.platform != "cpu",
                classify=kernel_profile.kernel_kind)
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


def run_torch_group(items: list[Item], args, limit_s: float, scratch: Path) -> dict[str, dict]:
    out = scratch / f"torch_{items[0].torch_group}.jsonl"
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


# -------------------------------------------------------------------------- winners
def winners(results: dict[str, dict], plan: list[Item], margin: float) -> tuple[dict, dict, list[str]]:
    """The options whose variant beat the MSFF baseline by more than `margin`, best value
    of each option; returns (module overrides, XLA options, names of the winning rows)."""
    base = results.get("jax:msff_ecomnet", {}).get("train_img_s")
    best: dict[str, tuple[float, Item]] = {}
    for item in plan:
        rate = results.get(item.name, {}).get("train_img_s")
        if not (item.option and base and rate) or rate <= base * (1 + margin):
            continue
        if item.option not in best or rate > best[item.option][0]:
            best[item.option] = (rate, item)
    overrides, compiler_options = {}, {}
    for _, item in best.values():
        overrides.update(item.overrides)
        compiler_options.update(item.compiler_options)
    return overrides, compiler_options, sorted(item.name for _, item in best.values())


# ---------------------------------------------------------------------------- table
def _fmt(value, spec=",.1f") -> str:
    return "" if value is None else format(value, spec)


def render(results: dict[str, dict], plan: list[Item], environment: dict, args) -> str:
    lines = [f"# GPU probe: {environment.get('device', '?')} ({environment.get('platform', '?')}), "
             f"JAX {environment.get('jax', '?')}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             "", f"Training step of the default recipe (batch {results.get('_batch', '?')}, "
             f"{'tiny models, 32 px, float32, CPU' if args.tiny else '224 px, bfloat16'}); "
             "median of repeats; inference batch as benchmark mode.", "",
             "| row | model | what | train img/s | ms/step | vs baseline | infer img/s | infer ms | "
             "compile s | step GB | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for item in plan:
        r = results.get(item.name)
        if r is None:
            continue
        base = results.get(item.baseline, {}).get("train_img_s") if item.baseline else None
        ratio = (f"{r['train_img_s'] / base:.3f}x" if base and r.get("train_img_s")
                 and item.baseline != item.name else "")
        what = r.get("what", item.what)
        lines.append(
            f"| {item.name} | {item.model} | {what} | {_fmt(r.get('train_img_s'))} | "
            f"{_fmt(r.get('train_ms'), '.2f')} | {ratio} | {_fmt(r.get('infer_img_s'))} | "
            f"{_fmt(r.get('infer_ms'), '.2f')} | {_fmt(r.get('compile_s'), '.1f')} | "
            f"{_fmt(r.get('train_memory_gb'), '.2f')} | {r.get('status', '')} |")
    lines += ["", "## Targets", "", *targets(results), ""]
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
        lines += ["", "Top kernels of each profiled row are in gpu_probe.json. Profiled steps "
                  "may launch kernels one by one where timed ones replay CUDA graphs.", ""]
    return "\n".join(lines) + "\n"


def _best(results: dict[str, dict], prefix: str, key: str) -> tuple[Optional[float], str]:
    rows = [(r[key], name) for name, r in results.items()
            if name.startswith(prefix) and isinstance(r, dict) and r.get(key)]
    return max(rows) if rows else (None, "")


def targets(results: dict[str, dict]) -> list[str]:
    """Issue 11's targets, each PASS/FAIL with its figures, or 'not measured'."""
    lines = []

    def check(label, mine, peer, factor):
        (a, a_name), (b, b_name) = mine, peer
        if a is None or b is None:
            lines.append(f"- {label}: not measured ({a_name or 'no JAX row'} / {b_name or 'no peer row'})")
            return
        verdict = "PASS" if a >= factor * b else "FAIL"
        lines.append(f"- {label}: {verdict}: {a:,.1f} ({a_name}) vs {b:,.1f} ({b_name}) = "
                     f"{a / b:.3f}x, target >= {factor:g}x")

    msff = _best(results, "jax:msff", "train_img_s")
    check("MSFF-EComNet JAX train >= 1.1x fastest PyTorch twin", msff,
          _best(results, "torch:msff_ecomnet:", "train_img_s"), 1.1)
    check("MSFF-EComNet JAX train > JAX ResNet-50", msff,
          _best(results, "jax:resnet50", "train_img_s"), 1.0 + 1e-9)
    check("ResNet-50 JAX train >= 1.1x fastest PyTorch", _best(results, "jax:resnet50", "train_img_s"),
          _best(results, "torch:resnet50:", "train_img_s"), 1.1)
    for model in ("msff_ecomnet", "resnet50", "mobilenet_v3_large", "efficientnet_b0"):
        jax_prefix = "jax:msff" if model == "msff_ecomnet" else f"jax:{model}"
        check(f"{model} JAX inference no slower than fastest PyTorch",
              _best(results, jax_prefix, "infer_img_s"), _best(results, f"torch:{model}:", "infer_img_s"), 1.0)
    return lines


# ----------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_probe")))
    parser.add_argument("--budget_s", type=float, default=420.0)
    parser.add_argument("--tiny", action="store_true", help="tiny models, 32 px, on the CPU")
    parser.add_argument("--only", nargs="*", default=None, help="run only these rows (names as in the table)")
    parser.add_argument("--skip", nargs="*", default=(), help="leave these rows out")
    parser.add_argument("--no_torch", action="store_true")
    parser.add_argument("--win_margin", type=float, default=0.01,
                        help="an option wins when it is faster than the baseline by more than this")
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
    unknown = sorted((set(args.only or ()) | set(args.skip)) - known)
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {sorted(known)}")

    plan = [dataclasses.replace(item) for item in PLAN  # Copies: the winners row is filled in.
            if (args.only is None or item.name in args.only) and item.name not in args.skip
            and not (args.no_torch and item.framework == "torch")
            and not (args.tiny and (item.name in TINY_SKIP or (item.framework == "torch"
                                                               and item.name not in TINY_TORCH)))]
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

    done: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="gpu_probe_") as scratch:
        for item in plan:
            if item.name in done:
                continue
            left = args.budget_s - (time.perf_counter() - start)
            if item.framework == "torch":
                group = [i for i in plan if i.torch_group == item.torch_group and i.name not in done]
                limit = min(GROUP_LIMIT_S[item.torch_group] * (TINY_SCALE if args.tiny else 1), left)
                if limit < MIN_TORCH_S:
                    for i in group:
                        results[i.name] = {"status": f"not reached ({left:.0f}s of the budget left)"}
                        done.add(i.name)
                    continue
                print(f"=== torch group {item.torch_group}: {[i.name for i in group]} "
                      f"(limit {limit:.0f}s)", flush=True)
                results.update(run_torch_group(group, args, limit, Path(scratch)))
                done.update(i.name for i in group)
            else:
                done.add(item.name)
                if left < MIN_JAX_S:
                    results[item.name] = {"status": f"not reached ({left:.0f}s of the budget left)"}
                    continue
                if item.name == "jax:msff:winners":
                    overrides, options, names = winners(results, plan, args.win_margin)
                    if not names:
                        results[item.name] = {"status": "no option beat the baseline by more than "
                                                        f"{100 * args.win_margin:g}%: not timed"}
                        continue
                    item.overrides, item.compiler_options = overrides, options
                    item.what = f"{overrides or ''} {options or ''}".strip() + f" (from {', '.join(names)})"
                print(f"=== {item.name}: {item.what}", flush=True)
                item_start = time.perf_counter()
                try:
                    result = runner.run(item, Path(scratch))
                    result["status"] = "ok"
                    results["_batch"] = result["batch_size"]
                except Exception as error:  # noqa: BLE001: one variant must not stop the others
                    traceback.print_exc()
                    result = {"status": f"failed: {type(error).__name__}: {str(error)[:200]}".replace("|", "/")}
                result["what"] = item.what
                result["wall_s"] = time.perf_counter() - item_start
                results[item.name] = result
            r = results[item.name]
            print(f"=== {item.name}: {r.get('status')} train {_fmt(r.get('train_img_s'))} img/s, "
                  f"infer {_fmt(r.get('infer_img_s'))} img/s ({time.perf_counter() - start:.0f}s)", flush=True)
            write()
    write()
    print(f"=== gpu_probe done in {time.perf_counter() - start:.0f}s; {args.out_dir}\n", flush=True)
    print((args.out_dir / MD_NAME).read_text())
    measured = [k for k, v in results.items() if not k.startswith("_") and v.get("train_img_s")]
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
