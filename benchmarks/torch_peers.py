"""Times the PyTorch peers of our models, the way timm's `benchmark.py` does.

Users choose a framework by images per second, so our JAX numbers only mean something
next to what the same models reach in PyTorch on the same device in the same run. This
script times torchvision's ResNet-50, MobileNetV3-Large and EfficientNet-B0 and the
PyTorch twin of MSFF-EComNet (`benchmarks/msff_torch.py`) as timm does: synthetic data
already on the device, channels-last memory format, bfloat16 autocast, `torch.compile`
on and off, warm-up steps excluded, `torch.cuda.synchronize` around the timed region,
and the median over repeated timed rounds.

- Train step: the step of `benchmarks/torch_train_step.py`, which does the work of our
  JAX step with the recipe of `configs/default.py` for the model: uint8 images
  normalised on the device, cross-entropy with label smoothing, the global gradient
  norm and the finite guard, Nesterov SGD with coupled weight decay on kernels and the
  warm-up-cosine schedule. With `--compile on` the whole step function goes through
  `torch.compile` (forward, backward and update), in the mode `--compile_mode` names.
- Inference: normalisation and forward under `torch.inference_mode()` in eval mode,
  compiled as one function likewise.

Rows are appended to a CSV in the column order the JAX benchmark writes (timm's columns
plus framework, device, dtype, mfu, compile_s), so one table compares both frameworks.
A model that fails (under `torch.compile`, say) is reported on stderr and gets a row with
its measurement columns left empty; the others still run.

torch is not a dependency of the `msff_jax` package: install it with
`pip install -r requirements-torch.txt`.

    python -m benchmarks.torch_peers --batch_size 256 --compile both --csv bench.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torchvision

from benchmarks import msff_torch
from benchmarks import torch_train_step
from configs import default as default_config
from msff_jax.analysis.benchmark.device_peaks import peak_flops_per_second
# One column list for both frameworks' rows, so one table compares them.
from msff_jax.analysis.benchmark.outputs import CSV_COLUMNS


MODEL_BUILDERS: Dict[str, Callable[[int], nn.Module]] = {
    "resnet50": lambda n: torchvision.models.resnet50(weights=None, num_classes=n),
    "mobilenet_v3_large": lambda n: torchvision.models.mobilenet_v3_large(
        weights=None, num_classes=n
    ),
    "efficientnet_b0": lambda n: torchvision.models.efficientnet_b0(
        weights=None, num_classes=n
    ),
    "msff_ecomnet": lambda n: msff_torch.build_twin("msff_ecomnet", n),
}


def peak_flops(device_name: str, precision: str) -> Optional[float]:
    """Dense peak FLOP/s from the JAX benchmark's table (one table for both frameworks).

    torch's `get_device_name` and JAX's `device_kind` give the same string. TF32 has no
    entry, so a `tf32` run gets no MFU rather than one against the wrong ceiling.
    """
    return peak_flops_per_second(device_name, precision)


def build_model(name: str, num_classes: int) -> nn.Module:
    if name not in MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODEL_BUILDERS)}")
    return MODEL_BUILDERS[name](num_classes)


def count_forward_flops(model: nn.Module, image_size: int, device: torch.device) -> int:
    """FLOPs of one forward pass on one image (multiply-add = 2), eval mode, float32."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    image = torch.randn(1, 3, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(image)
    return int(counter.get_total_flops())


def significant(value: float, digits: int = 5) -> float:
    """Rounds to significant digits, so tiny CPU rates keep their precision."""
    return float(f"{value:.{digits}g}")


def precision_label(args: argparse.Namespace) -> str:
    """The dtype column: bfloat16, float32, or tf32 (float32 with TF32 math allowed)."""
    return "tf32" if (args.dtype == "float32" and args.tf32) else args.dtype


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_step_seconds(
    step: Callable[[], object], device: torch.device, steps: int, repeats: int
) -> float:
    """Median over `repeats` rounds of (round wall time / steps)."""
    per_step = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        per_step.append((time.perf_counter() - start) / steps)
    return statistics.median(per_step)


def autocast_dtype(dtype: str) -> Optional[torch.dtype]:
    return torch.bfloat16 if dtype == "bfloat16" else None


def recipe_for(name: str, batch_size: int) -> torch_train_step.TrainRecipe:
    """The JAX benchmark's recipe for `name` at this batch (the learning rate scales with it)."""
    config = default_config.get_config(name)
    config.batch_size = batch_size
    return torch_train_step.recipe_from_config(config)


def benchmark_model(
    name: str,
    *,
    compile_model: bool,
    args: argparse.Namespace,
    device: torch.device,
    device_name: str,
    after_timing: Optional[Callable[[Callable[[], object], Callable[[], object]], None]] = None,
) -> Dict[str, object]:
    """Measures one model in one compile setting; returns a CSV row.

    `after_timing(train_step, infer_step)`, if given, is called once the timings are
    taken, with the warmed-up steps (benchmarks.gpu_probe profiles them).
    """
    framework = "pytorch+compile" if compile_model else "pytorch"
    precision = precision_label(args)
    row: Dict[str, object] = {column: "" for column in CSV_COLUMNS}
    row.update(model=name, framework=framework, device=device_name, dtype=precision)

    torch.manual_seed(args.seed)
    model = build_model(name, args.num_classes).to(device)
    row["param_count"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 6)
    forward_flops = count_forward_flops(model, args.image_size, device)
    row["gmacs"] = significant(forward_flops / 2 / 1e9)
    model = model.to(memory_format=torch.channels_last)
    trainer = torch_train_step.TrainStep(
        model, recipe_for(name, args.batch_size), autocast_dtype(args.dtype))
    compile_options = {"mode": args.compile_mode} if args.compile_mode else {}

    def compiled(function):
        if not compile_model:
            return function
        return torch.compile(function, backend=args.compile_backend, **compile_options)

    run_train, run_infer = compiled(trainer.__call__), compiled(trainer.forward)

    batch = args.batch_size
    # uint8 in the layout the JAX step receives; its NCHW view is channels-last.
    images = torch.randint(0, 256, (batch, args.image_size, args.image_size, 3),
                           dtype=torch.uint8, device=device)
    labels = torch.randint(0, args.num_classes, (batch,), device=device)

    def infer_step():
        with torch.inference_mode():
            return run_infer(images)

    def train_step():
        return run_train(images, labels)

    def first_call_then_median(step, training: bool) -> tuple[float, float]:
        """(seconds of the first call, which compiles, median seconds per step after warm-up)."""
        model.train(training)
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        first_call = time.perf_counter() - start
        for _ in range(args.warmup):
            step()
        return first_call, median_step_seconds(step, device, args.steps, args.repeats)

    infer_first_call, infer_seconds = first_call_then_median(infer_step, training=False)
    train_first_call, train_seconds = first_call_then_median(train_step, training=True)
    first_calls = infer_first_call + train_first_call
    if after_timing is not None:
        after_timing(train_step, infer_step)

    train_rate = batch / train_seconds
    row.update(
        infer_samples_per_sec=significant(batch / infer_seconds),
        infer_step_time=significant(infer_seconds * 1e3),
        infer_batch_size=batch,
        train_samples_per_sec=significant(train_rate),
        train_step_time=significant(train_seconds * 1e3),
        train_batch_size=batch,
    )
    if compile_model:
        # First inference call plus first train call: dominated by compilation.
        row["compile_s"] = significant(first_calls, 4)
    peak = peak_flops(device_name, precision)
    if peak is not None:
        # A train step costs about three forwards (forward, input and weight gradients).
        row["mfu"] = significant(3 * forward_flops * train_rate / peak, 4)
    return row


def append_rows(path: Path, rows: Sequence[Dict[str, object]]) -> None:
    """Appends rows, writing the header first for a new or empty file.

    An existing file with a different header is refused rather than silently mixed.
    """
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as existing:
            header = next(csv.reader(existing), [])
        if tuple(header) != CSV_COLUMNS:
            raise ValueError(
                f"{path}: header {header} differs from the expected columns "
                f"{list(CSV_COLUMNS)}; write to a new file"
            )
        write_header = False
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_header = True
    with path.open("a", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
        if write_header:
            writer.writeheader()
        writer.writerows(rows)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(MODEL_BUILDERS),
        choices=list(MODEL_BUILDERS),
        help="models to time (default: all)",
    )
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--num_classes", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--compile", choices=("on", "off", "both"), default="both")
    parser.add_argument(
        "--compile_backend",
        default="inductor",
        help="torch.compile backend; 'eager' or 'aot_eager' only check that a model "
        "traces (fast on a CPU), 'inductor' is what the timings mean",
    )
    parser.add_argument(
        "--compile_mode",
        default=None,
        choices=(None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile mode (inductor only; default: torch's default)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument(
        "--tf32", action="store_true", help="allow TF32 matmuls/convs for float32"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", type=Path, default=None, help="append rows to this CSV")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "image_size", "num_classes", "steps", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    """Runs the benchmark; returns the rows it wrote (failed runs included)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    compile_settings = {"on": [True], "off": [False], "both": [False, True]}[args.compile]

    rows = []
    for name in args.models:
        for compile_model in compile_settings:
            try:
                row = benchmark_model(
                    name,
                    compile_model=compile_model,
                    args=args,
                    device=device,
                    device_name=device_name,
                )
            except Exception as error:  # noqa: BLE001: one failure must not stop the rest
                traceback.print_exc()
                print(
                    f"torch_peers: {name} (compile={compile_model}) failed: "
                    f"{type(error).__name__}: {error}",
                    file=sys.stderr,
                )
                row = {column: "" for column in CSV_COLUMNS}
                row.update(
                    model=name,
                    framework="pytorch+compile" if compile_model else "pytorch",
                    device=device_name,
                    dtype=precision_label(args),
                )
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(", ".join(f"{k}={row[k]}" for k in CSV_COLUMNS), flush=True)
            if args.csv is not None:
                append_rows(args.csv, [row])
    return rows


if __name__ == "__main__":
    main()
