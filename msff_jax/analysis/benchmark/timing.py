"""Timing compiled JAX functions the way asynchronous dispatch requires.

JAX returns from a call before the device has finished, so a host clock read right
after a call measures dispatch, not work. Every timed region here ends with
`jax.block_until_ready` on the last result; warm-up steps run (and finish) before the
clock starts; and each repeat times several steps, of which we keep the median, so one
slow repeat (another process on a shared machine, a clock ramp) does not move the figure.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def time_per_step(
    run_steps: Callable[[int], Any],
    *,
    warmup_steps: int,
    timed_steps: int,
    repeats: int,
) -> tuple[float, list[float]]:
    """Median seconds per step over `repeats` timings of `timed_steps` steps each.

    `run_steps(n)` must run n steps and return something to block on (the last
    outputs); it owns any state threaded between steps. Returns the median and the
    per-repeat figures, so callers can report the spread.
    """
    if timed_steps < 1 or repeats < 1 or warmup_steps < 0:
        raise ValueError(
            f"need timed_steps >= 1, repeats >= 1, warmup_steps >= 0; got "
            f"{timed_steps}, {repeats}, {warmup_steps}"
        )
    if warmup_steps:
        jax.block_until_ready(run_steps(warmup_steps))
    per_repeat = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run_steps(timed_steps))
        per_repeat.append((time.perf_counter() - start) / timed_steps)
    return statistics.median(per_repeat), per_repeat


def compile_ahead_of_time(jitted: Any, *args: Any) -> tuple[Any, Any, float]:
    """Lower and compile `jitted` for `args`; returns (lowered, compiled, wall seconds).

    Timing the two phases together is what a user waits for on the first step. The
    compiled executable is then called directly, so the step is compiled exactly once.
    """
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    compiled = lowered.compile()
    return lowered, compiled, time.perf_counter() - start


def compiled_memory_bytes(compiled: Any) -> int | None:
    """Device bytes one call of `compiled` needs: arguments, outputs and temporaries.

    Read from XLA's buffer assignment, so it is per executable and exact, unlike the
    allocator's process-wide peak, which cannot be reset between models. Donated
    arguments aliased to outputs are counted once.
    """
    try:
        stats = compiled.memory_analysis()
    except Exception:
        return None
    if stats is None:
        return None
    total = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )
    return int(total) if total > 0 else None


def allocator_peak_bytes(device: jax.Device) -> int | None:
    """The allocator's peak bytes in use on `device` so far, where the backend reports it.

    GPUs do; the CPU backend returns no memory statistics, hence None.
    """
    try:
        stats = device.memory_stats()
    except Exception:
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])
