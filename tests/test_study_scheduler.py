"""The study's side-by-side scheduler with simulated GPUs and stand-in processes (no JAX
in the runs), its flags, and the parameter-matched ablations' counts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from msff_jax.console import ConfigError

from msff_jax.analysis import study

# A stand-in for launch.py: records its devices and times, sleeps, and either writes an
# eval_results.json or fails.
_FAKE_RUN = """
import json, os, sys, time
workdir, fail = sys.argv[1], sys.argv[2] == "1"
start = time.time()
time.sleep(0.6)
with open(os.path.join(workdir, "seen.json"), "w") as f:
    json.dump({"devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start,
               "end": time.time()}, f)
if fail:
    print("simulated failure")
    sys.exit(5)
open(os.path.join(workdir, "eval_results.json"), "w").write("{}")
"""


def _options(tmp_path, **changes):
    argv = ["--runs_dir", str(tmp_path), "--data_dir", str(tmp_path / "data"),
            "--models", "msff_base,msff_iasm,msff_ecomnet", "--seeds", "2",
            "--matched_ablations", "--config.batch_size=8"]
    for key, value in changes.items():
        argv += [f"--{key}", str(value)]
    return study.parse_args(argv)


def test_parallel_runs_get_disjoint_device_groups_and_failures_are_reported(tmp_path, capsys):
    options = _options(tmp_path, parallel=2, devices_per_run=2)
    specs = study.plan_runs(options)
    assert len(specs) == 10  # 3 models + 2 matched variants, 2 seeds each
    assert [s.seed for s in specs[:5]] == [0] * 5  # seed-major
    fake = study.Devices(kind="Simulated GPU", ids=("0", "1", "2", "3"))
    groups = study.device_groups(fake, options.parallel, options.devices_per_run)
    assert groups == [("0", "1"), ("2", "3")]
    failing = specs[3]

    def command_for(spec):
        return [sys.executable, "-c", _FAKE_RUN, str(spec.workdir), "1" if spec == failing else "0"]

    statuses = study.run_all(specs, groups, fake, command_for)
    out = capsys.readouterr().out
    assert statuses[failing] == "failed (exit 5)"
    assert all(statuses[s] == "trained" for s in specs if s != failing)
    assert f"{failing.name}: FAILED (exit 5)" in out and "simulated failure" in out

    seen = [json.loads((s.workdir / "seen.json").read_text()) for s in specs]
    assert {entry["devices"] for entry in seen} == {"0,1", "2,3"}
    overlapping = 0
    for i, first in enumerate(seen):
        for second in seen[i + 1:]:
            if first["start"] < second["end"] and second["start"] < first["end"]:
                overlapping += 1
                assert first["devices"] != second["devices"]  # never the same GPUs at once
    assert overlapping >= 1  # two at a time, not one after another
    record = json.loads((failing.workdir / study.RUN_RECORD).read_text())
    assert record["status"] == "failed (exit 5)" and record["device_count"] == 2
    assert record["device_kind"] == "Simulated GPU"
    assert record["device_hours"] == pytest.approx(2 * record["wall_time_s"] / 3600)
    assert record["attempts"][0]["devices"] in (["0", "1"], ["2", "3"])

    # A rerun skips the finished runs and retries the failed one, adding an attempt.
    start = time.time()
    statuses = study.run_all(specs, groups, fake, command_for)
    assert statuses[failing] == "failed (exit 5)"
    assert sum(status == "skipped (finished)" for status in statuses.values()) == 9
    record = json.loads((failing.workdir / study.RUN_RECORD).read_text())
    assert len(record["attempts"]) == 2
    assert record["wall_time_s"] == pytest.approx(sum(a["wall_time_s"] for a in record["attempts"]))
    assert time.time() - start < 30


def test_device_groups():
    gpus = study.Devices(kind="GPU", ids=tuple(str(i) for i in range(8)))
    assert study.device_groups(gpus, 1) == [tuple(str(i) for i in range(8))]
    assert study.device_groups(gpus, 8) == [(str(i),) for i in range(8)]
    assert study.device_groups(gpus, 3) == [("0", "1"), ("2", "3"), ("4", "5")]
    with pytest.raises(ConfigError, match="needs 12 GPUs; 8 are visible"):
        study.device_groups(gpus, 4, 3)
    assert study.device_groups(study.Devices(kind="cpu"), 4) == [()]


def test_flags(tmp_path):
    options = _options(tmp_path)
    assert options.variants == ("msff_base", "msff_iasm", "msff_ecomnet",
                                "msff_base@matched", "msff_iasm@matched")
    assert options.seeds == (0, 1) and options.overrides == ("--config.batch_size=8",)
    spec = study.plan_runs(options)[-1]
    assert spec.workdir == Path(tmp_path) / "msff_iasm@matched" / "seed1"
    command = study.launch_command(spec, options)
    assert any(a.endswith("configs/study.py:msff_iasm@matched") for a in command)
    assert "--config.seed=1" in command and "--config.batch_size=8" in command
    with pytest.raises(ConfigError, match="use --seeds N"):
        study.parse_args(["--runs_dir", str(tmp_path), "--demo", "--config.seed=3"])
    with pytest.raises(ConfigError, match="unknown models"):
        study.parse_args(["--runs_dir", str(tmp_path), "--demo", "--models", "vgg"])
    with pytest.raises(ConfigError, match="--data_dir is required"):
        study.parse_args(["--runs_dir", str(tmp_path)])

def test_a_bad_flag_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        study.parse_args(["--runs_dir", str(tmp_path), "--demo", "--parallel", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--parallel=0" in err and "Traceback" not in err


def test_main_turns_a_mistake_into_one_line(tmp_path, capsys):
    assert study.main(["--runs_dir", str(tmp_path), "--models", "vgg", "--demo"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown models ['vgg']") and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--show_traceback", "--show_traceback=true"])
def test_show_traceback_in_any_spelling_adds_the_traceback(tmp_path, capsys, flag):
    two_gpus = study.Devices(kind="Simulated GPU", ids=("0", "1"))
    argv = ["--runs_dir", str(tmp_path), "--demo", "--parallel", "3"]
    assert study.main(argv + [flag], devices=two_gpus) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "error: --parallel 3" in err
    assert study.main(argv, devices=two_gpus) == 1
    assert "Traceback" not in capsys.readouterr().err
    # A mistake found while the flags are read gets its traceback too when asked for.
    assert study.main(["--runs_dir", str(tmp_path), "--demo", "--models", "vgg", flag]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "error: unknown models ['vgg']" in err


def test_matched_ablations_within_two_percent_of_the_full_model():
    import jax
    import jax.numpy as jnp

    from configs import study as study_config
    from msff_jax.models import count_params, get_model

    def params(arg):
        config = study_config.get_config(arg)
        model = get_model(config.model, 15, **config.model_overrides.to_dict())
        shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                                jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
        return count_params(shapes)

    for recipe in ("", ",demo", ",demo,tiny"):
        full = params("msff_ecomnet" + recipe)
        for model in study_config.MATCHED_MODELS:
            literal, matched = params(model + recipe), params(model + "@matched" + recipe)
            assert literal > 1.5 * full, (model, recipe)  # why the matched variant exists
            assert abs(matched / full - 1) <= 0.02, (model, recipe, matched, full)
    assert params("msff_ecomnet") == 11_784_491
    with pytest.raises(ValueError, match="parameter-matched"):
        study_config.get_config("resnet50@matched")


# ------------------------------------------------------------------ attempts the study died in

_CHATTY_RUN = "import time\nfor i in range(600):\n    print('step', i, flush=True)\n    time.sleep(0.1)\n"

_STUDY_OF_ONE = """
import sys
from pathlib import Path
from msff_jax.analysis import study
spec = study.RunSpec("msff_base", 0, Path(sys.argv[1]))
study.run_one(spec, [sys.executable, "-c", sys.argv[2]], (), study.Devices(kind="cpu (test)"))
"""


def test_an_attempt_killed_with_the_study_is_recorded_and_counted(tmp_path):
    """SIGKILL to the study (and its training process) while a run trains: the attempt
    was written when it started, the report counts its time, and the next study run
    closes it before its own attempt."""
    from msff_jax.analysis import report

    workdir = tmp_path / "msff_base" / "seed0"
    process = subprocess.Popen([sys.executable, "-c", _STUDY_OF_ONE, str(workdir), _CHATTY_RUN],
                               start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            log = workdir / study.LOG_FILE
            if log.exists() and log.read_text().count("step ") >= 15:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the stand-in training never started")
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # The study and its training, as a lost machine.
        process.wait(timeout=60)
    record = json.loads((workdir / study.RUN_RECORD).read_text())
    (attempt,) = record["attempts"]
    assert attempt["status"] == "running" and attempt["ended_unix"] is None

    read = report.collect_records(tmp_path)
    ((run_dir, settled),) = read
    assert run_dir == workdir and settled["attempts"][0]["estimated"]
    assert settled["wall_time_s"] >= 1.0 and settled["device_hours"] > 0
    assert settled["status"].startswith("no end recorded")
    table = "\n".join(report.cost_table(tmp_path, read, {}))
    assert "`msff_base/seed0`" in table and "no end recorded" in table and "*" in table

    finish = f"open({str(workdir / 'eval_results.json')!r}, 'w').write('{{}}')"
    status = study.run_one(study.RunSpec("msff_base", 0, workdir), [sys.executable, "-c", finish],
                           (), study.Devices(kind="cpu (test)"))
    assert status == "trained"
    record = json.loads((workdir / study.RUN_RECORD).read_text())
    killed, second = record["attempts"]
    assert killed["status"] == "interrupted (the study stopped during it)" and killed["estimated"]
    assert killed["wall_time_s"] >= 1.0 and second["status"] == "trained"
    assert record["wall_time_s"] == pytest.approx(killed["wall_time_s"] + second["wall_time_s"])


def test_a_run_that_finished_as_the_study_died_is_in_the_cost_table(tmp_path):
    from msff_jax.analysis import report, run_record

    workdir = tmp_path / "resnet50" / "seed1"
    workdir.mkdir(parents=True)
    started = time.time() - 90
    run_record.begin_attempt(workdir, variant="resnet50", model="resnet50", seed=1, devices=["0"],
                             device_kind="GPU", started=started)
    (workdir / study.LOG_FILE).write_text("step 1\n")
    os.utime(workdir / study.LOG_FILE, (started + 60, started + 60))
    (workdir / "eval_results.json").write_text("{}")
    os.utime(workdir / "eval_results.json", (started + 80, started + 80))
    table = "\n".join(report.cost_table(tmp_path, report.collect_records(tmp_path), {}))
    row = next(line for line in table.splitlines() if "resnet50/seed1" in line)
    assert "trained (the study stopped before recording it)" in row and "0:01:20*" in row
    assert "not recorded" not in table
    # The next study run skips the finished run and writes the reading into the record.
    assert study.run_one(study.RunSpec("resnet50", 1, workdir), ["false"], ("0",),
                         study.Devices(kind="GPU", ids=("0",))) == "skipped (finished)"
    record = json.loads((workdir / study.RUN_RECORD).read_text())
    assert record["status"] == "trained (the study stopped before recording it)"
    assert record["wall_time_s"] == pytest.approx(80, abs=1) and record["attempts"][0]["ended_unix"]
