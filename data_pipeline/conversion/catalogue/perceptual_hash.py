"""A 64-bit perceptual hash, and the pairs of hashes that lie close together.

Two files of the same photograph (one re-encoded, resized or slightly recompressed) have
different bytes but nearly the same coarse structure. The hash keeps only that: the
image in grey at 32x32, its 2-D DCT, and of the 8x8 lowest frequencies one bit each,
whether the coefficient lies above their median (the DC term, the mean brightness,
takes no part in the median). Re-encoding and resizing move few of those bits; another
photograph moves about half. Closeness is the Hamming distance between two hashes.

Finding every pair within distance `d` compares only candidates (multi-index hashing):
cut the 64 bits into `d + 1` bands; two hashes within `d` bits agree exactly on at least
one band (pigeonhole), so only hashes sharing a band value are compared.
"""

from __future__ import annotations

import functools
from typing import Iterable

import numpy as np
from PIL import Image

HASH_BITS = 64
_SIDE = 32  # the grey thumbnail the DCT runs on
_KEEP = 8  # the lowest 8x8 frequencies make the 64 bits


@functools.lru_cache(maxsize=1)
def _dct_matrix() -> np.ndarray:
    """The orthonormal DCT-II matrix of size 32: `coefficients = D @ x`."""
    k = np.arange(_SIDE)[:, None]
    n = np.arange(_SIDE)[None, :]
    matrix = np.cos(np.pi * (2 * n + 1) * k / (2 * _SIDE)) * np.sqrt(2.0 / _SIDE)
    matrix[0] /= np.sqrt(2.0)
    return matrix


def dct_hash(image: Image.Image) -> int:
    """The 64-bit hash of an image (any mode; use the upright RGB picture as stored)."""
    grey = image.convert("L").resize((_SIDE, _SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    matrix = _dct_matrix()
    low = (matrix @ pixels @ matrix.T)[:_KEEP, :_KEEP].ravel()
    bits = low > np.median(low[1:])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def _bands(max_distance: int) -> list[tuple[int, int]]:
    """`max_distance + 1` disjoint (shift, width) bit ranges covering the 64 bits."""
    count = max_distance + 1
    edges = [HASH_BITS * i // count for i in range(count + 1)]
    return [(edges[i], edges[i + 1] - edges[i]) for i in range(count)]


def close_pairs(hashes: Iterable[int], max_distance: int) -> list[tuple[int, int, int]]:
    """Every `(i, j, distance)` with `i < j` whose hashes differ in at most
    `max_distance` bits, sorted; identical hashes included (distance 0)."""
    values = np.asarray([int(h) for h in hashes], dtype=np.uint64)
    if not 0 <= max_distance < HASH_BITS // 2:
        raise ValueError(f"max_distance must be in [0, {HASH_BITS // 2}), got {max_distance}")
    pairs: dict[tuple[int, int], int] = {}
    for shift, width in _bands(max_distance):
        keys = (values >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for start, end in zip(starts, ends):
            if end - start < 2:
                continue
            members = np.sort(order[start:end])
            distances = np.bitwise_count(values[members][:, None] ^ values[members][None, :])
            rows, cols = np.nonzero(np.triu(distances <= max_distance, k=1))
            for r, c in zip(rows, cols):
                pairs[(int(members[r]), int(members[c]))] = int(distances[r, c])
    return sorted((i, j, d) for (i, j), d in pairs.items())
