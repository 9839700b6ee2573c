"""The plan as a console table and as plan.md (plan.json is written as it is)."""

from __future__ import annotations

GB = 1e9


def _gb(value) -> str:
    return "-" if value is None else f"{value / GB:.2f} GB"


def _conv_count(result: dict) -> int:
    k = result["kernels"]
    return (k["cudnn_conv_forward"] + k["cudnn_conv_backward_input"]
            + k["cudnn_conv_backward_filter"])


def _rows(plan: dict) -> list[tuple[str, list[str]]]:
    """(label, one cell per program) for the summary table."""
    results = list(plan["programs"].values())

    def cells(fn):
        return [fn(r) if r["compiled"] else "-" for r in results]

    def largest(r):
        if r.get("max_global_batch") is None:
            return "(fits)" if r["fits"] else "-"
        search = r.get("max_global_batch_search", {})
        note = "" if search.get("exact", True) else " (at least)"
        return f"{r['max_global_batch']}{note}"

    def lower_bound(r):
        seconds = r["lower_bound_step_s"]
        rate = r["global_batch"] / seconds if seconds else 0
        return f"{1e3 * seconds:.1f} ms ({rate:,.0f} img/s)"

    return [
        ("global batch", [str(r["global_batch"]) for r in results]),
        ("compiled", ["yes" if r["compiled"] else "NO" for r in results]),
        ("peak memory per device", cells(lambda r: _gb(r["memory"]["peak_bytes"]))),
        ("  temporaries", cells(lambda r: _gb(r["memory"]["temp_bytes"]))),
        ("fits", cells(lambda r: "yes" if r["fits"] else "NO")),
        ("largest global batch that fits", cells(largest)),
        ("kernels launched", cells(lambda r: str(r["kernels"]["total"]))),
        ("  XLA fusions (+ transposes)",
         cells(lambda r: f"{r['kernels']['fusion']} (+{r['kernels']['transpose']})")),
        ("  cuDNN conv fwd / bwd-in / bwd-filter",
         cells(lambda r: f"{r['kernels']['cudnn_conv_forward']} / "
                         f"{r['kernels']['cudnn_conv_backward_input']} / "
                         f"{r['kernels']['cudnn_conv_backward_filter']}")),
        ("  GEMMs", cells(lambda r: str(r["kernels"]["gemm"]))),
        ("  copies", cells(lambda r: str(r["kernels"]["copy"]))),
        ("  collectives (bytes)",
         cells(lambda r: f"{r['kernels']['collective']} ({_gb(r['collective_bytes'])})")),
        ("  other", cells(lambda r: str(r["kernels"]["library_call"] + r["kernels"]["other"]))),
        ("unaligned 16-bit convs", cells(lambda r: f"{len(r['unaligned_convs'])} of {_conv_count(r)}")),
        ("TFLOPs (conv + matmul)", cells(lambda r: f"{r['flops'] / 1e12:.2f}")),
        ("GB at kernel boundaries", cells(lambda r: f"{r['bytes'] / GB:.1f}")),
        ("lower bound (estimate)", cells(lower_bound)),
        ("compile time", [f"{r['compile_s']:.0f} s" for r in results]),
    ]


def _header(plan: dict) -> str:
    return (f"{plan['model']} ({plan['dtype']}, {plan['image_size']} px) on "
            f"{plan['num_devices']} x {plan['device_description']}: usable memory "
            f"{plan['usable_memory_bytes'] / GB:.1f} GB per device "
            f"({plan['memory_fraction']:.2f} of {plan['device_memory_bytes'] / GB:.1f} GB)")


def console_table(plan: dict) -> list[str]:
    names = list(plan["programs"])
    rows = _rows(plan)
    width = max(len(label) for label, _ in rows)
    widths = [max(len(name), *(len(cells[i]) for _, cells in rows)) for i, name in enumerate(names)]
    lines = [_header(plan),
             "  ".join([" " * width] + [n.rjust(w) for n, w in zip(names, widths)])]
    for label, cells in rows:
        lines.append("  ".join([label.ljust(width)] + [c.rjust(w) for c, w in zip(cells, widths)]))
    for name, result in plan["programs"].items():
        if result["error"]:
            lines.append(f"error: {result['error']}")
    lines.append("Times are lower bounds estimated from the compiled plan (no GPU ran anything).")
    return lines


def markdown(plan: dict) -> str:
    names = list(plan["programs"])
    out = [f"# Plan: {_header(plan)}", "",
           f"Compiled on a machine without that GPU (JAX {plan['jax_version']}, no "
           "autotuning). Every time below is a lower bound estimated from the compiled "
           "plan (per kernel the larger of bytes / bandwidth and FLOPs / peak), never a "
           "measurement. docs/GUIDE.md, \"Plan a GPU run on any machine\", says what each "
           "figure means.", "",
           "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, cells in _rows(plan):
        out.append(f"| {label.strip()} | " + " | ".join(cells) + " |")
    for name, result in plan["programs"].items():
        out += ["", f"## {name}", ""]
        if not result["compiled"]:
            out.append(f"Not compiled: {result['error']}")
            continue
        mem = result["memory"]
        out.append("Memory per device: " + ", ".join(
            f"{key.replace('_bytes', '')} {_gb(mem[key])}" for key in
            ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes")) + ".")
        search = result.get("max_global_batch_search")
        if search:
            over = search["verified_over"]
            out.append(f"Largest global batch that fits: {search['max_global_batch']} (compiled "
                       f"and checked; {over if over is not None else 'no larger batch'} does not fit; "
                       f"{search['compiles']} extra compiles).")
        phases = result["kernels_by_phase"]
        out.append(f"Kernels by phase: forward {phases['forward']}, backward "
                   f"{phases['backward']}, optimizer and bookkeeping {phases['update']}.")
        out += ["", "| kernel kind | count |", "|---|---|"]
        out += [f"| {kind} | {count} |" for kind, count in result["kernels"].items()]
        if result["unaligned_convs"]:
            out += ["", "Convolutions reaching cuDNN in 16 bits with channels not a multiple of 8:",
                    "", "| layer | pass | in | out | kernel |", "|---|---|---|---|---|"]
            out += [f"| {c['layer']} | {c['kind']} | {c['in_channels']} | {c['out_channels']} | "
                    f"{c['kernel']} |" for c in result["unaligned_convs"]]
        out += ["", "Largest kernels by estimated time:", "",
                "| kernel | kind | layer | phase | MB | GFLOP | lower bound (us) |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {k['name']} | {k['kind']} | {k['layer'] or '-'} | {k['phase']} | "
                f"{k['bytes'] / 1e6:.0f} | {k['flops'] / 1e9:.1f} | {1e6 * k['lower_bound_s']:.0f} |"
                for k in result["top_kernels"]]
    return "\n".join(out) + "\n"
