"""A converted product catalogue is a dataset like any other: the tiny run trains on it
with class weights on, resumes bitwise from an earlier checkpoint, and exports.

Real `launch.py` processes, as tests/test_resume.py runs them (its helpers), on the
folder that tests/catalogue_data.py makes (15 classes of uneven size, broken files
skipped). Preemption itself is tested on the digits in tests/test_resume.py; here the
run resumes as after a crash, from its oldest kept checkpoint.
"""

import json
import os
import shutil
import subprocess

import pytest

from catalogue_data import make_catalogue
from data_pipeline.conversion.catalogue import convert as catalogue
from test_resume import REPO, assert_bitwise_equal, final_params, launch_args, run_to_end, subprocess_env

NUM_STEPS = 12  # configs/digits.py:tiny: checkpoints every 3 steps, evaluations every 5

# configs/digits.py:tiny with the catalogue's data, its class count and class weights.
CONFIG_TEMPLATE = '''
from configs import digits


def get_config():
    config = digits.get_config("tiny")
    config.data_dir = {data_dir!r}
    config.num_classes = {num_classes}
    config.class_weights = "balanced"
    return config
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue_training")
    truth = make_catalogue(root / "photos", seed=1)
    manifest, report = catalogue.convert(root / "photos", root / "shards", skip_bad=True, num_workers=1,
                                         progress=False)
    assert report["class_imbalance"]["ratio"] >= 3  # the weights have something to do
    config = root / "catalogue_config.py"
    config.write_text(CONFIG_TEMPLATE.format(data_dir=str(root / "shards"),
                                             num_classes=len(manifest["class_names"])))
    env = subprocess_env(str(root / "jax_cache"))
    run_to_end(str(config), str(root / "reference"), env)
    return dict(root=root, truth=truth, manifest=manifest, config=str(config), env=env)


def test_trains_and_resumes_bitwise_with_class_weights(trained):
    reference, step = final_params(trained["config"], str(trained["root"] / "reference"))
    assert step == NUM_STEPS
    results = json.loads((trained["root"] / "reference" / "eval_results.json").read_text())
    assert results["class_names"] == trained["manifest"]["class_names"]
    assert results["num_examples"] == trained["manifest"]["splits"]["test"]["num_examples"]
    # As after a crash: only the oldest checkpoint left, no final report.
    workdir = trained["root"] / "crashed"
    shutil.copytree(trained["root"] / "reference", workdir)
    (workdir / "eval_results.json").unlink()
    kept = sorted(int(step) for step in os.listdir(workdir / "checkpoints"))
    assert kept[0] < NUM_STEPS - 2, kept
    for step in kept[1:]:
        shutil.rmtree(workdir / "checkpoints" / str(step))
    log = run_to_end(trained["config"], str(workdir), trained["env"], "--verbosity=0")
    assert f"step {kept[0]}" in log and "resuming from" in log, log[-3000:]
    resumed, step = final_params(trained["config"], str(workdir))
    assert step == NUM_STEPS
    assert_bitwise_equal(resumed, reference)


def test_exports_with_the_catalogue_class_names(trained):
    workdir = str(trained["root"] / "reference")
    result = subprocess.run(launch_args(trained["config"], workdir, "--mode=export"), cwd=REPO,
                            env=trained["env"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = json.loads(open(os.path.join(workdir, "export", "export.json")).read())
    assert exported["class_names"] == trained["manifest"]["class_names"]
    assert exported["num_classes"] == 15
