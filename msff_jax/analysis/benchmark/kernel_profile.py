"""Where a compiled step spends its time: a JAX profiler trace, summarised per kernel.

`trace_steps` records a few calls of a step with `jax.profiler.trace` and asks for the
Perfetto JSON export beside the TensorBoard files; `summarise_trace` reads that JSON
(plain `gzip` + `json`, no profiler plugin needed) and totals the duration of every
kernel the device ran, by name and by kind. On a GPU the events come from the
`/device:GPU:N` processes (one event per kernel launch, named after the XLA fusion or
the cuDNN/cuBLAS kernel); a CPU has no device processes, so there the summary falls back
to the host's XLA events, which is enough to check the plumbing.

XLA may switch CUDA-graph command buffers off while the profiler runs, so the traced
steps can launch kernels one by one where the timed ones replay graphs: compare the
kernel time per step with the timed step, and read the launch count as an upper bound.

The kinds are read off kernel names by `KERNEL_KINDS` (first match wins), for XLA's,
cuDNN's, cuBLAS's, PyTorch's and inductor's kernels alike, so that one table compares
JAX with PyTorch: they answer the questions the speed work asks, e.g. how much of a step
is convolution forward, input-gradient and weight-gradient, how much is pooling (XLA's
select-and-scatter under `max_pool_backward='scatter'`), how much is elementwise and
reduction work (BatchNorm, attention maps, concatenation), how much is copying.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path
from typing import Any, Callable

PERFETTO_NAME = "perfetto_trace.json.gz"

KERNEL_KINDS: tuple[tuple[str, str], ...] = (
    # Pooling first, whoever wrote the kernel: XLA's select-and-scatter (the max-pool
    # backward under `max_pool_backward='scatter'`), PyTorch's pooling kernels (adaptive
    # average pooling's "gradinput" too), and inductor kernels that fused a pooling op
    # (triton_poi_fused_max_pool2d_with_indices_...), which do the pooling's work.
    ("pooling", r"select.?and.?scatter|max_?pool|avg_?pool|average_?pool|adaptive_?av"
                r"|reduce.?window"),
    # Inductor names a kernel by its template or loop kind first and by the aten ops it
    # fused second ("triton_poi_fused_convolution_relu_0" is the bias-and-ReLU loop after
    # a convolution, not a convolution), so its prefix decides before any op name does.
    ("conv forward", r"^triton_tem\w*conv"),
    ("matmul", r"^triton_tem"),
    ("reduction", r"^triton_(red|per)_"),
    ("copy / transpose", r"^triton_poi_fused_(clone|permute|transpose|copy)(_\d+)?$"),
    ("elementwise", r"^triton_(poi|for)_"),
    # Normalisation and softmax kernels of PyTorch eager and cuDNN (bn_fw_tr_..., cunn_
    # SoftMax..., layer_norm_grad_input...): reductions, as XLA's and inductor's are,
    # and never a convolution gradient for the "grad_input" in their names.
    ("reduction", r"layer_?norm|group_?norm|softmax|welford|collect_statistics"
                  r"|\bbn_(fw|bw)|batchnorm_(fw|bw)|_reduce_kernel|norm_backward_reduce"),
    # Layout kernels around convolutions (cuDNN's nchwToNhwc, ampere's ..._nhwc2nchw_...
    # suffix is a fused layout, see below) are copies.
    ("copy / transpose", r"copy|transpose|memcpy|nchwtonhwc|nhwctonchw|permute|tensortransform"
                         r"|addpaddingkernel"),
    # Hopper cuDNN kernels name their pass (sm90_xmma_fprop/dgrad/wgrad_...), grouped
    # (depthwise) ones too (dgrad2d_grouped_direct_kernel); PyTorch's own say grad_weight.
    ("conv weight-gradient",
     r"wgrad|grad_?weight|weight_?grad|bwd_?filt|backward_?filter|bw.?filter"),
    ("conv input-gradient",
     r"dgrad|grad_?input|bwd_?data|backward_?data|backward_?input|bw.?input|depthwise.*backward"),
    # A CPU backend runs both convolution gradients as one op.
    ("conv gradients (one op)", r"conv\w*_backward"),
    # `conv` but not `convert`: XLA names dtype-conversion fusions "..._convert_...".
    # Older cuDNN kernels, still picked on Hopper for some shapes, say "scudnn" or
    # "s16816cudnn" (and may name a fused ReLU); cuDNN's helpers (cask offsets, im2col,
    # packed scaling) belong to its convolutions.
    ("conv forward", r"fprop|conv(?!ert)|implicit_?gemm|winograd|convolve|scudnn|\dcudnn"
                     r"|cask_|im2col|computeoffsets|scalepackedtensor"),
    # cuBLASLt's Hopper kernels are "nvjet_..."; XLA's Triton GEMMs "gemm_fusion_dot...",
    # its unfused dot "wrapped_dot"; split-K GEMMs end with a "splitKreduce" kernel.
    ("matmul", r"gemm|cublas|matmul|nvjet|splitkreduce|\bdot|_dot\b|\baddmm|\bmm\b"),
    ("collective", r"all-reduce|all-gather|reduce-scatter|all-to-all|nccl|collective"),
    ("reduction", r"reduce|reduction|\bsum\b|\bmean\b"),
    ("memset", r"memset|\bfill|zero_"),
    # XLA names an op it did not fuse "wrapped_<opcode>" (wrapped_add, wrapped_convert).
    ("elementwise", r"fusion|loop_|^wrapped_|elementwise|vectorized|unrolled|concatenate|slice"
                    r"|pad|convert|batch_norm|relu|sigmoid|hardswish|silu|\badd|\bmul|\bdiv|where"),
)
OTHER_KIND = "other"
# Every kind once, in the order tables show them (columns of the probe's kind table).
KIND_ORDER: tuple[str, ...] = (
    "conv forward", "conv input-gradient", "conv weight-gradient", "conv gradients (one op)",
    "matmul", "pooling", "reduction", "elementwise", "copy / transpose", "collective", "memset",
    OTHER_KIND,
)


def trace_steps(run_steps: Callable[[int], Any], steps: int, log_dir: Path) -> Path:
    """Runs `run_steps(steps)` under the profiler; returns the Perfetto JSON it wrote."""
    import jax  # Here, so that reading traces (benchmarks.gpu_probe) needs no JAX.

    log_dir = Path(log_dir)
    before = set(log_dir.rglob(PERFETTO_NAME)) if log_dir.exists() else set()
    with jax.profiler.trace(str(log_dir), create_perfetto_trace=True):
        jax.block_until_ready(run_steps(steps))
    written = sorted(set(log_dir.rglob(PERFETTO_NAME)) - before)
    if not written:
        raise FileNotFoundError(
            f"the profiler wrote no {PERFETTO_NAME} under {log_dir}; this JAX may not "
            "support create_perfetto_trace"
        )
    return written[-1]


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, lowered):
            return kind
    return OTHER_KIND


def _events(trace: dict) -> tuple[list[dict], str, int]:
    """Kernel events of the device processes (and how many devices), or the host's XLA
    work on a CPU.

    A GPU process holds one line per CUDA stream ("Stream #N...", one event per kernel)
    beside derived lines ("XLA Modules", "XLA Ops", "Steps") that cover the same time
    again; only the stream lines are kept when there are any.
    """
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    process_names, thread_names = {}, {}
    for e in events:
        if e.get("ph") != "M":
            continue
        name = e.get("args", {}).get("name", "")
        if e.get("name") == "process_name":
            process_names[e["pid"]] = name
        elif e.get("name") == "thread_name":
            thread_names[(e["pid"], e.get("tid"))] = name
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device_pids = {pid for pid, name in process_names.items() if name.startswith("/device:")}
    on_device = [e for e in complete if e["pid"] in device_pids]
    if on_device:
        streams = [
            e for e in on_device
            if thread_names.get((e["pid"], e.get("tid")), "").startswith("Stream")
        ]
        return (streams or on_device), "device", len({e["pid"] for e in on_device})
    # Host events: leave out Python frames ('$file.py:line name') and the runtime's
    # own bookkeeping, keep what XLA ran.
    host = [
        e for e in complete
        if not e["name"].startswith("$") and "::" not in e["name"] and "(" not in e["name"]
    ]
    return host, "host", 1


def summarise_trace(
    path: Path,
    steps: int,
    top: int = 25,
    expect_device: bool = False,
    classify: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """Per-kernel and per-kind totals of a Perfetto JSON trace, per step and device, in ms.

    With several devices (data parallelism: each runs the same kernels) the totals are
    divided by the device count. `expect_device` (an accelerator ran the steps) adds a
    warning to the summary when the trace holds no device events, e.g. when the GPU
    tracer was unavailable: host events then say nothing about kernels. `classify`
    maps a kernel name to its kind (default `kernel_kind`).
    """
    path = Path(path)
    try:
        with gzip.open(path, "rt") as f:
            trace = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable Perfetto JSON trace ({error})") from error
    events, source, device_count = _events(trace)
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for event in events:
        entry = by_name[event["name"]]
        entry[0] += float(event["dur"]) / 1e3  # Perfetto durations are microseconds.
        entry[1] += 1
    warning = None
    if expect_device and source != "device":
        warning = (
            "no device events in the trace (is the GPU profiler available?): these are "
            "host events, not kernel times"
        )
    summary = summarise_kernels(by_name, steps, device_count=device_count, top=top,
                                classify=classify or kernel_kind)
    return {"trace": str(path), "source": source, "warning": warning, **summary}


def summarise_kernels(
    by_name: dict[str, Any],
    steps: int,
    *,
    device_count: int = 1,
    top: int = 25,
    classify: Callable[[str], str] = kernel_kind,
) -> dict[str, Any]:
    """Totals per kernel kind and the top kernels, per step and device, in ms.

    `by_name` maps a kernel name to (total ms, launches) over `steps` steps; any
    profiler's kernel list (JAX's trace here, PyTorch's in benchmarks.gpu_probe) fits.
    """
    total_ms = sum(ms for ms, _ in by_name.values())
    by_kind: dict[str, float] = collections.defaultdict(float)
    for name, (ms, _) in by_name.items():
        by_kind[classify(name)] += ms
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])
    per_step = max(steps, 1) * device_count
    return {
        "device_count": device_count,
        "steps": steps,
        "kernel_ms_per_step": total_ms / per_step,
        "distinct_kernels": len(by_name),
        "launches_per_step": sum(count for _, count in by_name.values()) / per_step,
        "kinds": [
            {"kind": kind, "ms_per_step": ms / per_step, "share": ms / total_ms if total_ms else 0.0}
            for kind, ms in sorted(by_kind.items(), key=lambda item: -item[1])
        ],
        "top_kernels": [
            {
                "name": name,
                "kind": classify(name),
                "ms_per_step": ms / per_step,
                "launches_per_step": count / per_step,
                "share": ms / total_ms if total_ms else 0.0,
            }
            for name, (ms, count) in ranked[:top]
        ],
    }


def markdown(summary: dict[str, Any], title: str) -> str:
    """The summary as two markdown tables: by kind, then the top kernels."""
    lines = [
        f"## {title}",
        "",
        f"{summary['source']} events of {summary['steps']} steps on "
        f"{summary['device_count']} device(s), per step and device: "
        f"{summary['kernel_ms_per_step']:.2f} ms of kernels, "
        f"{summary['launches_per_step']:.0f} launches; "
        f"{summary['distinct_kernels']} distinct kernels.",
        "",
    ]
    if summary.get("warning"):
        lines += [f"**Warning: {summary['warning']}.**", ""]
    lines += [
        "| kind | ms/step | share |",
        "|---|---|---|",
    ]
    lines += [f"| {k['kind']} | {k['ms_per_step']:.3f} | {100 * k['share']:.1f}% |" for k in summary["kinds"]]
    lines += ["", "| kernel | kind | ms/step | launches/step | share |", "|---|---|---|---|---|"]
    for k in summary["top_kernels"]:
        name = k["name"].replace("|", "/")
        name = name if len(name) <= 90 else name[:87] + "..."
        lines.append(
            f"| `{name}` | {k['kind']} | {k['ms_per_step']:.3f} | "
            f"{k['launches_per_step']:.1f} | {100 * k['share']:.1f}% |"
        )
    return "\n".join(lines) + "\n"
