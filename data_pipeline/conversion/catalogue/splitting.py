"""Train, val and test that do not leak: whole products, every class in every split.

A product (a group id, with its exact duplicates and, if asked, near-duplicates joined
in: `duplicates.product_units`) goes to one split. Within that constraint each class is
divided by the fractions given (stratified), using the same greedy placement as the
DeepFashion converter (`selection.assign_groups`). Before it, every class gets one
product in val and one in test (its smallest), so that a small class is measured at all
instead of going wholly to train; a class with fewer than three products cannot be split
and is refused before splitting (`too_small_classes`). Everything is a pure function of
the images (in path order) and the seed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from data_pipeline.conversion import selection

SPLITS = ("train", "val", "test")


class SplitError(ValueError):
    """Fractions or products that cannot make three splits; the message says why."""


def parse_fractions(text: str) -> tuple[float, float, float]:
    """'8:1:1' -> (0.8, 0.1, 0.1); each part must be positive."""
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) != 3 or min(parts) <= 0 or not all(np.isfinite(parts)):
        raise SplitError(f"--split must be three positive train:val:test ratios like 8:1:1, got {text!r}")
    total = sum(parts)
    return tuple(p / total for p in parts)


def unit_class_counts(labels: Sequence[int], units: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """(unit, class) image counts."""
    labels = np.asarray(labels, dtype=np.int64)
    return np.stack([np.bincount(labels[list(u)], minlength=num_classes) for u in units]) if units else \
        np.zeros((0, num_classes), np.int64)


def too_small_classes(labels: Sequence[int], units: Sequence[Sequence[int]], num_classes: int) -> dict[int, int]:
    """{class: number of products holding it} for the classes in fewer than three."""
    present = (unit_class_counts(labels, units, num_classes) > 0).sum(axis=0)
    return {c: int(present[c]) for c in range(num_classes) if present[c] < len(SPLITS)}


def assign_splits(labels: Sequence[int], units: Sequence[Sequence[int]], class_names: Sequence[str],
                  fractions: Sequence[float], seed: int) -> list[str]:
    """The split of every image (indexed like `labels`, which index `class_names`)."""
    num_classes = len(class_names)
    rng = np.random.default_rng(seed)
    counts = unit_class_counts(labels, units, num_classes)
    sizes = counts.sum(axis=1)
    targets = np.outer(np.asarray(fractions), counts.sum(axis=0)).astype(np.float64)
    assigned = np.zeros_like(targets)
    split_of_unit = np.full(len(units), -1)
    tie_break = rng.permutation(len(units))  # random order among units of equal size
    smallest_first = sorted(range(len(units)), key=lambda u: (sizes[u], tie_break[u]))
    for label in rng.permutation(num_classes):
        for split in (1, 2):  # val, test
            if assigned[split, label] > 0:
                continue
            unit = next((u for u in smallest_first if split_of_unit[u] < 0 and counts[u, label] > 0), None)
            if unit is not None:
                split_of_unit[unit] = split
                assigned[split] += counts[unit]
    rest = sorted((u for u in range(len(units)) if split_of_unit[u] < 0), key=lambda u: (-sizes[u], tie_break[u]))
    for unit, split in zip(rest, selection.assign_groups([counts[u] for u in rest], targets, assigned, fractions)):
        split_of_unit[unit] = split
    missing = [(SPLITS[s], c) for c in range(num_classes) for s in range(3)
               if counts[:, c].sum() and not counts[split_of_unit == s, c].sum()]
    if missing:
        split, label = missing[0]
        raise SplitError(f"class {class_names[label]!r} could not be given a product in {split}: its products are shared "
                         "with other classes (exact duplicates across classes) that are placed elsewhere")
    result = [""] * len(labels)
    for unit, members in enumerate(units):
        for i in members:
            result[i] = SPLITS[split_of_unit[unit]]
    return result
