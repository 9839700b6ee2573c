"""Forward FLOPs from XLA's cost analysis, counted the same way on every host.

One count serves `--mode summary`, the benchmark's GMACs and its MFU. It is XLA's cost
analysis of the *lowered* (pre-optimisation) module, lowered for the CPU platform
whatever the host's accelerator:

- Lowered, not compiled: the count does not depend on which kernels a backend picks or
  how it rewrites the graph.
- For the CPU platform: on GPU (seen with JAX 0.11 on an H100) the cost analysis of
  both the lowered and the compiled module leaves out most convolution FLOPs, and
  ResNet-50 came out at 1% of its true count. Every host can lower for the CPU; nothing
  is compiled or run.

Convention: a multiply-add is 2 FLOPs; GMACs = FLOPs / 2 / 1e9, the unit of
torchvision's model table. XLA charges only the multiply-adds that touch real input, not
zero padding, so it comes out about 3% under counters that charge every kernel tap
(ResNet-50 at 224 px: 3.97 GMACs here, 4.09 in torchvision's table).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from absl import logging


def _first_analysis(analysis: Any) -> Mapping[str, float] | None:
    """cost_analysis() is a dict in recent JAX and a one-element list in older ones."""
    if analysis is None:
        return None
    if isinstance(analysis, Mapping):
        return analysis
    if isinstance(analysis, Sequence) and analysis and isinstance(analysis[0], Mapping):
        return analysis[0]
    return None


def analysed_flops(stage: Any) -> float | None:
    """FLOPs XLA's cost analysis counts for a Lowered or Compiled stage, or None."""
    try:
        analysis = _first_analysis(stage.cost_analysis())
    except Exception:  # Some backends raise instead of returning nothing.
        return None
    if not analysis:
        return None
    flops = analysis.get("flops")
    return float(flops) if flops and flops > 0 else None


def counted_on_cpu(fn: Any, *args: Any) -> float | None:
    """FLOPs of `fn(*args)` from a CPU lowering of it; None when this JAX cannot lower
    for another platform. Arguments may be arrays or shapes; only shapes and dtypes are
    used, so device shardings play no part."""
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    try:
        lowered = jax.jit(fn).trace(*abstract).lower(lowering_platforms=("cpu",))
    except Exception as err:  # Older JAX without trace()/lowering_platforms, or an op
        # without a CPU lowering: say why, so an undercounting fallback is not silent.
        logging.warning("FLOPs not counted on a CPU lowering: %s: %s", type(err).__name__, err)
        return None
    return analysed_flops(lowered)
