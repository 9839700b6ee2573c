"""The user's path on one GPU, end to end, checked: issue 16's device check.

    python -m benchmarks.gpu_user_path --out_dir $OUT            # one GPU, a few minutes
    python -m benchmarks.gpu_user_path --tiny --out_dir /tmp/up  # CPU check, tiny model

What a user does, through the command line only, on shards made on the spot
(`data_pipeline.conversion.synthetic` + `deepfashion`): train the default recipe
(MSFF-EComNet, 224 px, bf16, batch 256) for a few hundred steps with evaluations and
checkpoints; SIGTERM mid-run (the loop saves and exits), then the same command again,
which must resume from the saved step and finish; `--mode eval` of the best checkpoint;
`--mode export`; `predict` with the exported artifact on a few JPEGs on the GPU and
with JAX_PLATFORMS=cpu, probabilities compared. Measured on the way: the time to the
first training step (process start to the loop's 'first training step' line,
compilation included), the loop's images/s (its own logged windows, the first window of
each run left out; evaluation and saves fall outside the windows and are counted
separately) next to benchmark mode's figure for the same step (from the probe's JSON
when given, else a `--mode benchmark` run), and the peak device memory (nvidia-smi,
sampled, with XLA's preallocation off so the figure means something).

A package the path needs that this machine lacks (grain for the reader, TensorFlow for
TensorBoard summaries) is named in the report with what was skipped or how the project
degraded. Results: user_path.md (printed last) and user_path.json in `--out_dir`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
MD_NAME, JSON_NAME = "user_path.md", "user_path.json"
FIRST_STEP = re.compile(r"first training step \(step (\d+)\) done ([\d.]+) s")
WINDOW = re.compile(r"\[(\d+)\].*train/images_per_sec=([0-9.e+-]+)")
PREEMPTED = re.compile(r"preempted: checkpoint at step (\d+) written")
RESUMED = re.compile(r"resuming from \S+ step (\d+)")
PROB_TOLERANCE = 0.02  # Max |p_gpu - p_cpu|: one bf16 artifact, two backends' kernels.


class Report:
    def __init__(self):
        self.checks: list[tuple[str, str, str]] = []  # (what, PASS/FAIL/SKIPPED/INFO, detail)
        self.figures: dict[str, Any] = {}

    def add(self, what: str, verdict: str, detail: str = "") -> None:
        self.checks.append((what, verdict, detail))
        print(f"=== {verdict}: {what}{': ' + detail if detail else ''}", flush=True)


class GpuMemorySampler:
    """Peak of nvidia-smi's memory.used while a block runs (None without nvidia-smi)."""

    def __init__(self):
        self.peak_mib: Optional[float] = None
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                value = max(float(v) for v in out.split())
                self.peak_mib = max(self.peak_mib or 0.0, value)
            except (subprocess.SubprocessError, ValueError, OSError):
                pass
            self._stop.wait(0.5)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=15)
        return False


def run_streaming(command, env, log_path: Path, timeout_s: float, on_line=None) -> tuple[int, float, list[str]]:
    """Runs `command`, teeing its output to `log_path`; `on_line(line, process, elapsed)`
    sees each line as it comes. Returns (exit code, wall seconds, lines)."""
    start = time.perf_counter()
    lines: list[str] = []
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        timer = threading.Timer(timeout_s, process.kill)
        timer.start()
        try:
            for line in process.stdout:
                log.write(line)
                lines.append(line)
                if on_line:
                    on_line(line, process, time.perf_counter() - start)
            code = process.wait()
        finally:
            timer.cancel()
    return code, time.perf_counter() - start, lines


def tail(lines: list[str], n: int = 15) -> str:
    """What a failed child said: its `error:` lines (the project's one-line errors) when
    it printed any, so a table cell shows the cause rather than the library log lines
    before it; else its last `n` lines."""
    errors = [line for line in lines if line.startswith("error:")]
    return "".join(errors[-3:] or lines[-n:])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_user_path")))
    parser.add_argument("--tiny", action="store_true", help="tiny model, 32 px, float32, CPU")
    parser.add_argument("--model", default=None, help="default msff_ecomnet (tiny: resnet50's tiny preset)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (300; tiny 8)")
    parser.add_argument("--benchmark_json", type=Path, default=None,
                        help="gpu_probe.json of the same call: its baseline row is benchmark mode's figure")
    parser.add_argument("--step_timeout_s", type=float, default=None, help="limit of each command")
    parser.add_argument("--keep", type=Path, default=None, help="keep the workdir here (debugging)")
    args = parser.parse_args(argv)
    tiny = args.tiny
    model = args.model or ("resnet50" if tiny else "msff_ecomnet")
    steps = args.steps or (8 if tiny else 200)
    every = max(2, steps // 4)  # Checkpoints; evaluation at half and the end.
    sigterm_after = steps // 2 + 1
    log_every = 2 if tiny else 25
    limit = args.step_timeout_s or (300 if tiny else 240)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = Report()
    start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="gpu_user_path_"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_PYTHON_CLIENT_PREALLOCATE="false",
               # The rerun and eval reuse the first run's executables, as a user with the cache would.
               JAX_COMPILATION_CACHE_DIR=str(scratch / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    have = {m: importlib.util.find_spec(m) is not None for m in ("grain", "tensorflow", "clu", "ml_collections")}
    report.figures["packages"] = have
    gpu = shutil.which("nvidia-smi") is not None and not tiny
    runs: list[dict[str, Any]] = []

    def stop(signum, frame):
        raise TimeoutError(f"signal {signum}: stopped by the caller's time limit")

    signal.signal(signal.SIGTERM, stop)  # `timeout` in gpu_check.sh: still write the report.
    try:
        # ------------------------------------------------------------------ shards
        raw, data = scratch / "deepfashion", scratch / "shards"
        t0 = time.perf_counter()
        made = subprocess.run(
            [sys.executable, "-m", "data_pipeline.conversion.synthetic", "--output_dir", str(raw),
             "--num_images", "600" if tiny else "2000", "--image_size", "64" if tiny else "300"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
        if made.returncode == 0:
            made = subprocess.run(
                [sys.executable, "-m", "data_pipeline.conversion.deepfashion", "--deepfashion_dir", str(raw),
                 "--output_dir", str(data), "--max_images", "0", "--split", "8:1:1"],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
        if made.returncode != 0 or not (data / "manifest.json").exists():
            report.add("shards made", "FAIL", made.stderr[-800:])
            return finish(report, args, start)
        manifest = json.loads((data / "manifest.json").read_text())
        counts = {k: v["num_examples"] for k, v in manifest["splits"].items()}
        report.add("shards made", "PASS", f"{counts} in {time.perf_counter() - t0:.0f}s")
        if not have["grain"]:
            report.add("training, resume, eval, export, predict", "SKIPPED",
                       "grain is not importable here (carry its wheels in .whl/); the reader needs it")
            return finish(report, args, start)
        report.add("TensorBoard writer", "INFO", "TensorFlow present: clu's summaries" if have["tensorflow"]
                   else "TensorFlow missing: the loop's stand-in writer (log + tensorboard/scalars.jsonl)")

        # ------------------------------------------------------------------ train
        work = scratch / "run"
        overrides = []
        if tiny:
            from msff_jax.models import TINY_OVERRIDES

            overrides = [f"--config.model_overrides={TINY_OVERRIDES[model]!r}", "--config.image_size=32",
                         "--config.batch_size=8", "--config.eval_batch_size=8", "--config.dtype=float32",
                         "--config.data.worker_count=0", "--config.export_platforms=('cpu',)"]
        else:
            overrides = ["--config.data.worker_count=12"]
        # --verbosity=0: the library log lines (absl INFO) this script reads are shown.
        common = ["--verbosity=0", f"--config=configs/default.py:{model}", f"--workdir={work}",
                  f"--config.data_dir={data}", *overrides]
        train = [sys.executable, "launch.py", *common, f"--config.num_train_steps={steps}",
                 f"--config.eval_every_steps={steps // 2}", f"--config.checkpoint.every_steps={every}",
                 f"--config.log_every_steps={log_every}"]
        batch = 8 if tiny else 256
        for attempt in ("first", "resumed"):
            seen: dict[str, Any] = {"windows": [], "first_step_s": None, "loop_first_step_s": None,
                                    "sigterm_at_s": None}

            def on_line(line, process, elapsed, seen=seen, attempt=attempt):
                if (m := FIRST_STEP.search(line)) and seen["first_step_s"] is None:
                    seen["first_step_s"], seen["loop_first_step_s"] = elapsed, float(m.group(2))
                if m := WINDOW.search(line):
                    seen["windows"].append((int(m.group(1)), float(m.group(2))))
                    if (attempt == "first" and seen["sigterm_at_s"] is None
                            and int(m.group(1)) >= sigterm_after):
                        seen["sigterm_at_s"] = elapsed
                        process.send_signal(signal.SIGTERM)
                if m := PREEMPTED.search(line):
                    seen["preempted_at"] = int(m.group(1))
                if m := RESUMED.search(line):
                    seen["resumed_from"] = int(m.group(1))

            with GpuMemorySampler() as sampler:
                code, wall, lines = run_streaming(train, env, scratch / f"train_{attempt}.log", limit, on_line)
            seen.update(exit_code=code, wall_s=wall, gpu_peak_mib=sampler.peak_mib)
            runs.append(seen)
            if code != 0:
                report.add(f"training ({attempt} run) exits 0", "FAIL", f"exit {code}:\n{tail(lines)}")
                return finish(report, args, start, runs=runs)
        first, resumed = runs
        if first.get("preempted_at") is None:
            report.add("SIGTERM mid-run saves and stops", "FAIL",
                       f"no 'preempted' line (SIGTERM sent at {first['sigterm_at_s']}s)")
        else:
            report.add("SIGTERM mid-run saves and stops", "PASS", f"saved at step {first['preempted_at']} of {steps}")
        ok = resumed.get("resumed_from") is not None and resumed.get("resumed_from") == first.get("preempted_at")
        report.add("rerun resumes from the saved step", "PASS" if ok else "FAIL",
                   f"resumed from {resumed.get('resumed_from')}, saved {first.get('preempted_at')}")
        final = work / "eval_results.json"
        finished = final.exists() and json.loads(final.read_text()).get("step") is not None
        report.add("rerun finishes with the final report", "PASS" if finished else "FAIL",
                   f"{final.name}: step {json.loads(final.read_text()).get('step')}" if finished else "missing")
        ttfs = first["first_step_s"]
        report.figures.update(time_to_first_step_s=ttfs, loop_reported_first_step_s=first["loop_first_step_s"],
                              resumed_time_to_first_step_s=resumed["first_step_s"],
                              gpu_peak_mib=max(filter(None, [r["gpu_peak_mib"] for r in runs]), default=None))
        if ttfs is not None:
            verdict = ("PASS" if ttfs < 90 else "FAIL") if gpu else "INFO"
            report.add("time to first step < 90 s (cold, compilation included)", verdict,
                       f"{ttfs:.1f}s from process start ({first['loop_first_step_s']:.1f}s inside the loop); "
                       f"resumed run {resumed['first_step_s'] or float('nan'):.1f}s (persistent cache)")
        else:
            report.add("time to first step", "FAIL", "no 'first training step' line in the log")

        # Loop images/s: the windows after each run's first (which holds the compilation).
        rates = [rate for r in runs for _, rate in r["windows"][1:]]
        window_s = sum(log_every * batch / rate for rate in rates) if rates else 0.0
        loop_rate = statistics.median(rates) if rates else None
        bench_rate, bench_source = benchmark_rate(args, model, env, scratch, limit, tiny)
        report.figures.update(loop_images_per_s=loop_rate, loop_windows=len(rates),
                              benchmark_images_per_s=bench_rate, benchmark_source=bench_source,
                              train_wall_s=[r["wall_s"] for r in runs], windows_s=window_s)
        if loop_rate and bench_rate:
            ratio = loop_rate / bench_rate
            verdict = ("PASS" if ratio >= 0.95 else "FAIL") if gpu else "INFO"
            report.add("loop images/s within 5% of benchmark mode's", verdict,
                       f"loop {loop_rate:,.1f} (median of {len(rates)} windows) vs benchmark "
                       f"{bench_rate:,.1f} ({bench_source}) = {ratio:.3f}")
        else:
            report.add("loop images/s vs benchmark mode", "FAIL",
                       f"loop {loop_rate}, benchmark {bench_rate} ({bench_source})")
        outside = sum(r["wall_s"] for r in runs) - window_s - sum(r["first_step_s"] or 0 for r in runs)
        report.figures["outside_windows_s"] = outside
        report.add("time outside the timed windows", "INFO",
                   f"{outside:.1f}s over both runs (evaluations, saves, start-up after the first step, "
                   f"the first window of each run)")

        # ------------------------------------------------------------- eval, export
        code, wall, lines = run_streaming([sys.executable, "launch.py", *common, "--mode=eval"], env,
                                          scratch / "eval.log", limit)
        evals = sorted(work.glob("eval_*_step*.json"))
        report.add("--mode eval of the best checkpoint", "PASS" if code == 0 and evals else "FAIL",
                   f"{evals[-1].name} in {wall:.0f}s" if evals else tail(lines))
        code, wall, lines = run_streaming([sys.executable, "launch.py", *common, "--mode=export"], env,
                                          scratch / "export.log", limit)
        export = work / "export"
        exported = code == 0 and (export / "export.json").exists()
        report.add("--mode export", "PASS" if exported else "FAIL",
                   f"{sorted(p.name for p in export.iterdir())} in {wall:.0f}s" if exported else tail(lines))
        if exported:
            predict_check(report, export, raw, env, scratch, limit, gpu)
    except TimeoutError as error:
        report.add("user path completed", "FAIL", f"{error}; the checks above are what it reached")
    finally:
        if args.keep:
            shutil.copytree(scratch, args.keep, dirs_exist_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return finish(report, args, start, runs=runs)


def benchmark_rate(args, model, env, scratch, limit, tiny) -> tuple[Optional[float], str]:
    """Benchmark mode's training images/s for the same model, batch and dtype."""
    batch = 8 if tiny else 256
    if args.benchmark_json and args.benchmark_json.exists():
        row = json.loads(args.benchmark_json.read_text()).get("rows", {}).get(f"jax:{model}", {})
        if row.get("train_img_s") and row.get("batch_size") == batch:
            return row["train_img_s"], f"gpu_probe row jax:{model} of {args.benchmark_json.name}"
    config = "configs/benchmark.py:cpu_tiny" if tiny else "configs/benchmark.py"
    work = scratch / "benchmark"
    code, wall, lines = run_streaming(
        [sys.executable, "launch.py", "--mode=benchmark", f"--config={config}", f"--workdir={work}",
         f"--config.benchmark.models=('{model}',)", "--config.benchmark.include_inference=False"],
        env, scratch / "benchmark.log", limit)
    csv_path = work / "benchmark.csv"
    if code != 0 or not csv_path.exists():
        return None, f"--mode benchmark failed: {tail(lines, 3)}"
    from msff_jax.analysis.benchmark import outputs

    rows = outputs.read_csv(csv_path)
    return (float(rows[0]["train_samples_per_sec"]) if rows else None), f"--mode benchmark run ({wall:.0f}s)"


def predict_check(report: Report, export: Path, raw: Path, env, scratch: Path, limit, gpu: bool) -> None:
    """predict on a few JPEGs on the default platform (the GPU) and on the CPU, compared."""
    jpegs = sorted(raw.rglob("*.jpg"))[:4]
    probabilities = {}
    for platform in ("cuda" if gpu else "default", "cpu"):
        run_env = dict(env)
        if platform != "default":
            run_env["JAX_PLATFORMS"] = platform
        code, wall, lines = run_streaming(
            [sys.executable, "-m", "msff_jax.inference.predict", "--export_dir", str(export), "--json",
             "--top_k", "1000", *map(str, jpegs)], run_env, scratch / f"predict_{platform}.log", limit)
        records = [json.loads(line) for line in lines if line.startswith("{")]
        if code != 0 or len(records) != len(jpegs):
            report.add(f"predict with the export on {platform}", "FAIL", f"exit {code}: {tail(lines, 5)}")
            return
        probabilities[platform] = {r["file"]: {p["index"]: p["probability"] for p in r["predictions"]}
                                   for r in records}
        report.add(f"predict with the export on {platform}", "PASS", f"{len(records)} JPEGs in {wall:.1f}s")
    (a_name, a), (b_name, b) = probabilities.items()
    diff = max(abs(a[f][k] - b[f][k]) for f in a for k in a[f])
    top1 = sum(max(a[f], key=a[f].get) == max(b[f], key=b[f].get) for f in a)
    report.figures["predict_max_abs_prob_diff"] = diff
    verdict = "PASS" if diff <= PROB_TOLERANCE and top1 == len(a) else "FAIL"
    note = "" if gpu else " (no GPU here: both runs on the CPU; the CUDA artifact is still due)"
    report.add(f"probabilities {a_name} vs {b_name}", verdict,
               f"max |diff| {diff:.2e} (tolerance {PROB_TOLERANCE}), top-1 agree {top1}/{len(a)}{note}")


def finish(report: Report, args, start: float, runs=None) -> int:
    report.figures["wall_s"] = time.perf_counter() - start
    report.figures["host_peak_rss_mb_children"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    failed = [c for c in report.checks if c[1] == "FAIL"]
    lines = [f"# User path ({'tiny, CPU' if args.tiny else 'one GPU'}), "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "", "| check | verdict | detail |",
             "|---|---|---|"]
    lines += [f"| {what} | {verdict} | {detail.replace('|', '/').replace(chr(10), ' ')[:400]} |"
              for what, verdict, detail in report.checks]
    f = report.figures
    peak = f.get("gpu_peak_mib")
    lines += ["", f"Peak device memory (nvidia-smi, preallocation off): "
                  f"{f'{peak / 1024:.2f} GiB' if peak else 'n/a (no nvidia-smi)'}; host peak RSS of a child "
                  f"{f['host_peak_rss_mb_children']:.0f} MB; {len(failed)} failed; {f['wall_s']:.0f}s in all.", ""]
    (args.out_dir / MD_NAME).write_text("\n".join(lines) + "\n")
    (args.out_dir / JSON_NAME).write_text(json.dumps(
        {"checks": report.checks, "figures": report.figures, "runs": runs}, indent=1, default=str))
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
