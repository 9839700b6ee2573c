"""The compiled plan of the training step, before and after each change that made it, as
one table (BENCHMARKS.md, "Plan figures").

    python -m benchmarks.plan_table --out_dir runs/plan_table       # about 5 minutes here
    python -m benchmarks.plan_table --device h200 --only msff_ecomnet

Every row compiles the train step of `configs/default.py:MODEL` for the target GPU on
this machine (`--mode plan`'s programs, `msff_jax.analysis.plan`) with the speed options
of that row; the options are the switches that keep the old forms (`batch_norm_backward`,
`iasm_spatial`, `config.train_step.packed_update`, `fuse_pointwise`,
`channel_alignment`), so the first row of each model is the step before any change and
each row after it turns one change on. The figures are the plan's: kernels launched,
bytes at kernel boundaries, temporaries, unaligned 16-bit convolutions and the lower
bound on step time, an estimate from the compiled plan, never a measurement.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from msff_jax import cuda_plugin

cuda_plugin.quiet_start()

OLD_STEP = {"batch_norm_backward": "autodiff", "iasm_spatial": "cudnn", "packed_update": False,
            "fuse_pointwise": False, "channel_alignment": 1}
NEW_STEP = {"batch_norm_backward": "two_pass", "iasm_spatial": "shifted", "packed_update": True,
            "fuse_pointwise": True, "channel_alignment": 8}
# (row, the options that differ from the old step). ResNet-50 has no MSFF options.
ROWS = {
    "msff_ecomnet": [
        ("before: autodiff BatchNorm, per-leaf update, cuDNN 7x7, plain channels", {}),
        ("+ two-pass BatchNorm", {"batch_norm_backward": "two_pass"}),
        ("+ packed bookkeeping", {"packed_update": True}),
        ("+ IASM without cuDNN", {"iasm_spatial": "shifted"}),
        ("+ fused pointwise", {"fuse_pointwise": True}),
        ("+ channel alignment 8", {"channel_alignment": 8}),
        ("all of them (the default)", NEW_STEP),
        ("all but alignment", dict(NEW_STEP, channel_alignment=1)),
    ],
    "resnet50": [
        ("before: autodiff BatchNorm, per-leaf update", {}),
        ("+ two-pass BatchNorm", {"batch_norm_backward": "two_pass"}),
        ("+ packed bookkeeping", {"packed_update": True}),
        ("both (the default)", {"batch_norm_backward": "two_pass", "packed_update": True}),
    ],
}


def config_for(model: str, options: dict):
    from configs import default

    config = default.get_config(model)
    settings = dict(OLD_STEP, **options)
    config.train_step.packed_update = settings.pop("packed_update")
    overrides = {"max_pool_backward": "gather", "batch_norm_backward": settings["batch_norm_backward"]}
    if model.startswith("msff_"):
        overrides.update(settings)
    config.model_overrides = overrides
    config.plan.programs = ("train_step",)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="h100")
    parser.add_argument("--only", default="", help="a model name (default: every model)")
    parser.add_argument("--out_dir", default="runs/plan_table")
    args = parser.parse_args()

    import jax
    import jaxlib

    from msff_jax.analysis.plan import programs, targets
    from msff_jax.analysis.plan.run import plan_program

    target = targets.get_target(args.device)
    devices = programs.compile_only_devices(target, 1)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model, variants in ROWS.items():
        if args.only and model != args.only:
            continue
        for label, options in variants:
            config = config_for(model, options)
            (train,) = programs.build_programs(config, devices, ("train_step",))
            started = time.monotonic()
            result = plan_program(train, target, target.memory_bytes * 0.75, search_max_batch=False)
            if not result["compiled"]:
                raise SystemExit(f"{model} [{label}]: {result['error']}")
            rows.append({"model": model, "row": label, "kernels": result["kernels"]["total"],
                         "gb": result["bytes"] / 1e9, "temp_gb": result["memory"]["temp_bytes"] / 1e9,
                         "unaligned": len(result["unaligned_convs"]),
                         "convs": sum(result["kernels"][k] for k in result["kernels"]
                                      if k.startswith("cudnn_conv")),
                         "lower_bound_ms": 1e3 * result["lower_bound_step_s"],
                         "compile_s": time.monotonic() - started})
            r = rows[-1]
            print(f"{model:13s} {label:70s} {r['kernels']:5d} kernels {r['gb']:6.1f} GB "
                  f"temp {r['temp_gb']:5.2f} GB unaligned {r['unaligned']:3d}/{r['convs']:3d} "
                  f"bound {r['lower_bound_ms']:5.1f} ms", flush=True)
    (out / "plan_table.json").write_text(json.dumps(
        {"device": target.name, "batch": 256, "dtype": "bfloat16", "image_size": 224,
         "jax": jax.__version__, "jaxlib": jaxlib.__version__, "rows": rows}, indent=2) + "\n")
    lines = [f"| model | step | kernels | GB at kernel boundaries | temporaries GB | unaligned 16-bit convs | lower bound ms ({target.name}, estimate) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['row']} | {r['kernels']:,} | {r['gb']:.1f} | {r['temp_gb']:.2f} | "
              f"{r['unaligned']} of {r['convs']} | {r['lower_bound_ms']:.1f} |" for r in rows]
    (out / "plan_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
