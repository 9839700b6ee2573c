"""Device memory of a compiled program, and the largest batch that fits, found by
compiling.

Peak per device is what XLA's buffer assignment reserves: arguments + outputs - the
outputs that alias donated arguments + temporaries. JAX on a GPU preallocates a share
of the device's memory (`XLA_PYTHON_CLIENT_MEM_FRACTION`, 0.75 unless set) and runs
every program inside it, so that share, `config.plan.memory_fraction`, is what a program
must fit in.

Memory grows almost linearly with the batch, so two compiled points predict where the
limit falls; the answer is then checked by compiling it and the next batch up, and only
a batch that compiled within the limit is ever reported.
"""

from __future__ import annotations

import math
from typing import Callable

MAX_SEARCH_COMPILES = 8


def memory_of(compiled) -> dict:
    """Per-device bytes: arguments, outputs, temporaries, aliased, peak."""
    stats = compiled.memory_analysis()
    argument = int(stats.argument_size_in_bytes)
    output = int(stats.output_size_in_bytes)
    alias = int(stats.alias_size_in_bytes)
    temp = int(stats.temp_size_in_bytes)
    peak = argument + output - alias + temp
    reported = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    return {"argument_bytes": argument, "output_bytes": output, "temp_bytes": temp,
            "alias_bytes": alias, "peak_bytes": max(peak, reported)}


def largest_fitting_batch(peak_at: Callable[[int], float], unit: int, usable: float,
                          known: dict[int, float]) -> dict:
    """The largest multiple of `unit` whose program's peak is at most `usable`.

    `peak_at(batch)` compiles the program at that global batch and returns its peak
    bytes per device (inf if it does not compile); `known` holds batches already
    compiled. Returns `{"max_global_batch", "verified_over", "compiles", "exact"}`:
    `exact` when the next batch up was compiled and does not fit.
    """
    known = dict(known)
    compiles = 0

    def probe(batch: int) -> None:
        nonlocal compiles
        known[batch] = peak_at(batch)
        compiles += 1

    if unit not in known:
        probe(unit)
    if known[unit] > usable:
        return {"max_global_batch": 0, "verified_over": unit, "compiles": compiles, "exact": True}
    while True:
        fitting = sorted(b for b, p in known.items() if p <= usable)
        over = sorted(b for b, p in known.items() if p > usable)
        low, high = fitting[-1], (over[0] if over else None)
        if high is not None and high - low <= unit:
            return {"max_global_batch": low, "verified_over": high, "compiles": compiles,
                    "exact": True}
        if compiles >= MAX_SEARCH_COMPILES:
            return {"max_global_batch": low, "verified_over": high, "compiles": compiles,
                    "exact": False}
        # A line through the fitting point nearest the limit and its nearest neighbour.
        finite = sorted(b for b, p in known.items() if math.isfinite(p))
        other = [b for b in finite if b != low]
        neighbour = min(other, key=lambda b: abs(b - low)) if other else None
        guess = None
        if neighbour is not None:
            slope = (known[neighbour] - known[low]) / (neighbour - low)
            if slope > 0:
                guess = low + int((usable - known[low]) / slope // unit) * unit
        if guess is None:  # No usable slope: halve the gap, or double when unbounded.
            guess = (low + high) // 2 // unit * unit if high is not None else 2 * low
        ceiling = high - unit if high is not None else guess
        guess = max(low + unit, min(guess, ceiling))
        if guess in known:
            guess = low + unit
        probe(guess)
