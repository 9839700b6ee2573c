"""The paper's Tables 2 and 3 with our measured figures beside the published ones.

`python launch.py --mode report --workdir RUNS_DIR` reads every
`RUNS_DIR/*/eval_results.json` (one run per model, as `msff_jax.analysis.study` lays them out) and
writes `RUNS_DIR/report.md` plus two plots: top-1 accuracy against parameters and
against inference throughput.

Rules the report keeps, because a reader will hold our numbers against the paper's:
- every table has separate 'ours' and 'paper' columns and a paper figure is never
  printed under 'ours' (the paper's figures live in `msff_jax.analysis.paper_tables`);
- a model without a run is shown as missing, never filled in;
- the paper's "Precision" is top-1 accuracy by its own definition (PAPER.md section 2),
  so our 'precision' column is `top1`; the macro-averaged precision is given too, and
  our recall and F1 are the macro averages over classes;
- parameter counts are measured from our model definitions (`get_model` +
  `jax.eval_shape`, nothing is allocated) at each run's class count and overrides;
- throughput comes from the benchmark CSV (`RUNS_DIR/benchmark/benchmark.csv` by default)
  when it exists.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from msff_jax.analysis import paper_tables

REPORT_FILE = "report.md"
PARAMS_PLOT = "accuracy_vs_params.png"
THROUGHPUT_PLOT = "accuracy_vs_throughput.png"
# `python launch.py --config configs/benchmark.py --workdir RUNS_DIR/benchmark --mode
# benchmark` writes this file (msff_jax.analysis.benchmark.run.CSV_NAME).
DEFAULT_BENCHMARK_CSV = Path("benchmark") / "benchmark.csv"
DEFAULT_NUM_CLASSES = 15
_REQUIRED_RESULT_KEYS = ("model", "top1", "macro_precision", "macro_recall", "macro_f1")
MISSING = "missing"


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What the report needs from one run directory."""

    run_dir: Path
    model: str
    results: dict[str, Any]
    num_classes: int
    model_overrides: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Throughput:
    """One model's inference speed from the benchmark CSV."""

    samples_per_sec: float
    batch_size: str
    device: str
    dtype: str


# ----------------------------------------------------------------------------- inputs


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def load_run(run_dir: Path) -> RunResult:
    """Reads `run_dir/eval_results.json` (and `config.json` when present)."""
    results_path = run_dir / "eval_results.json"
    results = _read_json(results_path)
    if not isinstance(results, dict):
        raise ValueError(f"{results_path}: expected a JSON object, got {type(results).__name__}")
    missing = [key for key in _REQUIRED_RESULT_KEYS if key not in results]
    if missing:
        raise ValueError(f"{results_path}: missing keys {missing}")
    for key in _REQUIRED_RESULT_KEYS[1:]:
        value = results[key]
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{results_path}: {key} must be a fraction in [0, 1], got {value!r}")

    config: dict[str, Any] = {}
    config_path = run_dir / "config.json"
    if config_path.exists():
        config = _read_json(config_path)
    if "num_classes" in config:
        num_classes = int(config["num_classes"])
    elif results.get("class_names"):
        num_classes = len(results["class_names"])
    else:
        num_classes = DEFAULT_NUM_CLASSES
    return RunResult(
        run_dir=run_dir,
        model=str(results["model"]),
        results=results,
        num_classes=num_classes,
        model_overrides=dict(config.get("model_overrides") or {}),
    )


def collect_runs(runs_dir: Path) -> dict[str, RunResult]:
    """One run per model. Where several runs share a model, the one whose directory is
    named after the model wins, else the first in name order; the others are logged."""
    by_model: dict[str, list[RunResult]] = {}
    for results_path in sorted(runs_dir.glob("*/eval_results.json")):
        run = load_run(results_path.parent)
        by_model.setdefault(run.model, []).append(run)
    chosen = {}
    for model, runs in by_model.items():
        runs.sort(key=lambda run: (run.run_dir.name != model, run.run_dir.name))
        chosen[model] = runs[0]
        for other in runs[1:]:
            logging.warning("report: %s also found in %s; using %s", model, other.run_dir,
                            runs[0].run_dir)
    return chosen


def load_throughput(csv_path: Path) -> tuple[dict[str, Throughput], list[dict[str, str]]]:
    """Per model, the fastest inference row among the model-only rows (`input`
    'synthetic': on-device data, no input pipeline) of the CSV's first (framework,
    device, dtype), so every compared figure comes from one framework, one machine and
    one precision. Also returns all rows for the report's full table."""
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {}, []
    for column in ("model", "infer_samples_per_sec"):
        if column not in rows[0]:
            raise ValueError(f"{csv_path}: no column {column!r}; columns are {list(rows[0])}")
    def key(row):
        return (row.get("framework", ""), row.get("device", ""), row.get("dtype", ""))

    model_only = [row for row in rows if row.get("input", "") in ("", "synthetic")]
    if not model_only:
        return {}, rows
    reference = key(model_only[0])
    best: dict[str, Throughput] = {}
    for line, row in enumerate(rows, start=2):
        if row not in model_only or key(row) != reference:
            continue
        if not (row["infer_samples_per_sec"] or "").strip():
            continue  # inference not measured in this row
        try:
            speed = float(row["infer_samples_per_sec"])
        except ValueError as err:
            raise ValueError(f"{csv_path}, line {line}: infer_samples_per_sec "
                             f"{row['infer_samples_per_sec']!r} is not a number") from err
        if math.isnan(speed):
            continue
        model = row["model"]
        if model not in best or speed > best[model].samples_per_sec:
            best[model] = Throughput(speed, row.get("infer_batch_size", ""), *reference[1:])
    return best, rows


def count_params(model_name: str, num_classes: int, overrides: dict[str, Any]) -> int:
    """Parameter count of our model definition, from shapes alone."""
    return _count_params_cached(model_name, num_classes, json.dumps(overrides, sort_keys=True))


@functools.lru_cache(maxsize=None)
def _count_params_cached(model_name: str, num_classes: int, overrides_json: str) -> int:
    """Tracing a full-size model takes seconds; a report asks for each count once."""
    overrides = json.loads(overrides_json)
    import jax
    import jax.numpy as jnp

    from msff_jax.models import count_params, get_model

    model = get_model(model_name, num_classes, **overrides)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return count_params(jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images))


# ----------------------------------------------------------------------------- tables


def _percent(fraction: Optional[float]) -> str:
    return MISSING if fraction is None else f"{100.0 * fraction:.2f}"


def _paper(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:g}"


def _tick(flag: Optional[bool]) -> str:
    return "yes" if flag else "-"


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _ours(run: Optional[RunResult], key: str) -> str:
    return _percent(run.results[key]) if run else MISSING


def _params_m(model: str, params: dict[str, int], runs: dict[str, RunResult]) -> str:
    if model not in params:
        return MISSING
    return f"{params[model] / 1e6:.2f}" + ("" if model in runs else "*")


def ablation_table(runs: dict[str, RunResult]) -> list[str]:
    header = ["Model", "MSP-Conv", "IASM",
              "Precision (top-1) ours", "Precision paper", "Macro precision ours",
              "Recall (macro) ours", "Recall paper", "F1 (macro) ours", "F1 paper"]
    rows = []
    for model, paper in paper_tables.ABLATION.items():
        run = runs.get(model)
        rows.append([
            f"{paper.label} (`{model}`)", _tick(paper.uses_msp_conv), _tick(paper.uses_iasm),
            _ours(run, "top1"), _paper(paper.precision), _ours(run, "macro_precision"),
            _ours(run, "macro_recall"), _paper(paper.recall),
            _ours(run, "macro_f1"), _paper(paper.f1),
        ])
    return _markdown_table(header, rows)


def comparison_table(runs: dict[str, RunResult], params: dict[str, int],
                     throughput: dict[str, Throughput]) -> list[str]:
    header = ["Model", "Precision (top-1) ours", "Precision paper", "Macro precision ours",
              "Recall (macro) ours", "Recall paper", "F1 (macro) ours", "F1 paper",
              "Params (M) ours", "Params (M) paper", "Inference img/s ours"]
    rows = []
    for model, paper in paper_tables.COMPARISON.items():
        run = runs.get(model)
        speed = throughput.get(model)
        rows.append([
            f"{paper.label} (`{model}`)",
            _ours(run, "top1"), _paper(paper.precision), _ours(run, "macro_precision"),
            _ours(run, "macro_recall"), _paper(paper.recall),
            _ours(run, "macro_f1"), _paper(paper.f1),
            _params_m(model, params, runs),
            _paper(paper.params_m),
            f"{speed.samples_per_sec:.1f}" if speed else MISSING,
        ])
    return _markdown_table(header, rows)


def runs_table(runs: dict[str, RunResult], params: dict[str, int]) -> list[str]:
    header = ["Model", "Run directory", "Split", "Step", "Examples", "Classes",
              "Top-1 %", "Top-5 %", "Params"]
    rows = []
    for model in paper_tables.STUDY_MODELS + tuple(sorted(set(runs) - set(paper_tables.STUDY_MODELS))):
        run = runs.get(model)
        if run is None:
            count = f"{params[model]:,}*" if model in params else ""
            rows.append([f"`{model}`", MISSING] + [""] * 6 + [count])
            continue
        support = run.results.get("per_class", {}).get("support")
        rows.append([
            f"`{model}`", f"`{run.run_dir.name}`", str(run.results.get("split", "")),
            str(run.results.get("step", "")), str(sum(support)) if support else "",
            str(run.num_classes), _percent(run.results["top1"]),
            _percent(run.results["top5"]) if "top5" in run.results else "",
            f"{params[model]:,}" if model in params else "",
        ])
    return _markdown_table(header, rows)


def benchmark_table(rows: list[dict[str, str]]) -> list[str]:
    columns = ["model", "framework", "device", "dtype", "input", "infer_batch_size",
               "infer_samples_per_sec",
               "train_batch_size", "train_samples_per_sec", "gmacs", "mfu"]
    columns = [c for c in columns if c in rows[0]]
    return _markdown_table(columns, [[row.get(c, "") for c in columns] for row in rows])


# ----------------------------------------------------------------------------- plots


def _scatter(path: Path, points: dict[str, tuple[float, float]], xlabel: str, title: str,
             paper_points: Optional[dict[str, tuple[float, float]]] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    if points:
        xs, ys = zip(*points.values())
        axes.scatter(xs, ys, color="tab:blue", label="ours (measured)", zorder=3)
        for name, (x, y) in points.items():
            axes.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if paper_points:
        xs, ys = zip(*paper_points.values())
        axes.scatter(xs, ys, facecolors="none", edgecolors="tab:red",
                     label="paper (published)", zorder=2)
        for name, (x, y) in paper_points.items():
            axes.annotate(name, (x, y), textcoords="offset points", xytext=(4, -10),
                          fontsize=7, color="tab:red")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_accuracy_vs_params(path: Path, runs: dict[str, RunResult], params: dict[str, int]) -> None:
    ours = {m: (params[m] / 1e6, 100.0 * r.results["top1"]) for m, r in runs.items() if m in params}
    paper = {m: (row.params_m, row.precision) for m, row in paper_tables.COMPARISON.items()}
    _scatter(path, ours, "parameters (millions)", "Top-1 accuracy against model size", paper)


def plot_accuracy_vs_throughput(path: Path, runs: dict[str, RunResult],
                                throughput: dict[str, Throughput]) -> None:
    ours = {m: (throughput[m].samples_per_sec, 100.0 * r.results["top1"])
            for m, r in runs.items() if m in throughput}
    any_row = next(iter(throughput.values()))
    _scatter(path, ours, f"inference images/s ({any_row.device}, {any_row.dtype})",
             "Top-1 accuracy against inference throughput")


# ----------------------------------------------------------------------------- report


def measure_params(runs: dict[str, RunResult]) -> dict[str, int]:
    """Counts for every study model: at the run's classes and overrides where a run
    exists, else the default architecture at the runs' (or the paper's 15) classes."""
    default_classes = next((r.num_classes for r in runs.values()), DEFAULT_NUM_CLASSES)
    counts = {}
    for model in dict.fromkeys(paper_tables.STUDY_MODELS + tuple(runs)):
        run = runs.get(model)
        try:
            if run:
                counts[model] = count_params(model, run.num_classes, run.model_overrides)
            else:
                counts[model] = count_params(model, default_classes, {})
        except ValueError as err:  # a model name this checkout does not define
            logging.warning("report: cannot count parameters of %s: %s", model, err)
    return counts


def build_report(runs_dir: Path, runs: dict[str, RunResult], params: dict[str, int],
                 throughput: dict[str, Throughput], benchmark_rows: list[dict[str, str]],
                 benchmark_csv: Path) -> str:
    missing = [m for m in paper_tables.STUDY_MODELS if m not in runs]
    splits = sorted({str(r.results.get("split", "?")) for r in runs.values()})
    lines = [
        "# MSFF-EComNet study: our results beside the paper's",
        "",
        f"Runs read from `{runs_dir}`. 'ours' columns are measured by this project "
        f"(split: {', '.join(splits) or 'none'}); 'paper' columns are the published "
        f"figures ({paper_tables.SOURCE}), never ours.",
        "",
        "How the columns correspond: the paper's \"Precision\" is, by its own definition, "
        "the share of all samples classified correctly, i.e. **top-1 accuracy**, so our "
        "'Precision (top-1)' column is top-1 accuracy. Macro precision (mean over classes "
        "of per-class precision) is given beside it; our recall and F1 are macro averages "
        "over classes. All figures are percent.",
        "",
    ]
    if missing:
        lines += [f"Missing runs (shown as '{MISSING}'): " + ", ".join(f"`{m}`" for m in missing), ""]
    lines += ["## Table 2: ablation", ""] + ablation_table(runs) + [""]
    lines += ["## Table 3: comparison with mainstream models", ""]
    lines += comparison_table(runs, params, throughput) + [""]
    lines += [
        "Parameter counts ('ours') are measured from our model definitions at each run's "
        "number of classes and model overrides; * marks a model without a run, counted "
        "in its default architecture. The paper's ResNet-50 count is its 1000-class "
        "ImageNet count; its MobileNet-V3 and EfficientNet-B0 counts match no canonical "
        "variant (PAPER.md section 5).",
        "",
    ]
    if throughput:
        any_row = next(iter(throughput.values()))
        lines += [f"Inference throughput from `{benchmark_csv}` ({any_row.device}, "
                  f"{any_row.dtype}; model only, on-device synthetic input; the fastest "
                  "batch size per model).", ""]
    else:
        lines += [f"No benchmark CSV at `{benchmark_csv}`: throughput not reported.", ""]
    lines += ["## Runs", ""] + runs_table(runs, params) + [""]
    lines += ["## Plots", "", f"![accuracy against parameters]({PARAMS_PLOT})", ""]
    if throughput:
        lines += [f"![accuracy against throughput]({THROUGHPUT_PLOT})", ""]
    if benchmark_rows:
        lines += ["## Benchmark rows", ""] + benchmark_table(benchmark_rows) + [""]
    return "\n".join(lines)


def write_report(runs_dir: Path, benchmark_csv: Optional[Path] = None) -> Path:
    """Writes report.md and the plots into `runs_dir`; returns the report's path."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"runs directory {runs_dir} does not exist")
    benchmark_csv = Path(benchmark_csv) if benchmark_csv else runs_dir / DEFAULT_BENCHMARK_CSV
    runs = collect_runs(runs_dir)
    if not runs:
        logging.warning("report: no */eval_results.json under %s; every run is missing", runs_dir)
    throughput, benchmark_rows = ({}, [])
    if benchmark_csv.exists():
        throughput, benchmark_rows = load_throughput(benchmark_csv)
    params = measure_params(runs)

    plot_accuracy_vs_params(runs_dir / PARAMS_PLOT, runs, params)
    if throughput:
        plot_accuracy_vs_throughput(runs_dir / THROUGHPUT_PLOT, runs, throughput)
    report_path = runs_dir / REPORT_FILE
    report_path.write_text(
        build_report(runs_dir, runs, params, throughput, benchmark_rows, benchmark_csv)
    )
    return report_path


def run(workdir: str, benchmark_csv: Optional[str] = None) -> Path:
    """`launch.py --mode report` entry point: `workdir` is the runs directory."""
    path = write_report(Path(workdir), Path(benchmark_csv) if benchmark_csv else None)
    logging.info("report written to %s", path)
    print(path.read_text())
    return path
