"""The whole pipeline on the synthetic miniature, on the CPU: study (two seeds of two
models, train + evaluate + report with its statistics checked independently, a crashing
run reported while the others go on, finished runs skipped on a rerun), then export of a
trained run through launch.py and predict with --explain.

Training all seven models would take CPU minutes each, so the study runs two real models
and one whose launch is replaced by a crashing command; the per-run code path is the same
for all.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msff_jax.inference import predict
from msff_jax.analysis import report
from msff_jax.analysis import study

REPO_ROOT = Path(__file__).resolve().parent.parent
# A few steps of the demo recipe on 32 px crops of tiny models.
TINY_RECIPE = ["--config.image_size=32", "--config.num_train_steps=3",
               "--config.batch_size=16", "--config.eval_batch_size=16",
               "--config.checkpoint.asynchronous=False"]


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    """(raw DeepFashion-layout folder, shards) of ~240 small synthetic images."""
    from data_pipeline.conversion import deepfashion
    from data_pipeline.conversion import synthetic

    root = tmp_path_factory.mktemp("miniature")
    synthetic.generate(root / "raw", 400, seed=0, image_size=48)
    deepfashion.convert(root / "raw", root / "shards", max_images=240, resize_to=40, seed=0,
                        progress=False, num_workers=1)
    return root / "raw", root / "shards"


def _sklearn_measures(labels, predicted, num_classes):
    from sklearn import metrics

    precision, recall, f1, _ = metrics.precision_recall_fscore_support(
        labels, predicted, labels=list(range(num_classes)), average="macro", zero_division=0)
    return {"top1": float(np.mean(labels == predicted)), "macro_precision": precision,
            "macro_recall": recall, "macro_f1": f1}


def test_study_seeds_statistics_export_predict(miniature, tmp_path, monkeypatch, capsys):
    """Two models x two seeds on the CPU miniature (plus a matched ablation whose launch
    crashes); the report's statistics against scipy/sklearn/numpy on the saved
    predictions; a rerun skips; export and predict of one run."""
    from scipy import stats as scipy_stats

    raw, shards = miniature
    runs = tmp_path / "runs"
    # Only the launch.py subprocesses read this: one device compiles faster than eight.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    real_command = study.launch_command

    def crash_matched(spec, options):
        if spec.variant == "msff_base@matched":
            return [sys.executable, "-c", "import sys; print('simulated crash'); sys.exit(3)"]
        return real_command(spec, options)

    monkeypatch.setattr(study, "launch_command", crash_matched)
    cpu = study.Devices(kind="cpu (test)")
    common = ["--runs_dir", str(runs), "--data_dir", str(shards), "--demo", "--tiny", *TINY_RECIPE]

    status = study.main(common + ["--models", "msff_base,msff_ecomnet", "--seeds", "2",
                                  "--matched_ablations", "--parallel", "2"], devices=cpu)
    out = capsys.readouterr().out
    assert status == 1, out
    assert "no GPUs visible: running one at a time" in out
    assert "msff_base@matched seed 0: FAILED (exit 3)" in out and "simulated crash" in out
    assert "msff_base@matched seed 1: FAILED (exit 3)" in out

    # Independent figures from the saved per-image predictions.
    measures, answers = {}, {}
    for model in ("msff_base", "msff_ecomnet"):
        for seed in (0, 1):
            workdir = runs / model / f"seed{seed}"
            results = json.loads((workdir / "eval_results.json").read_text())
            assert json.loads((workdir / "config.json").read_text())["seed"] == seed
            with np.load(workdir / "test_predictions.npz", allow_pickle=False) as saved:
                labels, predicted = saved["label"], saved["predicted"]
                assert np.array_equal(saved["index"], np.arange(len(labels)))
            assert len(labels) == results["num_examples"]
            measures[model, seed] = _sklearn_measures(labels, predicted, 15)
            for key, value in measures[model, seed].items():
                assert results[key] == pytest.approx(value, abs=1e-9), (model, seed, key)
            answers[model, seed] = (labels, predicted)
    assert np.array_equal(answers["msff_base", 0][0], answers["msff_ecomnet", 1][0])
    # Different seeds train differently.
    assert not np.array_equal(answers["msff_ecomnet", 0][1], answers["msff_ecomnet", 1][1]) or \
        measures["msff_ecomnet", 0] != measures["msff_ecomnet", 1]

    document = json.loads((runs / "report_statistics.json").read_text())
    markdown = (runs / "report.md").read_text()
    uncertainty = markdown.split("## Uncertainty")[1].split("## Claims")[0]
    for model in ("msff_base", "msff_ecomnet"):
        summary = document["models"][model]["summary"]
        assert document["models"][model]["seeds"] == [0, 1]
        row = next(line for line in uncertainty.splitlines() if f"| `{model}` |" in line)
        for key in ("top1", "macro_precision", "macro_recall", "macro_f1"):
            values = np.array([measures[model, 0][key], measures[model, 1][key]])
            assert summary[key]["mean"] == pytest.approx(values.mean(), abs=1e-9)
            assert summary[key]["std"] == pytest.approx(values.std(ddof=1), abs=1e-9)
            assert summary[key]["num_seeds"] == 2
            assert f"{100 * values.mean():.2f} ± {100 * values.std(ddof=1):.2f}" in row
        for seed in ("0", "1"):
            interval = document["models"][model]["bootstrap"][seed]["top1"]
            assert interval["estimate"] == pytest.approx(measures[model, int(seed)]["top1"])
            assert interval["low"] <= interval["estimate"] <= interval["high"]

    claims = {(c["title"], c["reading"]): c for c in document["claims"]}
    full_vs_base = claims["full model over the base", "literal"]
    b = c = 0
    for seed in (0, 1):
        labels, ours = answers["msff_ecomnet", seed]
        _, base = answers["msff_base", seed]
        b += int(np.sum((ours == labels) & (base != labels)))
        c += int(np.sum((ours != labels) & (base == labels)))
    assert (full_vs_base["b"], full_vs_base["c"]) == (b, c)
    assert full_vs_base["n"] == 2 * len(answers["msff_base", 0][0])
    assert full_vs_base["paper_gain"] == pytest.approx(89.56 - 82.35)
    expected_p = scipy_stats.binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    assert full_vs_base["p_value"] == pytest.approx(expected_p, rel=1e-9)
    expected_verdict = ("not significant" if expected_p >= 0.05 or b == c
                        else "supported" if b > c else "contradicted")
    assert full_vs_base["verdict"] == expected_verdict
    for seed, p_seed in enumerate(full_vs_base["per_seed_p_values"]):
        labels, ours = answers["msff_ecomnet", seed]
        _, base = answers["msff_base", seed]
        b_s = int(np.sum((ours == labels) & (base != labels)))
        c_s = int(np.sum((ours != labels) & (base == labels)))
        reference = scipy_stats.binomtest(b_s, b_s + c_s, 0.5).pvalue if b_s + c_s else 1.0
        assert p_seed == pytest.approx(reference, rel=1e-9)
    claims_md = markdown.split("## Claims")[1].split("## Time and cost")[0]
    row = next(line for line in claims_md.splitlines()
               if line.startswith("| full model over the base | literal | `msff_ecomnet` | "
                                  "`msff_base` |"))
    assert f"| {b} | {c} |" in row and f"| {expected_verdict} |" in row
    # The matched reading is labelled and its crashed runs are not tested.
    assert "## Table 2, parameter-matched reading" in markdown
    assert claims["full model over the base", "parameter-matched"]["verdict"].startswith("not tested")
    assert claims["MSFF-EComNet over ResNet-50", "Table 3"]["verdict"].startswith("not tested")

    # Time and cost, failed runs included.
    for variant in ("msff_base", "msff_ecomnet", "msff_base@matched"):
        record = json.loads((runs / variant / "seed1" / "study_run.json").read_text())
        assert record["variant"] == variant and record["seed"] == 1
        assert record["device_kind"] == "cpu (test)" and record["device_count"] == 1
        assert record["wall_time_s"] > 0
        assert record["device_hours"] == pytest.approx(record["wall_time_s"] / 3600)
        assert record["status"] == ("failed (exit 3)" if "@" in variant else "trained")
    cost = markdown.split("## Time and cost")[1].split("## Runs")[0]
    assert "| `msff_base@matched/seed0` | 0 | failed (exit 3) |" in cost
    table2 = markdown.split("## Table 2: ablation")[1].split("## Table 2, parameter")[0]
    full_row = next(line for line in table2.splitlines() if "`msff_ecomnet`" in line)
    top1 = np.array([measures["msff_ecomnet", s]["top1"] for s in (0, 1)])
    assert f"| {100 * top1.mean():.2f} ± {100 * top1.std(ddof=1):.2f} | 89.56 |" in full_row
    assert (runs / "accuracy_vs_params.png").exists()

    # The report again from the saved files alone (what `launch.py --mode report` calls).
    (runs / "report.md").unlink()
    (runs / "report_statistics.json").unlink()
    report.run(str(runs))
    assert (runs / "report.md").read_text() == markdown
    assert json.loads((runs / "report_statistics.json").read_text()) == document
    capsys.readouterr()

    # Rerun: finished runs are skipped, not retrained.
    status = study.main(common + ["--models", "msff_ecomnet", "--seeds", "2", "--skip_report"],
                        devices=cpu)
    out = capsys.readouterr().out
    assert status == 0
    assert "msff_ecomnet seed 0: finished earlier, skipped" in out
    assert "msff_ecomnet seed 1: finished earlier, skipped" in out
    results = json.loads((runs / "msff_ecomnet" / "seed0" / "eval_results.json").read_text())

    # Export the trained run the way a user does.
    workdir = runs / "msff_ecomnet" / "seed0"
    subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"),
                    f"--config={REPO_ROOT / 'configs' / 'study.py'}:msff_ecomnet,demo,tiny",
                    f"--workdir={workdir}", "--mode=export", f"--config.data_dir={shards}",
                    *TINY_RECIPE], check=True, cwd=REPO_ROOT, timeout=600)
    metadata = json.loads((workdir / "export" / "export.json").read_text())
    assert metadata["class_names"] == results["class_names"]
    assert metadata["preprocessing"]["image_size"] == 32
    assert metadata["step"] == results["step"]

    images = sorted(raw.rglob("*.jpg"))[:3]
    explained = tmp_path / "explained"
    status = predict.main(["--export_dir", str(workdir / "export"), "--json", "--top_k", "3",
                           "--explain", str(explained), *map(str, images)])
    out = capsys.readouterr().out
    assert status == 0
    records = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["file"] for r in records] == [str(p) for p in images]
    assert all(r["predictions"][0]["class"] in results["class_names"] for r in records)
    pngs = sorted(explained.glob("*.png"))
    assert len(pngs) == 3
    with Image.open(pngs[0]) as image:
        assert image.format == "PNG"
