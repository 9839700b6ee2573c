"""The plan's figures beside a step measured on a GPU (benchmark mode, the GPU probe).

On a GPU the benchmark has the compiled step it times; reading that same executable's
plan gives its kernel count, its bytes at kernel boundaries and the plan's lower bound,
and the measured time over that bound says how far the kernels are from the hardware
(1.0 would be a perfect machine). On a CPU, or a GPU the target table does not know, the
columns stay empty.
"""

from __future__ import annotations

from msff_jax.analysis.plan import kernels
from msff_jax.analysis.plan.targets import target_for_device_kind

COLUMNS = ("plan_kernels", "plan_gb_at_boundaries", "plan_lower_bound_ms", "time_over_plan_bound")


def plan_columns(compiled_text: str | None, *, platform: str, device_kind: str, num_devices: int,
                 measured_step_s: float | None) -> dict:
    """The plan columns of one measured row; None where they cannot be known."""
    empty = dict.fromkeys(COLUMNS)
    target = target_for_device_kind(device_kind) if platform == "gpu" else None
    if target is None or not compiled_text:
        return empty
    summary = kernels.analyse(compiled_text, target, num_devices)
    bound = summary["lower_bound_step_s"]
    return {
        "plan_kernels": summary["kernels"]["total"],
        "plan_gb_at_boundaries": summary["bytes"] / 1e9,
        "plan_lower_bound_ms": 1e3 * bound,
        "time_over_plan_bound": (measured_step_s / bound) if measured_step_s and bound else None,
    }
