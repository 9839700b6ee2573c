"""The paper's Tables 2 and 3 with our measured figures beside the published ones, with
the uncertainty of ours and the significance of the differences the paper claims.

`python launch.py --mode report --workdir RUNS_DIR` reads every run under RUNS_DIR
(`msff_jax.analysis.study` lays them out as RUNS_DIR/VARIANT/seedS; a single run per model
directly under RUNS_DIR/MODEL is read too) and writes `RUNS_DIR/report.md`,
`RUNS_DIR/report_statistics.json` (every figure of the statistics sections, unrounded)
and two plots: top-1 accuracy against parameters and against inference throughput.
Everything comes from files the runs leave (eval_results.json, test_predictions.npz,
study_run.json, config.json), so the report is recomputed without a GPU.

Rules the report keeps, because a reader will hold our numbers against the paper's:
- every table has separate 'ours' and 'paper' columns and a paper figure is never
  printed under 'ours' (the paper's figures live in `msff_jax.analysis.paper_tables`);
- a model without a run is shown as missing, never filled in;
- the paper's "Precision" is top-1 accuracy by its own definition (PAPER.md section 2),
  so our 'precision' column is `top1`; the macro-averaged precision is given too, and
  our recall and F1 are the macro averages over classes;
- with several seeds a cell is the mean ± the sample standard deviation over seeds;
  a single run gets a bootstrap 95% interval over test images (`statistics`);
- a claimed gain is called supported only when McNemar's test on the same test images
  (pooled over seeds) gives p < 0.05 with the claimed sign;
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

import numpy as np

from msff_jax.analysis import paper_tables
from msff_jax.analysis import run_record
from msff_jax.analysis import statistics

REPORT_FILE = "report.md"
STATISTICS_FILE = "report_statistics.json"
PARAMS_PLOT = "accuracy_vs_params.png"
THROUGHPUT_PLOT = "accuracy_vs_throughput.png"
# Written by the final evaluation (msff_jax.train.evaluation.PREDICTIONS_FILE) and by
# the study driver (msff_jax.analysis.run_record).
PREDICTIONS_FILE = "test_predictions.npz"
RUN_RECORD = run_record.RUN_RECORD
# `python launch.py --config configs/benchmark.py --workdir RUNS_DIR/benchmark --mode
# benchmark` writes this file (msff_jax.analysis.benchmark.run.CSV_NAME).
DEFAULT_BENCHMARK_CSV = Path("benchmark") / "benchmark.csv"
DEFAULT_NUM_CLASSES = 15
_REQUIRED_RESULT_KEYS = ("model", "top1", "macro_precision", "macro_recall", "macro_f1")
MISSING = "missing"
MATCHED = "@matched"
ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 1000


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What the report needs from one run directory. `variant` is the study's name for
    it (a model, or MODEL@matched); `record` is its study_run.json ({} if none)."""

    run_dir: Path
    model: str
    results: dict[str, Any]
    num_classes: int
    model_overrides: dict[str, Any]
    variant: str = ""
    seed: int = 0
    record: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Predictions:
    """A run's per-image test answers (test_predictions.npz), in dataset order."""

    labels: np.ndarray
    predicted: np.ndarray
    index: np.ndarray


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


def _read_record(run_dir: Path) -> dict:
    """study_run.json with any attempt whose end was never recorded (the study was
    killed) read from the run's files, so its time counts (`run_record.settled`)."""
    return run_record.settled(run_record.read(run_dir), run_dir)


def load_run(run_dir: Path) -> RunResult:
    """Reads `run_dir/eval_results.json` (and `config.json`, `study_run.json` when
    present)."""
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
    record = _read_record(run_dir)
    return RunResult(
        run_dir=run_dir,
        model=str(results["model"]),
        results=results,
        num_classes=num_classes,
        model_overrides=dict(config.get("model_overrides") or {}),
        variant=str(record.get("variant") or results["model"]),
        seed=int(record.get("seed", config.get("seed", 0))),
        record=record,
    )


def _preference(run: RunResult) -> tuple:
    """Of several runs of one variant and seed, the study's own directory wins, then a
    directory named after the model, then name order."""
    study_dir = (run.run_dir.parent.name == run.variant and run.run_dir.name == f"seed{run.seed}")
    return (not study_dir, run.run_dir.name != run.variant, str(run.run_dir))


def collect_runs(runs_dir: Path) -> dict[str, list[RunResult]]:
    """variant -> its runs, one per seed, in seed order. Runs sit at RUNS_DIR/*/ or
    RUNS_DIR/*/*/; duplicates of a (variant, seed) are logged and the preferred one kept."""
    found: dict[tuple[str, int], list[RunResult]] = {}
    paths = sorted(runs_dir.glob("*/eval_results.json")) + sorted(runs_dir.glob("*/*/eval_results.json"))
    for results_path in paths:
        run = load_run(results_path.parent)
        found.setdefault((run.variant, run.seed), []).append(run)
    by_variant: dict[str, list[RunResult]] = {}
    for (variant, seed), runs in sorted(found.items(), key=lambda item: (item[0][0], item[0][1])):
        runs.sort(key=_preference)
        by_variant.setdefault(variant, []).append(runs[0])
        for other in runs[1:]:
            logging.warning("report: %s seed %d also found in %s; using %s", variant, seed,
                            other.run_dir, runs[0].run_dir)
    return by_variant


def collect_records(runs_dir: Path) -> list[tuple[Path, dict]]:
    """Every study_run.json under RUNS_DIR/*/*/ (failed runs included), for the cost table."""
    return [(path.parent, _read_record(path.parent))
            for path in sorted(runs_dir.glob(f"*/*/{RUN_RECORD}"))]


def load_predictions(run: RunResult) -> Optional[Predictions]:
    """The run's test_predictions.npz, checked against its eval_results.json; None when
    the run has none (runs from before the file existed)."""
    path = run.run_dir / PREDICTIONS_FILE
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {key: saved[key] for key in ("label", "predicted", "index")}
    except KeyError as err:
        raise ValueError(f"{path}: no array {err}; expected label, predicted and index "
                         "(written by the training's final evaluation)") from err
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable .npz without pickle ({err})") from err
    labels, predicted = arrays["label"], arrays["predicted"]
    if labels.shape != predicted.shape or labels.ndim != 1 or arrays["index"].shape != labels.shape:
        raise ValueError(f"{path}: label {labels.shape}, predicted {predicted.shape} and index "
                         f"{arrays['index'].shape} must be 1-D of one length")
    expected = run.results.get("num_examples")
    if expected is not None and labels.size != expected:
        raise ValueError(f"{path}: {labels.size} images but {run.run_dir / 'eval_results.json'} "
                         f"counts {expected}; rerun the evaluation (--mode eval) or delete both")
    if labels.size and abs(float(np.mean(labels == predicted)) - run.results["top1"]) > 1e-6:
        raise ValueError(f"{path}: its top-1 {np.mean(labels == predicted):.6f} differs from "
                         f"eval_results.json's {run.results['top1']:.6f}; the files come from "
                         "different evaluations")
    return Predictions(labels=labels.astype(np.int64), predicted=predicted.astype(np.int64),
                       index=arrays["index"])


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


# ----------------------------------------------------------------------------- statistics


@dataclasses.dataclass(frozen=True)
class Claim:
    """A top-1 gain of `model_a` over `model_b` the paper's tables imply (points), tested on ours."""

    title: str
    reading: str  # "literal", "parameter-matched" or "Table 3"
    model_a: str  # variants
    model_b: str
    paper_gain: float


def _paper_top1(variant: str) -> float:
    model = variant.removesuffix(MATCHED)
    row = paper_tables.ABLATION.get(model) or paper_tables.COMPARISON[model]
    return row.precision


_ABLATION_CLAIMS = (
    ("MSP-Conv over the base", "msff_msp", "msff_base"),
    ("IASM over the base", "msff_iasm", "msff_base"),
    ("full model over the base", "msff_ecomnet", "msff_base"),
    ("full model over MSP-Conv alone", "msff_ecomnet", "msff_msp"),
    ("full model over IASM alone", "msff_ecomnet", "msff_iasm"),
)
_MATCHABLE = ("msff_base", "msff_iasm")


def claim_definitions() -> list[Claim]:
    """Table 2's module gains and every row against the full model, read literally and
    with the parameter-matched base and IASM variants; Table 3's MSFF-EComNet against
    each baseline. Gains are the paper's top-1 ("Precision") differences."""
    claims = []
    for title, a, b in _ABLATION_CLAIMS:
        claims.append(Claim(title, "literal", a, b, _paper_top1(a) - _paper_top1(b)))
    for title, a, b in _ABLATION_CLAIMS:
        if a in _MATCHABLE or b in _MATCHABLE:
            a_m = a + MATCHED if a in _MATCHABLE else a
            b_m = b + MATCHED if b in _MATCHABLE else b
            claims.append(Claim(title, "parameter-matched", a_m, b_m,
                                _paper_top1(a) - _paper_top1(b)))
    for model, row in paper_tables.COMPARISON.items():
        if model != "msff_ecomnet":
            claims.append(Claim(f"MSFF-EComNet over {row.label}", "Table 3", "msff_ecomnet",
                                model, _paper_top1("msff_ecomnet") - row.precision))
    return claims


@dataclasses.dataclass
class Statistics:
    """Everything the uncertainty and claims sections print, unrounded."""

    summaries: dict[str, dict[str, statistics.SeedSummary]]
    intervals: dict[tuple[str, int], dict[str, statistics.ConfidenceInterval]]
    claims: list[dict[str, Any]]


def compute_statistics(runs: dict[str, list[RunResult]],
                       predictions: dict[tuple[str, int], Optional[Predictions]]) -> Statistics:
    summaries = {variant: statistics.summarize_seeds([r.results for r in variant_runs])
                 for variant, variant_runs in runs.items()}
    intervals = {}
    for variant, variant_runs in runs.items():
        for run in variant_runs:
            found = predictions.get((variant, run.seed))
            if found is not None:
                intervals[(variant, run.seed)] = statistics.bootstrap_confidence_intervals(
                    found.labels, found.predicted, run.num_classes,
                    num_resamples=BOOTSTRAP_RESAMPLES, seed=0)
    claims = []
    for claim in claim_definitions():
        entry: dict[str, Any] = dataclasses.asdict(claim)
        seeds_a = {r.seed for r in runs.get(claim.model_a, []) if predictions.get((claim.model_a, r.seed))}
        seeds_b = {r.seed for r in runs.get(claim.model_b, []) if predictions.get((claim.model_b, r.seed))}
        seeds = sorted(seeds_a & seeds_b)
        entry["seeds"] = seeds
        if not seeds:
            have = [v for v in (claim.model_a, claim.model_b) if v in runs]
            entry["verdict"] = ("not tested (runs missing)" if len(have) < 2
                                else "not tested (no test_predictions.npz for a common seed)")
            claims.append(entry)
            continue
        pairs_a = [(predictions[(claim.model_a, s)].labels, predictions[(claim.model_a, s)].predicted)
                   for s in seeds]
        pairs_b = [(predictions[(claim.model_b, s)].labels, predictions[(claim.model_b, s)].predicted)
                   for s in seeds]
        try:
            pooled = statistics.pooled_mcnemar_test(pairs_a, pairs_b)
        except ValueError as err:
            logging.warning("report: %s vs %s: %s", claim.model_a, claim.model_b, err)
            entry["verdict"] = f"not tested ({err})"
            claims.append(entry)
            continue
        per_seed = [statistics.mcnemar_test(la, pa, pb)
                    for (la, pa), (_, pb) in zip(pairs_a, pairs_b)]
        entry.update(
            b=pooled.b, c=pooled.c, n=pooled.n, accuracy_difference=pooled.accuracy_difference,
            p_value=pooled.p_value, method=pooled.method,
            per_seed_p_values=[t.p_value for t in per_seed],
            per_seed_differences=[t.accuracy_difference for t in per_seed],
            verdict=statistics.judge_claim(claim.paper_gain, pooled, ALPHA))
        claims.append(entry)
    return Statistics(summaries=summaries, intervals=intervals, claims=claims)


def statistics_document(stats: Statistics, runs: dict[str, list[RunResult]]) -> dict:
    """report_statistics.json: the same figures as the markdown, unrounded (fractions)."""
    models = {}
    for variant, variant_runs in runs.items():
        models[variant] = {
            "seeds": [r.seed for r in variant_runs],
            "run_dirs": [str(r.run_dir) for r in variant_runs],
            "summary": {k: dataclasses.asdict(v) for k, v in stats.summaries[variant].items()},
            "bootstrap": {str(r.seed): {k: dataclasses.asdict(v) for k, v in
                                        stats.intervals[(variant, r.seed)].items()}
                          for r in variant_runs if (variant, r.seed) in stats.intervals},
        }
    return {"alpha": ALPHA, "bootstrap_resamples": BOOTSTRAP_RESAMPLES, "models": models,
            "claims": stats.claims}


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


def _mean_std(summary: statistics.SeedSummary) -> str:
    """One seed: the figure; several: mean ± sample std over seeds (percent)."""
    if summary.std is None:
        return f"{100.0 * summary.mean:.2f}"
    return f"{100.0 * summary.mean:.2f} ± {100.0 * summary.std:.2f}"


def _ours(runs: dict[str, list[RunResult]], variant: str, key: str) -> str:
    variant_runs = runs.get(variant)
    if not variant_runs:
        return MISSING
    return _mean_std(statistics.mean_and_std(r.results[key] for r in variant_runs))


def _params_m(variant: str, params: dict[str, int], runs: dict[str, list[RunResult]]) -> str:
    if variant not in params:
        return MISSING
    return f"{params[variant] / 1e6:.2f}" + ("" if variant in runs else "*")


def _p_value(p: float) -> str:
    return "< 1e-300" if p == 0.0 else f"{p:.3g}"


def ablation_table(runs: dict[str, list[RunResult]], params: dict[str, int],
                   matched: bool = False) -> list[str]:
    """Table 2; `matched` puts the parameter-matched base and IASM variants in the rows
    whose conv unit replaces MSP-Conv."""
    header = ["Model", "MSP-Conv", "IASM",
              "Precision (top-1) ours", "Precision paper", "Macro precision ours",
              "Recall (macro) ours", "Recall paper", "F1 (macro) ours", "F1 paper",
              "Params (M) ours"]
    rows = []
    for model, paper in paper_tables.ABLATION.items():
        variant = model + MATCHED if matched and model in _MATCHABLE else model
        rows.append([
            f"{paper.label} (`{variant}`)", _tick(paper.uses_msp_conv), _tick(paper.uses_iasm),
            _ours(runs, variant, "top1"), _paper(paper.precision),
            _ours(runs, variant, "macro_precision"),
            _ours(runs, variant, "macro_recall"), _paper(paper.recall),
            _ours(runs, variant, "macro_f1"), _paper(paper.f1),
            _params_m(variant, params, runs),
        ])
    return _markdown_table(header, rows)


def comparison_table(runs: dict[str, list[RunResult]], params: dict[str, int],
                     throughput: dict[str, "Throughput"]) -> list[str]:
    header = ["Model", "Precision (top-1) ours", "Precision paper", "Macro precision ours",
              "Recall (macro) ours", "Recall paper", "F1 (macro) ours", "F1 paper",
              "Params (M) ours", "Params (M) paper", "Inference img/s ours"]
    rows = []
    for model, paper in paper_tables.COMPARISON.items():
        speed = throughput.get(model)
        rows.append([
            f"{paper.label} (`{model}`)",
            _ours(runs, model, "top1"), _paper(paper.precision),
            _ours(runs, model, "macro_precision"),
            _ours(runs, model, "macro_recall"), _paper(paper.recall),
            _ours(runs, model, "macro_f1"), _paper(paper.f1),
            _params_m(model, params, runs),
            _paper(paper.params_m),
            f"{speed.samples_per_sec:.1f}" if speed else MISSING,
        ])
    return _markdown_table(header, rows)


def _ordered_variants(runs: dict[str, list[RunResult]]) -> list[str]:
    order = list(paper_tables.STUDY_MODELS) + [m + MATCHED for m in _MATCHABLE]
    return [v for v in order if v in runs] + sorted(set(runs) - set(order))


def _interval(ci: Optional[statistics.ConfidenceInterval]) -> str:
    if ci is None:
        return "no predictions"
    return f"{100 * ci.low:.2f} to {100 * ci.high:.2f}"


def uncertainty_table(runs: dict[str, list[RunResult]], stats: Statistics) -> list[str]:
    header = ["Model", "Seeds", "Top-1 %", "Macro precision %", "Macro recall %",
              "Macro F1 %", "Top-1 95% CI", "Macro F1 95% CI"]
    rows = []
    for variant in _ordered_variants(runs):
        summary = stats.summaries[variant]
        variant_runs = runs[variant]
        if len(variant_runs) == 1:
            found = stats.intervals.get((variant, variant_runs[0].seed))
            ci_top1 = _interval(found["top1"] if found else None)
            ci_f1 = _interval(found["macro_f1"] if found else None)
        else:
            ci_top1 = ci_f1 = "per run (Runs)"
        rows.append([f"`{variant}`", ",".join(str(r.seed) for r in variant_runs),
                     *(_mean_std(summary[key]) for key in statistics.MEASURES), ci_top1, ci_f1])
    return _markdown_table(header, rows)


def claims_table(stats: Statistics) -> list[str]:
    header = ["Claim", "Reading", "A", "B", "Paper gain (points)", "Ours (points)", "Seeds",
              "b (A right, B wrong)", "c (A wrong, B right)", "Images", "p (McNemar, pooled)",
              "p per seed", "Verdict"]
    rows = []
    for claim in stats.claims:
        tested = "p_value" in claim
        rows.append([
            claim["title"], claim["reading"], f"`{claim['model_a']}`", f"`{claim['model_b']}`",
            f"{claim['paper_gain']:+.2f}",
            f"{100 * claim['accuracy_difference']:+.2f}" if tested else "",
            ",".join(map(str, claim["seeds"])),
            str(claim.get("b", "")), str(claim.get("c", "")), str(claim.get("n", "")),
            _p_value(claim["p_value"]) if tested else "",
            ", ".join(_p_value(p) for p in claim["per_seed_p_values"]) if tested else "",
            claim["verdict"],
        ])
    return _markdown_table(header, rows)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def cost_table(runs_dir: Path, records: list[tuple[Path, dict]],
               runs: dict[str, list[RunResult]]) -> list[str]:
    """One row per study run (failed ones included), from study_run.json; runs without
    one (trained outside the study) are listed as not recorded."""
    header = ["Run", "Seed", "Status", "Wall time (h:mm:ss)", "Device", "Devices",
              "Device-hours"]
    rows, total_hours, total_seconds = [], 0.0, 0.0
    recorded = set()
    for run_dir, record in records:
        recorded.add(run_dir.resolve())
        estimated = "*" if any(a.get("estimated") for a in record.get("attempts", [])) else ""
        rows.append([f"`{run_dir.relative_to(runs_dir)}`", str(record.get("seed", "")),
                     str(record.get("status", "")),
                     _duration(record.get("wall_time_s", 0.0)) + estimated,
                     str(record.get("device_kind", "")), str(record.get("device_count", "")),
                     f"{record.get('device_hours', 0.0):.3f}"])
        total_hours += float(record.get("device_hours", 0.0))
        total_seconds += float(record.get("wall_time_s", 0.0))
    for variant in _ordered_variants(runs):
        for run in runs[variant]:
            if run.run_dir.resolve() not in recorded:
                rows.append([f"`{run.run_dir.relative_to(runs_dir)}`", str(run.seed),
                             "not recorded (no study_run.json)", "", "", "", ""])
    rows.append(["total", "", "", _duration(total_seconds), "", "", f"{total_hours:.3f}"])
    return _markdown_table(header, rows)


def runs_table(runs: dict[str, list[RunResult]], params: dict[str, int],
               stats: Statistics) -> list[str]:
    header = ["Model", "Seed", "Run directory", "Split", "Step", "Examples", "Classes",
              "Top-1 %", "Top-1 95% CI", "Macro F1 %", "Macro F1 95% CI", "Top-5 %", "Params"]
    rows = []
    for variant in _ordered_variants({**{m: [] for m in paper_tables.STUDY_MODELS}, **runs}):
        variant_runs = runs.get(variant)
        if not variant_runs:
            count = f"{params[variant]:,}*" if variant in params else ""
            rows.append([f"`{variant}`", "", MISSING] + [""] * 9 + [count])
            continue
        for run in variant_runs:
            support = run.results.get("per_class", {}).get("support")
            found = stats.intervals.get((variant, run.seed))
            rows.append([
                f"`{variant}`", str(run.seed), f"`{run.run_dir.name}`"
                if run.run_dir.parent.name != variant else f"`{variant}/{run.run_dir.name}`",
                str(run.results.get("split", "")), str(run.results.get("step", "")),
                str(sum(support)) if support else "", str(run.num_classes),
                _percent(run.results["top1"]), _interval(found["top1"] if found else None),
                _percent(run.results["macro_f1"]),
                _interval(found["macro_f1"] if found else None),
                _percent(run.results["top5"]) if "top5" in run.results else "",
                f"{params[variant]:,}" if variant in params else "",
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


def _mean_top1(variant_runs: list[RunResult]) -> float:
    return 100.0 * float(np.mean([r.results["top1"] for r in variant_runs]))


def plot_accuracy_vs_params(path: Path, runs: dict[str, list[RunResult]],
                            params: dict[str, int]) -> None:
    ours = {v: (params[v] / 1e6, _mean_top1(r)) for v, r in runs.items() if v in params}
    paper = {m: (row.params_m, row.precision) for m, row in paper_tables.COMPARISON.items()}
    _scatter(path, ours, "parameters (millions)", "Top-1 accuracy against model size", paper)


def plot_accuracy_vs_throughput(path: Path, runs: dict[str, list[RunResult]],
                                throughput: dict[str, Throughput]) -> None:
    ours = {v: (throughput[v].samples_per_sec, _mean_top1(r))
            for v, r in runs.items() if v in throughput}
    any_row = next(iter(throughput.values()))
    _scatter(path, ours, f"inference images/s ({any_row.device}, {any_row.dtype})",
             "Top-1 accuracy against inference throughput")


# ----------------------------------------------------------------------------- report


def measure_params(runs: dict[str, list[RunResult]]) -> dict[str, int]:
    """Counts for every study model and every variant run: at the run's classes and
    overrides where a run exists, else the default architecture at the runs' (or the
    paper's 15) classes."""
    default_classes = next((r[0].num_classes for r in runs.values()), DEFAULT_NUM_CLASSES)
    counts = {}
    for variant in dict.fromkeys(paper_tables.STUDY_MODELS + tuple(runs)):
        run = runs[variant][0] if runs.get(variant) else None
        try:
            if run:
                counts[variant] = count_params(run.model, run.num_classes, run.model_overrides)
            elif MATCHED not in variant:
                counts[variant] = count_params(variant, default_classes, {})
        except ValueError as err:  # a model name this checkout does not define
            logging.warning("report: cannot count parameters of %s: %s", variant, err)
    return counts


def build_report(runs_dir: Path, runs: dict[str, list[RunResult]], params: dict[str, int],
                 throughput: dict[str, Throughput], benchmark_rows: list[dict[str, str]],
                 benchmark_csv: Path, stats: Optional[Statistics] = None,
                 records: Sequence[tuple[Path, dict]] = ()) -> str:
    stats = stats or compute_statistics(runs, {})
    missing = [m for m in paper_tables.STUDY_MODELS if m not in runs]
    splits = sorted({str(r.results.get("split", "?")) for rs in runs.values() for r in rs})
    seed_counts = sorted({len(rs) for rs in runs.values()})
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
        "over classes. All figures are percent. With several seeds a cell reads mean ± "
        "sample standard deviation over seeds "
        f"(seeds per model here: {', '.join(map(str, seed_counts)) or 'none'}).",
        "",
    ]
    if missing:
        lines += [f"Missing runs (shown as '{MISSING}'): " + ", ".join(f"`{m}`" for m in missing), ""]
    lines += ["## Table 2: ablation", "",
              "Literal reading: the base and IASM-only models replace MSP-Conv with a 3x3 "
              "conv unit at the full model's widths, so they carry several times its "
              "parameters and the comparison mixes the module's effect with capacity.", ""]
    lines += ablation_table(runs, params) + [""]
    matched_requested = (any(v.endswith(MATCHED) for v in runs)
                         or any(str(r.get("variant", "")).endswith(MATCHED) for _, r in records))
    if matched_requested:
        lines += ["## Table 2, parameter-matched reading", "",
                  "The conv unit of the base and IASM-only models narrowed so each has "
                  "within 2% of the full model's parameters (`configs/study.py`); the "
                  "MSP-Conv rows are the same runs as above.", ""]
        lines += ablation_table(runs, params, matched=True) + [""]
    else:
        lines += ["Parameter-matched reading: not run (`msff-study --matched_ablations`).", ""]
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
    if runs:
        lines += ["## Uncertainty: seeds and test images", "",
                  "Mean ± sample standard deviation over seeds (training noise). For a model "
                  f"with a single run, a percentile-bootstrap {100 * (1 - ALPHA):.0f}% interval "
                  f"over test images ({BOOTSTRAP_RESAMPLES} resamples; test-set noise only); "
                  "the Runs table gives it for every run.", ""]
        lines += uncertainty_table(runs, stats) + [""]
    lines += ["## Claims: McNemar tests on the same test images", "",
              "Each of the paper's top-1 gains of A over B against ours: McNemar's exact test "
              "on per-image correctness, seed s of A paired with seed s of B and pooled over "
              "seeds (b and c summed; this treats one image's answers under several seeds as "
              "independent, so read it beside the spread over seeds). 'supported': our "
              f"difference has the claimed sign and p < {ALPHA}; 'contradicted': the opposite "
              "sign and p < "
              f"{ALPHA}; 'not significant' is not evidence of no gain. No correction for "
              "testing several claims.", ""]
    lines += claims_table(stats) + [""]
    lines += ["## Time and cost", "",
              "Per run, from its `study_run.json` (all attempts of a resumed run summed, an "
              "attempt killed with the study included: its time is read from its files, "
              "marked *); device-hours = wall time x devices.", ""]
    lines += cost_table(runs_dir, list(records), runs) + [""]
    lines += ["## Runs", ""] + runs_table(runs, params, stats) + [""]
    lines += ["## Plots", "", f"![accuracy against parameters]({PARAMS_PLOT})", ""]
    if throughput:
        lines += [f"![accuracy against throughput]({THROUGHPUT_PLOT})", ""]
    if benchmark_rows:
        lines += ["## Benchmark rows", ""] + benchmark_table(benchmark_rows) + [""]
    return "\n".join(lines)


def write_report(runs_dir: Path, benchmark_csv: Optional[Path] = None) -> Path:
    """Writes report.md, report_statistics.json and the plots into `runs_dir`; returns
    the report's path."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"runs directory {runs_dir} does not exist")
    benchmark_csv = Path(benchmark_csv) if benchmark_csv else runs_dir / DEFAULT_BENCHMARK_CSV
    runs = collect_runs(runs_dir)
    if not runs:
        logging.warning("report: no eval_results.json under %s; every run is missing", runs_dir)
    predictions = {(variant, run.seed): load_predictions(run)
                   for variant, variant_runs in runs.items() for run in variant_runs}
    stats = compute_statistics(runs, predictions)
    records = collect_records(runs_dir)
    throughput, benchmark_rows = ({}, [])
    if benchmark_csv.exists():
        throughput, benchmark_rows = load_throughput(benchmark_csv)
    params = measure_params(runs)

    plot_accuracy_vs_params(runs_dir / PARAMS_PLOT, runs, params)
    if throughput:
        plot_accuracy_vs_throughput(runs_dir / THROUGHPUT_PLOT, runs, throughput)
    (runs_dir / STATISTICS_FILE).write_text(
        json.dumps(statistics_document(stats, runs), indent=2))
    report_path = runs_dir / REPORT_FILE
    report_path.write_text(build_report(runs_dir, runs, params, throughput, benchmark_rows,
                                        benchmark_csv, stats, records))
    return report_path


def run(workdir: str, benchmark_csv: Optional[str] = None) -> Path:
    """`launch.py --mode report` entry point: `workdir` is the runs directory."""
    path = write_report(Path(workdir), Path(benchmark_csv) if benchmark_csv else None)
    logging.info("report written to %s", path)
    print(path.read_text())
    return path
