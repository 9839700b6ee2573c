"""report: our figures beside the paper's, never in place of them; missing runs shown
as missing; parameter counts measured; throughput from the benchmark CSV; plots."""

import csv
import json

import pytest
from PIL import Image

from msff_jax.analysis import paper_tables
from msff_jax.analysis import report

# torchvision's ResNet-50 has 25,557,032 parameters with a 1000-class head; a 15-class
# head drops 2048 * 985 weights and 985 biases.
RESNET50_PARAMS_15_CLASSES = 25_557_032 - 2048 * 985 - 985
RUNS = {  # model -> (top1, macro precision, macro recall, macro F1), fractions
    "msff_ecomnet": (0.8123, 0.8011, 0.7950, 0.7977),
    "msff_base": (0.7011, 0.6902, 0.6855, 0.6870),
    "resnet50": (0.7788, 0.7654, 0.7600, 0.7620),
}


def _write_run(runs_dir, model, scores, dirname=None):
    run_dir = runs_dir / (dirname or model)
    run_dir.mkdir(parents=True)
    top1, precision, recall, f1 = scores
    results = {"model": model, "split": "test", "step": 1234, "top1": top1, "top5": 0.97,
               "macro_precision": precision, "macro_recall": recall, "macro_f1": f1,
               "per_class": {"support": [10] * 15}, "class_names": [f"c{i}" for i in range(15)],
               "num_params": 1}
    (run_dir / "eval_results.json").write_text(json.dumps(results))
    (run_dir / "config.json").write_text(json.dumps({"model": model, "num_classes": 15,
                                                     "model_overrides": {}}))


def _write_benchmark(runs_dir):
    (runs_dir / "benchmark").mkdir()
    with (runs_dir / report.DEFAULT_BENCHMARK_CSV).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "infer_samples_per_sec", "infer_step_time", "infer_batch_size",
                         "train_samples_per_sec", "train_step_time", "train_batch_size",
                         "param_count", "gmacs", "framework", "device", "dtype", "mfu",
                         "compile_s", "train_memory_gb", "input"])
        h100 = ["jax", "NVIDIA H100", "bfloat16"]
        writer.writerow(["msff_ecomnet", "1500.5", "0.17", "256", "700", "0.36", "256",
                         "11790000", "1.2", *h100, "0.1", "30", "3", "synthetic"])
        writer.writerow(["msff_ecomnet", "1800.25", "0.28", "512", "", "", "", "", "", *h100,
                         "", "", "", "synthetic"])
        writer.writerow(["resnet50", "2500", "0.1", "256", "900", "0.28", "256",
                         "23500000", "4.1", *h100, "0.2", "40", "5", "synthetic"])
        # Not comparable, so never in the comparison: end to end through the input
        # pipeline, another framework, another machine, inference not measured.
        writer.writerow(["msff_ecomnet", "", "", "", "650", "0.4", "256", "", "", *h100,
                         "", "", "", "shards (8 workers)"])
        writer.writerow(["resnet50", "99999", "0.1", "256", "", "", "", "", "", "torch",
                         "NVIDIA H100", "bfloat16", "", "", "", "synthetic"])
        writer.writerow(["msff_base", "99999", "0.1", "256", "", "", "", "", "", "jax",
                         "cpu", "float32", "", "", "", "synthetic"])


def _table(markdown, heading):
    """{row label: {column: cell}} of the table after `heading`."""
    lines = markdown.split(heading, 1)[1].strip().splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("|")):]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("runs")
    for model, scores in RUNS.items():
        _write_run(runs_dir, model, scores)
    _write_benchmark(runs_dir)
    path = report.write_report(runs_dir)
    return runs_dir, path.read_text()


def test_ablation_table(written):
    _, markdown = written
    table = _table(markdown, "## Table 2: ablation")
    assert len(table) == 4
    for model, paper in paper_tables.ABLATION.items():
        row = table[f"{paper.label} (`{model}`)"]
        assert row["Precision paper"] == f"{paper.precision:g}"
        assert row["Recall paper"] == f"{paper.recall:g}"
        assert row["F1 paper"] == f"{paper.f1:g}"
        if model in RUNS:
            top1, precision, recall, f1 = RUNS[model]
            assert row["Precision (top-1) ours"] == f"{100 * top1:.2f}"
            assert row["Macro precision ours"] == f"{100 * precision:.2f}"
            assert row["Recall (macro) ours"] == f"{100 * recall:.2f}"
            assert row["F1 (macro) ours"] == f"{100 * f1:.2f}"
        else:  # never filled in, least of all with the paper's figure
            for column in ("Precision (top-1) ours", "Macro precision ours",
                           "Recall (macro) ours", "F1 (macro) ours"):
                assert row[column] == "missing"
    assert table["MSFF-EComNet (`msff_ecomnet`)"]["MSP-Conv"] == "yes"
    assert table["base (`msff_base`)"]["IASM"] == "-"


def test_comparison_table(written):
    _, markdown = written
    table = _table(markdown, "## Table 3: comparison with mainstream models")
    assert len(table) == 4
    resnet = table["ResNet-50 (`resnet50`)"]
    assert resnet["Precision (top-1) ours"] == "77.88" and resnet["Precision paper"] == "85.12"
    assert resnet["Params (M) ours"] == f"{RESNET50_PARAMS_15_CLASSES / 1e6:.2f}"
    assert resnet["Params (M) paper"] == "25.56"
    assert resnet["Inference img/s ours"] == "2500.0"
    msff = table["MSFF-EComNet (`msff_ecomnet`)"]
    assert msff["Inference img/s ours"] == "1800.2"  # the faster of its two batch sizes
    mobilenet = table["MobileNet-V3 (`mobilenet_v3_large`)"]
    assert mobilenet["Precision (top-1) ours"] == "missing"
    assert mobilenet["Inference img/s ours"] == "missing"
    assert mobilenet["Params (M) ours"].endswith("*")  # measured, default architecture
    assert "top-1 accuracy" in markdown and "NVIDIA H100, bfloat16" in markdown
    assert "| msff_base | jax | cpu |" in markdown  # every CSV row listed for reference
    runs_table = _table(markdown, "## Runs")
    assert runs_table["`resnet50`"]["Params"] == f"{RESNET50_PARAMS_15_CLASSES:,}"
    assert runs_table["`msff_iasm`"]["Run directory"] == "missing"


def test_default_csv_is_the_benchmark_modes_file():
    from msff_jax.analysis.benchmark import run as benchmark

    assert report.DEFAULT_BENCHMARK_CSV.name == benchmark.CSV_NAME


def test_plots_written(written):
    runs_dir, markdown = written
    for name in (report.PARAMS_PLOT, report.THROUGHPUT_PLOT):
        with Image.open(runs_dir / name) as image:
            assert image.format == "PNG" and image.width > 300
        assert f"]({name})" in markdown


def test_no_runs_everything_missing(tmp_path):
    markdown = report.write_report(tmp_path).read_text()
    table = _table(markdown, "## Table 2: ablation")
    assert all(row["Precision (top-1) ours"] == "missing" for row in table.values())
    assert "throughput not reported" in markdown
    assert not (tmp_path / report.THROUGHPUT_PLOT).exists()


def test_bad_results_name_the_file(tmp_path):
    _write_run(tmp_path, "msff_ecomnet", RUNS["msff_ecomnet"])
    path = tmp_path / "msff_ecomnet" / "eval_results.json"
    results = json.loads(path.read_text())
    del results["macro_f1"]
    path.write_text(json.dumps(results))
    with pytest.raises(ValueError, match=r"msff_ecomnet/eval_results.json: missing keys \['macro_f1'\]"):
        report.write_report(tmp_path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="eval_results.json: not valid JSON"):
        report.write_report(tmp_path)


def test_claims_from_saved_predictions(tmp_path):
    """Two seeds of two models with predictions in the study's layout: McNemar's b, c and
    p-value against scipy, the verdict, and the A/B columns of the claims table."""
    import numpy as np
    from scipy import stats as scipy_stats

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 15, 300)
    b_total = c_total = 0
    for seed in (0, 1):
        strong = np.where(rng.random(300) < 0.8, labels, (labels + 1) % 15)
        weak = np.where(rng.random(300) < 0.6, labels, (labels + 2) % 15)
        b_total += int(np.sum((strong == labels) & (weak != labels)))
        c_total += int(np.sum((strong != labels) & (weak == labels)))
        for model, predicted in (("msff_ecomnet", strong), ("msff_base", weak)):
            run_dir = tmp_path / model / f"seed{seed}"
            run_dir.mkdir(parents=True)
            correct = float(np.mean(predicted == labels))
            results = {"model": model, "split": "test", "step": 1, "top1": correct,
                       "macro_precision": 0.5, "macro_recall": 0.5, "macro_f1": 0.5,
                       "num_examples": 300}
            (run_dir / "eval_results.json").write_text(json.dumps(results))
            (run_dir / "study_run.json").write_text(json.dumps({
                "variant": model, "model": model, "seed": seed, "status": "trained",
                "wall_time_s": 7200.0, "device_kind": "GPU", "device_count": 2,
                "device_hours": 4.0, "attempts": []}))
            np.savez(run_dir / report.PREDICTIONS_FILE, label=labels, predicted=predicted,
                     index=np.arange(300))
    markdown = report.write_report(tmp_path).read_text()
    document = json.loads((tmp_path / report.STATISTICS_FILE).read_text())
    claim = next(c for c in document["claims"]
                 if c["title"] == "full model over the base" and c["reading"] == "literal")
    assert (claim["b"], claim["c"], claim["n"]) == (b_total, c_total, 600)
    assert claim["p_value"] == pytest.approx(
        scipy_stats.binomtest(b_total, b_total + c_total, 0.5).pvalue, rel=1e-9)
    assert claim["verdict"] == "supported"  # 80% against 60% on 600 pairs
    header = _table(markdown, "## Claims")  # keyed by claim: one reading survives
    columns = list(next(iter(header.values())))
    line = next(line for line in markdown.splitlines()
                if line.startswith("| full model over the base | literal |"))
    row = dict(zip(columns, (cell.strip() for cell in line.strip("|").split("|"))))
    assert (row["A"], row["B"]) == ("`msff_ecomnet`", "`msff_base`")
    assert row["b (A right, B wrong)"] == str(b_total) and row["Verdict"] == "supported"
    cost = _table(markdown, "## Time and cost")
    assert cost["total"]["Device-hours"] == "16.000"
    assert cost["`msff_base/seed1`"]["Wall time (h:mm:ss)"] == "2:00:00"
    # A predictions file from another evaluation is refused, naming the file.
    path = tmp_path / "msff_base" / "seed0" / report.PREDICTIONS_FILE
    np.savez(path, label=labels, predicted=labels, index=np.arange(300))
    with pytest.raises(ValueError, match=r"msff_base/seed0/test_predictions.npz: its top-1"):
        report.write_report(tmp_path)
