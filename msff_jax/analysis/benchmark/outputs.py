"""The benchmark's files: a CSV in timm's column layout, a markdown table, a PNG plot.

timm's benchmark CSV is what people already compare across machines, so our rows use
its columns (step times in milliseconds, parameters in millions, GMACs per image) plus
the ones a cross-framework table needs. The PyTorch peers script writes the same
columns, so rows from both frameworks merge into one table here.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# timm's columns, then ours. Every writer of benchmark rows (this package and
# benchmarks/torch_peers.py) writes at least these, in this order.
CSV_COLUMNS: tuple[str, ...] = (
    "model",
    "infer_samples_per_sec",
    "infer_step_time",
    "infer_batch_size",
    "train_samples_per_sec",
    "train_step_time",
    "train_batch_size",
    "param_count",
    "gmacs",
    "framework",
    "device",
    "dtype",
    "mfu",
    "compile_s",
)
# Written by the JAX benchmark only; rows without them leave the cells empty.
EXTRA_COLUMNS: tuple[str, ...] = ("train_memory_gb", "input", "plan_kernels",
                                   "plan_gb_at_boundaries", "plan_lower_bound_ms",
                                   "time_over_plan_bound")

_TEXT_COLUMNS = {"model", "framework", "device", "dtype", "input"}


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Writes rows with the standard columns first, then any others they carry."""
    columns = list(CSV_COLUMNS)
    for row in rows:
        columns += [key for key in row if key not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _format_cell(row.get(key)) for key in columns})


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Reads benchmark rows, numbers as floats and empty cells as None.

    Raises ValueError naming the file and line for a file that lacks the standard
    columns or holds a non-number where a number belongs.
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing benchmark CSV columns {missing}")
        rows = []
        for line_number, raw in enumerate(reader, start=2):
            row: dict[str, Any] = {}
            for key, cell in raw.items():
                if key is None:
                    raise ValueError(f"{path}:{line_number}: more cells than columns")
                row[key] = _parse_cell(key, cell, path, line_number)
            rows.append(row)
    return rows


def _parse_cell(key: str, cell: str | None, path: Path, line_number: int) -> Any:
    if cell is None or cell == "":
        return None
    if key in _TEXT_COLUMNS:
        return cell
    try:
        return float(cell)
    except ValueError:
        raise ValueError(
            f"{path}:{line_number}: column {key!r} holds {cell!r}, not a number"
        ) from None


def _number(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:,.{digits}f}"


def markdown_table(rows: Iterable[dict[str, Any]]) -> str:
    """One table of every row, grouped by model, then a JAX-over-PyTorch ratio table."""
    rows = sorted(rows, key=lambda r: (str(r["model"]), str(r.get("framework"))))
    header = (
        "| model | framework | input | dtype | train img/s | train ms/step | train batch "
        "| infer img/s | infer batch | params (M) | GMACs | MFU | compile s "
        "| step memory GB | plan bound ms | time / bound |"
    )
    lines = [header, "|" + "---|" * 16]
    for r in rows:
        mfu = r.get("mfu")
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r["model"]),
                    str(r.get("framework") or ""),
                    str(r.get("input") or "synthetic"),
                    str(r.get("dtype") or ""),
                    _number(r.get("train_samples_per_sec"), 1),
                    _number(r.get("train_step_time"), 2),
                    _number(r.get("train_batch_size"), 0),
                    _number(r.get("infer_samples_per_sec"), 1),
                    _number(r.get("infer_batch_size"), 0),
                    _number(r.get("param_count"), 2),
                    _number(r.get("gmacs"), 3),
                    "" if mfu is None else f"{100 * mfu:.1f}%",
                    _number(r.get("compile_s"), 1),
                    _number(r.get("train_memory_gb"), 2),
                    _number(r.get("plan_lower_bound_ms"), 2),
                    _number(r.get("time_over_plan_bound"), 2),
                ]
            )
            + " |"
        )
    devices = sorted({str(r.get("device")) for r in rows if r.get("device")})
    text = "\n".join(lines) + "\n"
    if devices:
        text = f"Device: {', '.join(devices)}\n\n" + text
    for extra in (ratio_table(rows), input_bound_table(rows)):
        if extra:
            text += "\n" + extra
    return text


def input_bound_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per model, training fed from shards over training on an on-device batch.

    Near 1.0 the input pipeline keeps up; well under 1.0 training is input-bound.
    """
    lines = []
    for fed in rows:
        if (fed.get("input") or "synthetic") == "synthetic":
            continue
        base = next(
            (
                r
                for r in rows
                if r["model"] == fed["model"]
                and r.get("framework") == fed.get("framework")
                and (r.get("input") or "synthetic") == "synthetic"
            ),
            None,
        )
        if not base or not base.get("train_samples_per_sec"):
            continue
        ratio = fed["train_samples_per_sec"] / base["train_samples_per_sec"]
        lines.append(
            f"| {fed['model']} | {fed.get('framework')} | {fed['input']} "
            f"| {_number(base['train_samples_per_sec'], 1)} "
            f"| {_number(fed['train_samples_per_sec'], 1)} | {ratio:.2f} |"
        )
    if not lines:
        return ""
    header = [
        "| model | framework | input | synthetic img/s | from shards img/s "
        "| shards / synthetic |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(header + lines) + "\n"


def ratio_table(rows: Sequence[dict[str, Any]]) -> str:
    """JAX training throughput over each other framework's, per model (synthetic input)."""
    synthetic = [r for r in rows if (r.get("input") or "synthetic") == "synthetic"]
    jax_rows = {r["model"]: r for r in synthetic if r.get("framework") == "jax"}
    others = sorted(
        {str(r.get("framework")) for r in synthetic if r.get("framework") != "jax"}
    )
    if not jax_rows or not others:
        return ""
    lines = [
        "| model | " + " | ".join(f"JAX / {o} (train)" for o in others) + " |",
        "|---|" + "---|" * len(others),
    ]
    for model in sorted(jax_rows):
        cells = []
        for other in others:
            peer = next(
                (r for r in synthetic if r["model"] == model and r.get("framework") == other),
                None,
            )
            ours = jax_rows[model].get("train_samples_per_sec")
            theirs = peer.get("train_samples_per_sec") if peer else None
            cells.append(f"{ours / theirs:.2f}x" if ours and theirs else "")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_throughput_vs_params(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Scatter of training images/s against parameter count, one marker per framework."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    markers = "os^Dvx*"
    frameworks = sorted({str(r.get("framework")) for r in rows})
    for index, framework in enumerate(frameworks):
        points = [
            r
            for r in rows
            if str(r.get("framework")) == framework
            and (r.get("input") or "synthetic") == "synthetic"
            and r.get("param_count")
            and r.get("train_samples_per_sec")
        ]
        if not points:
            continue
        ax.scatter(
            [r["param_count"] for r in points],
            [r["train_samples_per_sec"] for r in points],
            marker=markers[index % len(markers)],
            label=framework,
        )
        for r in points:
            ax.annotate(
                str(r["model"]),
                (r["param_count"], r["train_samples_per_sec"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
    devices = sorted({str(r.get("device")) for r in rows if r.get("device")})
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("training images / s")
    ax.set_title("Training throughput against model size" + (f"\n{', '.join(devices)}" if devices else ""))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
