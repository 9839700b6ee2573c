"""`--mode plan`: what a run will cost on a GPU, answered on any machine.

    python launch.py --mode plan --config configs/default.py --workdir /tmp/plan \
        [--config.plan.device=h100] [--config.plan.num_devices=8]

XLA compiles the run's programs (train step, eval step, exported inference function)
for the target GPU on this machine, without one (`programs.py`), and the compiled plans
are read for memory (`memory.py`) and for the kernels they launch (`kernels.py`). The
figures go to the console, WORKDIR/plan.md and WORKDIR/plan.json. Every time figure is
an estimate from the compiled plan, labelled so, never a measurement.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import jax

from msff_jax import console
from msff_jax.analysis.plan import kernels, memory, programs, report
from msff_jax.analysis.plan.targets import get_target

PLAN_JSON = "plan.json"
PLAN_MD = "plan.md"


def _one_line(err: BaseException, limit: int = 400) -> str:
    """The compiler's message on one line, shortened: its first lines carry the cause."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def plan_program(program: programs.Program, target, usable: float, *,
                 search_max_batch: bool, hlo_dir: Path | None = None) -> dict:
    """Compiles one program at its configured batch and reads its plan."""
    started = time.monotonic()
    result = {"compiled": False, "error": None, "global_batch": program.batch_size,
              "num_devices": program.num_devices}
    try:
        compiled = program.lower(program.batch_size).compile()
    except Exception as err:  # noqa: BLE001 - the compiler's refusal is the answer.
        result["error"] = f"{program.name} does not compile for {target.name}: {_one_line(err)}"
        result["compile_s"] = time.monotonic() - started
        return result
    result["compile_s"] = time.monotonic() - started
    used = memory.memory_of(compiled)
    result.update(compiled=True, memory=used, fits=used["peak_bytes"] <= usable,
                  max_global_batch=None)
    text = compiled.as_text()
    result.update(kernels.analyse(text, target, program.num_devices))
    if hlo_dir is not None:
        hlo_dir.mkdir(parents=True, exist_ok=True)
        (hlo_dir / f"{program.name}.hlo.txt").write_text(text)
    del compiled, text

    if not result["fits"] or search_max_batch:
        def peak_at(batch: int) -> float:
            console.say(f"    {program.name}: compiling at global batch {batch}")
            try:
                return memory.memory_of(program.lower(batch).compile())["peak_bytes"]
            except Exception as err:  # noqa: BLE001 - too large to compile counts as over.
                console.say(f"    {program.name} at batch {batch} does not compile "
                            f"({_one_line(err, 120)}); counted as not fitting")
                return math.inf

        search = memory.largest_fitting_batch(
            peak_at, program.batch_unit, usable, {program.batch_size: used["peak_bytes"]})
        result["max_global_batch"] = search["max_global_batch"]
        result["max_global_batch_search"] = search
    return result


def run(config, workdir: str) -> dict:
    """Compiles the run's programs for `config.plan.device`; writes plan.md and plan.json."""
    settings = config.plan
    try:
        target = get_target(settings.device)
    except ValueError as err:
        raise console.ConfigError(str(err)) from err
    num_devices = int(settings.num_devices)
    names = tuple(settings.programs)
    unknown = [n for n in names if n not in programs.PROGRAMS]
    if unknown or not names:
        raise console.ConfigError(f"config.plan.programs={names} must name some of "
                                  f"{', '.join(programs.PROGRAMS)}.")
    devices = programs.compile_only_devices(target, num_devices)
    usable = target.memory_bytes * float(settings.memory_fraction)
    console.say(f"plan: {config.model} ({config.dtype}, {config.image_size} px) compiled for "
                f"{num_devices} x {target.description} on this machine "
                f"({jax.devices()[0].platform}; no GPU is used)")

    started = time.monotonic()
    results = {}
    for program in programs.build_programs(config, devices, names):
        console.say(f"  {program.name}: compiling at global batch {program.batch_size}")
        results[program.name] = plan_program(
            program, target, usable, search_max_batch=bool(settings.search_max_batch),
            hlo_dir=Path(workdir) / "hlo" if settings.get("save_hlo") else None)
        if results[program.name]["error"]:
            console.say(f"  {results[program.name]['error']}")

    plan = {
        "device": target.name,
        "device_description": target.description,
        "num_devices": num_devices,
        "device_memory_bytes": target.memory_bytes,
        "usable_memory_bytes": int(usable),
        "memory_fraction": float(settings.memory_fraction),
        "memory_bandwidth": target.memory_bandwidth,
        "peak_flops_16bit": target.peak_flops_16bit,
        "peak_flops_tf32": target.peak_flops_tf32,
        "model": config.model,
        "model_overrides": config.model_overrides.to_dict(),
        "dtype": config.dtype,
        "image_size": config.image_size,
        "grad_accum_steps": int(config.grad_accum_steps),
        "jax_version": jax.__version__,
        "estimate": "every time is a lower bound computed from the compiled plan "
                    "(no autotuning, no GPU): never a measurement",
        "programs": {
            name: dict(result, device_memory_bytes=target.memory_bytes)
            for name, result in results.items()
        },
        "plan_s": time.monotonic() - started,
    }
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / PLAN_JSON).write_text(json.dumps(plan, indent=2) + "\n")
    (out / PLAN_MD).write_text(report.markdown(plan))
    for line in report.console_table(plan):
        console.say(line)
    console.say(f"  wrote {os.path.join(workdir, PLAN_MD)} and {PLAN_JSON}")
    return plan
