"""Model summary: layer table, parameter count and forward FLOPs.

FLOPs are XLA's count for the eval-mode forward pass at batch 1 (convolutions,
BatchNorm, activations, pooling, attention), taken by `msff_jax.analysis.flops` exactly as the
benchmark takes them, so `--mode summary` prints the same figure on a CPU or a GPU
host. ResNet-50 at 224 px: torchvision lists 4.09 GMACs; XLA counts 3.97, about 3% less
(it does not charge multiply-adds on zero padding); tests/test_summary.py holds it
within 5%.

Shapes are traced with `jax.eval_shape`, so no parameters are ever materialised and a
full-size model is summarised without allocating its weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from msff_jax.analysis import flops
from msff_jax.models import count_params
from msff_jax.train.state import build_model


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    table: str
    num_params: int
    flops: float  # forward pass, one image, multiply-add = 2 FLOPs
    image_size: int
    batch_size: int

    @property
    def gmacs(self) -> float:
        return self.flops / 2 / 1e9

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def __str__(self) -> str:
        return (
            f"{self.table}\n"
            f"parameters: {self.num_params:,}\n"
            f"forward at {self.image_size}x{self.image_size}, batch {self.batch_size}: "
            f"{self.gflops:.3f} GFLOPs = {self.gmacs:.3f} GMACs "
            f"(XLA cost analysis; one multiply-add = 2 FLOPs)"
        )


def forward_flops(module: nn.Module, variables: Any, images: jax.ShapeDtypeStruct) -> float:
    """FLOPs of the eval-mode forward for the given (abstract) inputs."""
    counted = flops.counted_on_cpu(lambda v, x: module.apply(v, x, train=False), variables, images)
    if counted is None:
        raise RuntimeError(
            f"XLA's cost analysis gave no FLOP count for {type(module).__name__} (JAX "
            f"{jax.__version__}); the summary needs a JAX that lowers for the CPU platform.")
    return counted


def summarize(
    module: nn.Module, image_size: int, batch_size: int = 1, table_depth: int | None = 2
) -> ModelSummary:
    """Layer table (flax tabulate, `table_depth` levels), parameter count and FLOPs.

    FLOPs are always measured at batch 1 (per image); `batch_size` only sets the
    shapes shown in the table.
    """
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    table_images = jnp.zeros((batch_size, image_size, image_size, 3), jnp.float32)
    table = nn.tabulate(
        module,
        rngs,
        depth=table_depth,
        console_kwargs={"width": 140, "force_terminal": False},  # plain text for logs
    )(table_images, train=False)

    one_image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(
        lambda x: module.init(rngs, x, train=False), one_image
    )
    variables = {k: v for k, v in variables.items() if k != "intermediates"}
    return ModelSummary(
        table=table,
        num_params=count_params(variables),
        flops=forward_flops(module, variables, one_image),
        image_size=image_size,
        batch_size=batch_size,
    )


def print_summary(config: Any) -> ModelSummary:
    """`launch.py --mode summary`: prints and returns the summary of the config's model."""
    summary = summarize(build_model(config), config.image_size)
    print(f"model: {config.model} ({config.num_classes} classes, dtype {config.dtype})")
    print(summary)
    return summary
