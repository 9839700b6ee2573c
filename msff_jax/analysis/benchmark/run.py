"""Benchmark mode: images per second of the real training step, per model.

    python launch.py --config configs/benchmark.py --workdir runs/bench

For each model in `config.benchmark.models` this builds exactly what training builds
(the optimizer of `msff_jax.train.optimizers`, the state of `msff_jax.train.state`, the jitted
step of `msff_jax.train.steps` with its donated state, BatchNorm update and on-device
normalisation of uint8 images), compiles it once ahead of time, and times it on a
synthetic batch already on the device: warm-up excluded, `block_until_ready` at the
end of each timed repeat, median over repeats. Then the same for the eval step.

Per model it reports parameters, forward FLOPs per image from XLA's cost analysis,
training and inference throughput, compile time, the step's device memory, and model
FLOPs utilisation (3x forward FLOPs per trained image, against the device's dense peak
from `benchmarking.device_peaks`). With `benchmark.end_to_end` it also feeds the same
compiled step from the grain reader over `config.data_dir`'s shards and reports that
rate beside the synthetic one, which shows whether training is input-bound.

Only this module's `run` touches data: the reader (and with it grain) is imported when
an end-to-end run is asked for, so the synthetic benchmark needs neither grain nor
TensorFlow.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from msff_jax import console
from msff_jax.train import class_weights
from msff_jax.train import mesh as mesh_lib
from msff_jax.analysis import flops
from msff_jax.train import optimizers
from msff_jax.train import steps
from msff_jax.train import state as train_state
from msff_jax.analysis.benchmark import device_peaks, kernel_profile, outputs, timing
from msff_jax.analysis.plan.beside_measurement import plan_columns
from msff_jax.models import TINY_OVERRIDES, count_params
from msff_jax.train.config_model import plain

CSV_NAME = "benchmark.csv"
TABLE_NAME = "benchmark.md"
PLOT_NAME = "throughput_vs_params.png"
DETAILS_NAME = "benchmark.json"
PROFILE_NAME = "kernel_profile.md"

# The optimizer's schedule needs a run length; it changes the learning rate, not the
# work a step does, so any value gives the same timings.
_NOMINAL_STEPS_PER_EPOCH = 1000


# ----------------------------------------------------------------------- entry point
def run(config, workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Benchmarks every configured model; writes CSV, markdown and plot into `workdir`.

    Returns this run's rows (the PyTorch rows of `benchmark.torch_csv`, if any, are
    merged into the files only).
    """
    bench = config.benchmark
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _check_config(config)
    mesh = mesh_lib.make_mesh(config.mesh_shape)
    environment = _environment(mesh)
    logging.info("benchmark on %s", environment)
    console.say(f"benchmark on {environment['device']} ({environment['device_kind']}): "
                f"{', '.join(bench.models)}; results in {workdir}")

    rows: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []
    for index, name in enumerate(bench.models, 1):
        console.say(f"[{index}/{len(bench.models)}] {name}: compiling and timing")
        model_config = _config_for_model(config, name)
        try:
            model_rows, model_details = _benchmark_model(
                model_config, mesh, environment, workdir / "profile" / name
            )
        except Exception as error:
            if not bench.continue_on_error:
                raise
            logging.exception("benchmark of %s failed; continuing", name)
            console.say(f"  {name} failed ({type(error).__name__}); continuing")
            details.append({"model": name, "error": f"{type(error).__name__}: {error}"})
            continue
        rows += model_rows
        details.append(model_details)
        for row in model_rows:
            print(_one_line_summary(row), flush=True)
        # Written after every model, so a run killed half-way keeps what it measured.
        _write_outputs(config, workdir, rows, details, environment)
    _write_outputs(config, workdir, rows, details, environment)
    return rows


def _check_config(config) -> None:
    """Fails before any compilation on settings no run could use."""
    bench = config.benchmark
    if not bench.models:
        raise ValueError("config.benchmark.models is empty; name at least one model.")
    for field in ("timed_steps", "repeats"):
        if bench[field] < 1:
            raise ValueError(f"config.benchmark.{field}={bench[field]} must be at least 1.")
    for field in ("warmup_steps", "end_to_end_warmup_steps", "profile_steps"):
        if bench[field] < 0:
            raise ValueError(f"config.benchmark.{field}={bench[field]} must be >= 0.")
    unknown = [m for m in bench.end_to_end_models if m not in bench.models]
    if bench.end_to_end and unknown:
        raise ValueError(
            f"config.benchmark.end_to_end_models {unknown} are not in "
            f"config.benchmark.models {list(bench.models)}; the end-to-end run reuses "
            "their compiled step."
        )
    if bench.end_to_end and not Path(config.data_dir, "manifest.json").exists():
        raise ValueError(
            f"config.benchmark.end_to_end needs shards, but {config.data_dir}/manifest.json "
            "does not exist; set --config.data_dir or turn end_to_end off."
        )
    if bench.torch_csv and not Path(bench.torch_csv).exists():
        raise ValueError(f"config.benchmark.torch_csv={bench.torch_csv!r} does not exist.")


def _config_for_model(config, name: str):
    """The benchmark config with `model`, its batch size and its module options set.

    Module options, later ones winning: the tiny preset (if asked for), the config's
    `model_overrides`, then `benchmark.per_model_overrides[name]`.
    """
    model_config = config.copy_and_resolve_references()
    bench = model_config.benchmark
    model_config.model = name
    overrides = dict(TINY_OVERRIDES[name]) if bench.tiny_models else {}
    overrides.update(plain(model_config.model_overrides))
    overrides.update(plain(bench.per_model_overrides.get(name, {})))
    model_config.model_overrides = overrides
    if name in bench.per_model_batch_size:
        model_config.batch_size = int(bench.per_model_batch_size[name])
    return model_config


# -------------------------------------------------------------------- one model
def _benchmark_model(config, mesh, environment, profile_dir: Path) -> tuple[list[dict], dict]:
    bench = config.benchmark
    # Built exactly as msff_jax.train.loop builds them.
    model = train_state.build_model(config)
    tx = optimizers.make_optimizer(config, _NOMINAL_STEPS_PER_EPOCH)
    state = train_state.create_train_state(
        config, model, tx, mesh, jax.random.PRNGKey(config.seed)
    )
    param_count = count_params({"params": state.params})
    sharding = mesh_lib.batch_sharding(mesh)
    details: dict[str, Any] = {
        "model": config.model,
        "batch_size": config.batch_size,
        "model_overrides": plain(config.model_overrides),
    }

    # Forward FLOPs per image come from the eval forward's cost analysis: counting
    # them in the train step would mix in the backward pass and optimizer.
    # The eval step evaluation uses: uint8 in, normalised on the device, logits out.
    forward = steps.make_eval_step(config, model, mesh)
    infer_batch = _synthetic_batch(config, bench.infer_batch_size, sharding, seed=1)
    forward_lowered, forward_compiled, forward_compile_s = timing.compile_ahead_of_time(
        forward, state.eval_variables(), infer_batch
    )
    forward_flops = (
        flops.counted_on_cpu(
            lambda v, x: model.apply(v, x, train=False),
            state.eval_variables(),
            jax.ShapeDtypeStruct(infer_batch["image"].shape, np.float32),
        )
        or flops.analysed_flops(forward_lowered)
        or flops.analysed_flops(forward_compiled)
    )
    forward_flops_per_image = forward_flops / bench.infer_batch_size if forward_flops else None

    train_step = steps.make_train_step(config, model, tx, mesh, class_weights.stand_in(config))
    train_batch = _synthetic_batch(config, config.batch_size, sharding, seed=0)
    train_lowered, train_compiled, train_compile_s = timing.compile_ahead_of_time(
        train_step, state, train_batch
    )
    train_flops = flops.analysed_flops(train_lowered)
    details.update(
        forward_flops_per_image=forward_flops_per_image,
        train_step_flops_per_image=train_flops / config.batch_size if train_flops else None,
        train_compile_s=train_compile_s,
        infer_compile_s=forward_compile_s,
    )

    holder = {"state": state}
    del state  # The step donates it; only `holder` may refer to the live buffers.

    def run_train_steps(count: int):
        for _ in range(count):
            holder["state"], metrics = train_compiled(holder["state"], train_batch)
        return holder["state"], metrics

    # Training and inference are timed under the same warm-up and repeat settings.
    time_per_step = functools.partial(
        timing.time_per_step,
        warmup_steps=bench.warmup_steps,
        timed_steps=bench.timed_steps,
        repeats=bench.repeats,
    )
    train_s, train_repeats = time_per_step(run_train_steps)
    details["train_step_s_per_repeat"] = train_repeats
    _check_finite_loss(run_train_steps, config.model)
    if bench.profile_steps:
        trace = kernel_profile.trace_steps(run_train_steps, bench.profile_steps, profile_dir)
        details["train_kernel_profile"] = kernel_profile.summarise_trace(
            trace, bench.profile_steps, expect_device=environment["platform"] != "cpu"
        )

    infer_s = None
    if bench.include_inference:
        variables = holder["state"].eval_variables()

        def run_infer_steps(count: int):
            return [forward_compiled(variables, infer_batch) for _ in range(count)]

        infer_s, infer_repeats = time_per_step(run_infer_steps)
        details["infer_step_s_per_repeat"] = infer_repeats

    peak = device_peaks.peak_flops_per_second(environment["device_kind"], config.dtype)
    train_rate = config.batch_size / train_s
    train_memory = timing.compiled_memory_bytes(train_compiled)
    row = _row(
        config,
        environment,
        param_count=param_count,
        forward_flops_per_image=forward_flops_per_image,
        train_s=train_s,
        infer_s=infer_s,
        mfu=device_peaks.model_flops_utilisation(
            forward_flops_per_image, train_rate, peak * mesh.size if peak else None
        ),
        compile_s=train_compile_s,
        train_memory_bytes=train_memory,
        input_name="synthetic",
    )
    # The compiled plan of the very step just timed, beside its time (GPU only).
    row.update(plan_columns(
        train_compiled.as_text() if environment["platform"] == "gpu" else None,
        platform=environment["platform"], device_kind=environment["device_kind"],
        num_devices=mesh.size, measured_step_s=train_s))
    details["allocator_peak_bytes_so_far"] = timing.allocator_peak_bytes(mesh.devices.flat[0])
    rows = [row]

    if bench.end_to_end and config.model in bench.end_to_end_models:
        e2e_s, e2e_repeats = _time_end_to_end(config, train_compiled, holder, sharding)
        details["end_to_end_step_s_per_repeat"] = e2e_repeats
        details["end_to_end_over_synthetic"] = train_s / e2e_s
        e2e_row = _row(
            config,
            environment,
            param_count=param_count,
            forward_flops_per_image=forward_flops_per_image,
            train_s=e2e_s,
            infer_s=None,
            mfu=device_peaks.model_flops_utilisation(
                forward_flops_per_image,
                config.batch_size / e2e_s,
                peak * mesh.size if peak else None,
            ),
            compile_s=None,
            train_memory_bytes=train_memory,
            input_name=f"shards ({config.data.worker_count} workers)",
        )
        rows.append(e2e_row)
    return rows, details


def _synthetic_batch(config, batch_size: int, sharding, seed: int) -> dict[str, jax.Array]:
    """Random uint8 images and labels, placed on the mesh like real batches.

    Random rather than constant pixels: constant inputs can run faster than real data.
    """
    rng = np.random.default_rng(seed)
    shape = (batch_size, config.image_size, config.image_size, 3)
    host = {
        "image": rng.integers(0, 256, size=shape, dtype=np.uint8),
        "label": rng.integers(0, config.num_classes, size=(batch_size,), dtype=np.int32),
    }
    return jax.device_put(host, sharding)


def _check_finite_loss(run_train_steps, model_name: str) -> None:
    """One more step, to make sure the timed step computes a finite loss.

    A step that produced NaNs could run at any speed; its figure would mean nothing.
    """
    _, metrics = run_train_steps(1)
    metrics = jax.device_get(metrics)
    if not np.isfinite(metrics["loss"]) or not metrics.get("finite", True):
        raise FloatingPointError(
            f"{model_name}: the benchmarked train step is not finite (loss "
            f"{metrics['loss']}, finite={metrics.get('finite')}); its timing would mean nothing."
        )


def _time_end_to_end(config, train_compiled, holder, sharding) -> tuple[float, list[float]]:
    """The compiled step fed from the shards by the grain reader and device feed.

    Worker start-up and the batches buffered meanwhile fall into the warm-up
    (`end_to_end_warmup_steps`); the median over repeats then reflects the steady
    state even if a buffer gives the first timed repeat a head start.
    """
    from data_pipeline.records import device_feed
    from data_pipeline.records import reader  # Grain only for this run.

    bench = config.benchmark
    iterator = reader.make_train_iterator(
        config.data_dir,
        split=config.train_split,
        global_batch_size=config.batch_size,
        image_size=config.image_size,
        seed=config.seed,
        worker_count=config.data.worker_count,
        scale_range=config.data.scale_range,
    )
    feed = device_feed.prefetch_to_mesh(iterator, sharding, size=bench.end_to_end_prefetch)
    try:

        def run_fed_steps(count: int):
            for _ in range(count):
                holder["state"], metrics = train_compiled(holder["state"], next(feed))
            return holder["state"], metrics

        return timing.time_per_step(
            run_fed_steps,
            warmup_steps=bench.end_to_end_warmup_steps,
            timed_steps=bench.timed_steps,
            repeats=bench.repeats,
        )
    finally:
        feed.close()


# ------------------------------------------------------------------------ results
def _row(
    config,
    environment,
    *,
    param_count: int,
    forward_flops_per_image: float | None,
    train_s: float,
    infer_s: float | None,
    mfu: float | None,
    compile_s: float | None,
    train_memory_bytes: int | None,
    input_name: str,
) -> dict[str, Any]:
    """One CSV row in timm's units: ms per step, millions of parameters, GMACs/image."""
    bench = config.benchmark
    return {
        "model": config.model + ("_tiny" if bench.tiny_models else ""),
        "infer_samples_per_sec": bench.infer_batch_size / infer_s if infer_s else None,
        "infer_step_time": 1e3 * infer_s if infer_s else None,
        "infer_batch_size": bench.infer_batch_size if infer_s else None,
        "train_samples_per_sec": config.batch_size / train_s,
        "train_step_time": 1e3 * train_s,
        "train_batch_size": config.batch_size,
        "param_count": param_count / 1e6,
        # A multiply-add is 2 FLOPs in XLA's count, 1 MAC in timm's.
        "gmacs": forward_flops_per_image / 2e9 if forward_flops_per_image else None,
        "framework": bench.framework,
        "device": environment["device"],
        "dtype": config.dtype,
        "mfu": mfu,
        "compile_s": compile_s,
        "train_memory_gb": train_memory_bytes / 1e9 if train_memory_bytes else None,
        "input": input_name,
    }


def _one_line_summary(row: dict[str, Any]) -> str:
    infer = row["infer_samples_per_sec"]
    return (
        f"benchmark {row['model']} [{row['input']}]: train {row['train_samples_per_sec']:.1f} "
        f"img/s ({row['train_step_time']:.2f} ms/step, batch {row['train_batch_size']})"
        + (f", infer {infer:.1f} img/s" if infer else "")
        + (f", {row['gmacs']:.3f} GMACs" if row["gmacs"] else "")
        + (f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] else "")
    )


def _environment(mesh) -> dict[str, Any]:
    device = mesh.devices.flat[0]
    count = mesh.size
    return {
        "device": device.device_kind + (f" x{count}" if count > 1 else ""),
        "device_kind": device.device_kind,
        "platform": device.platform,
        "device_count": count,
        "process_count": jax.process_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def _write_outputs(config, workdir: Path, rows, details, environment) -> None:
    """CSV (this run's rows), markdown table and plot (merged with PyTorch rows)."""
    if jax.process_index() != 0:
        return
    outputs.write_csv(workdir / CSV_NAME, rows)
    merged = list(rows)
    if config.benchmark.torch_csv:
        merged += outputs.read_csv(Path(config.benchmark.torch_csv))
    table = outputs.markdown_table(merged)
    (workdir / TABLE_NAME).write_text(table)
    profiles = [
        kernel_profile.markdown(d["train_kernel_profile"], f"{d['model']}: train step")
        for d in details
        if "train_kernel_profile" in d
    ]
    if profiles:
        (workdir / PROFILE_NAME).write_text("\n".join(profiles))
    if merged:
        outputs.plot_throughput_vs_params(merged, workdir / PLOT_NAME)
    (workdir / DETAILS_NAME).write_text(
        json.dumps(
            {
                "environment": environment,
                "config": config.to_dict(),
                "models": details,
                "conventions": {
                    "train_step_time": "ms per step, median over repeats",
                    "gmacs": "forward multiply-adds per image, XLA cost analysis / 2",
                    "mfu": "3 x forward FLOPs x train images/s / dense peak of all devices",
                    "train_memory_gb": "XLA buffer assignment of the train step: "
                    "arguments + outputs + temporaries - donated aliases",
                    "plan_lower_bound_ms": "GPU only: lower bound on the timed step from its "
                    "own compiled plan (msff_jax.analysis.plan); time_over_plan_bound = "
                    "measured step time / that bound",
                },
            },
            indent=2,
            default=str,
        )
    )
