"""The whole pipeline on the synthetic miniature, on the CPU: study (train + evaluate +
report, a crashing run reported while the others go on, finished runs skipped on a
rerun), then export of the trained run through launch.py and predict with --explain.

Training all seven models would take CPU minutes each, so the study runs one real model
and one whose launch is replaced by a crashing command; the per-model code path is the
same for all seven.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from msff_jax.inference import predict
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


def test_study_export_predict(miniature, tmp_path, monkeypatch, capsys):
    raw, shards = miniature
    runs = tmp_path / "runs"
    # Only the launch.py subprocesses read this: one device compiles faster than eight.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    real_command = study.launch_command

    def crash_msff_base(model, args, overrides):
        if model == "msff_base":
            return [sys.executable, "-c", "import sys; print('simulated crash'); sys.exit(3)"]
        return real_command(model, args, overrides)

    monkeypatch.setattr(study, "launch_command", crash_msff_base)
    common = ["--runs_dir", str(runs), "--data_dir", str(shards), "--demo", "--tiny", *TINY_RECIPE]

    status = study.main(common + ["--models", "msff_base,msff_ecomnet"])
    out = capsys.readouterr().out
    assert status == 1, out
    assert "msff_base: FAILED (exit 3)" in out and "simulated crash" in out
    results = json.loads((runs / "msff_ecomnet" / "eval_results.json").read_text())
    assert results["model"] == "msff_ecomnet" and results["step"] >= 1
    markdown = (runs / "report.md").read_text()
    table2 = markdown.split("## Table 2")[1].split("## Table 3")[0]
    full_row = next(line for line in table2.splitlines() if "`msff_ecomnet`" in line)
    base_row = next(line for line in table2.splitlines() if "`msff_base`" in line)
    assert f"| {100 * results['top1']:.2f} | 89.56 |" in full_row
    assert base_row.count("missing") == 4
    assert (runs / "accuracy_vs_params.png").exists()

    # Rerun: the finished run is skipped, not retrained.
    status = study.main(common + ["--models", "msff_ecomnet", "--skip_report"])
    assert status == 0
    assert "msff_ecomnet: finished earlier, skipped" in capsys.readouterr().out

    # Export the trained run the way a user does.
    workdir = runs / "msff_ecomnet"
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
