"""Shows that converted torchvision weights give torchvision's logits in our Flax models.

For each baseline: build torchvision's model with random weights, randomise BatchNorm's
affine parameters and running statistics (at their defaults, 1 and 0, a wrong mapping
of them would go unnoticed), save the state dict to `.safetensors`, convert it with
`msff_jax.models.torch_weights`, run both models in eval mode on the same random
float32 batch and compare logits. Exits non-zero when any model differs by more than
the tolerance.

    python -m benchmarks.check_torch_equivalence --image_sizes 224 64

This is the check behind the claim that the baselines are torchvision's architectures;
`tests/test_torch_weights.py` repeats it at 64 px in CI.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Sequence


import jax
import numpy as np
import torch
import torchvision
from safetensors.torch import save_file

from msff_jax.models import get_model
from msff_jax.models.torch_weights import load_pretrained

TORCHVISION_BUILDERS = {
    "resnet50": torchvision.models.resnet50,
    "mobilenet_v3_large": torchvision.models.mobilenet_v3_large,
    "efficientnet_b0": torchvision.models.efficientnet_b0,
}
TIMM_NAMES = {
    "resnet50": "resnet50",
    "mobilenet_v3_large": "mobilenetv3_large_100",
    "efficientnet_b0": "efficientnet_b0",
}
# Flax overrides that reproduce timm's variant exactly (torch_weights' docstring).
TIMM_FLAX_OVERRIDES = {"mobilenet_v3_large": {"norm_epsilon": 1e-5}}


def build_reference(name: str, num_classes: int, source: str) -> torch.nn.Module:
    if source == "timm":
        import timm  # only this option needs it (requirements-torch.txt)

        return timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=num_classes)
    return TORCHVISION_BUILDERS[name](weights=None, num_classes=num_classes)


def randomise_batchnorm(model: torch.nn.Module, seed: int) -> None:
    """Gives every BatchNorm non-trivial scale, shift, mean and variance."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                shape = module.num_features
                module.weight.copy_(0.5 + torch.rand(shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(shape, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))


def last_linear(model: torch.nn.Module) -> torch.nn.Linear:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def torchvision_model(
    name: str, num_classes: int, seed: int, image_size: int, source: str = "torchvision"
) -> torch.nn.Module:
    """Random torchvision model whose logits are of order 1.

    Random BatchNorm statistics blow ResNet-50's activations up (logits in the
    hundreds), which would make an absolute tolerance meaningless; the classifier is
    scaled down, once, so the largest logit on a random batch is about 1.
    """
    torch.manual_seed(seed)
    model = build_reference(name, num_classes, source)
    randomise_batchnorm(model, seed)
    model.eval()
    generator = torch.Generator().manual_seed(seed + 1)
    probe = torch.randn(2, 3, image_size, image_size, generator=generator)
    with torch.no_grad():
        scale = model(probe).abs().max().item()
        head = last_linear(model)
        head.weight.div_(scale)
        head.bias.div_(scale)
    return model


def compare(
    name: str,
    torch_model: torch.nn.Module,
    weights_path: Path,
    image_size: int,
    batch_size: int,
    num_classes: int,
    seed: int,
    flax_overrides: Optional[Dict[str, object]] = None,
) -> Dict[str, float]:
    """Logit differences of torch vs converted Flax on one random batch."""
    images = np.random.default_rng(seed).standard_normal(
        (batch_size, image_size, image_size, 3), dtype=np.float32
    )
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()

    module = get_model(name, num_classes, **(flax_overrides or {}))
    template = jax.eval_shape(
        module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(images.shape, np.float32)
    )
    variables = load_pretrained(name, weights_path, template, skip_head=False)
    forward = jax.jit(lambda v, x: module.apply(v, x, train=False))
    actual = np.asarray(forward(variables, images))

    difference = np.abs(actual - expected)
    return {
        "max_abs": float(difference.max()),
        "max_rel": float(difference.max() / np.abs(expected).max()),
        "logit_scale": float(np.abs(expected).max()),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(TORCHVISION_BUILDERS),
                        choices=list(TORCHVISION_BUILDERS))
    parser.add_argument("--image_sizes", nargs="+", type=int, default=[224, 64])
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest accepted absolute logit difference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", choices=("torchvision", "timm"), default="torchvision",
                        help="whose model and state-dict names to check against")
    args = parser.parse_args(argv)

    # Exact float32 convolutions and matmuls on both sides, so only rounding differs.
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}; reference: {args.source}")
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            torch_model = torchvision_model(
                name, args.num_classes, args.seed, args.image_sizes[0], args.source
            )
            overrides = TIMM_FLAX_OVERRIDES.get(name, {}) if args.source == "timm" else {}
            weights_path = Path(tmp) / f"{name}.safetensors"
            save_file(torch_model.state_dict(), str(weights_path))
            for size in args.image_sizes:
                start = time.perf_counter()
                result = compare(name, torch_model, weights_path, size, args.batch_size,
                                 args.num_classes, args.seed, overrides)
                ok = result["max_abs"] <= args.tolerance
                if not ok:
                    failures.append(f"{name}@{size}")
                print(f"{name:20s} {size:4d}px  max|dlogit| {result['max_abs']:.3e}  "
                      f"relative {result['max_rel']:.3e}  (max|logit| "
                      f"{result['logit_scale']:.3f})  {'ok' if ok else 'FAIL'}  "
                      f"[{time.perf_counter() - start:.0f}s]", flush=True)
    if failures:
        print(f"FAILED (tolerance {args.tolerance}): {', '.join(failures)}")
        return 1
    print(f"all within {args.tolerance}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
