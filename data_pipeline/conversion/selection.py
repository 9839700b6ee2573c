"""Which images go into the dataset, with which label, in which split.

The paper (section 4.1) uses 15 common categories, 50,000 images and an 8:1:1 split
without saying which categories, how images were drawn, or how the split was made. Our
default (PAPER.md section 3): the 15 most frequent categories, images drawn
class-balanced, and the split grouped by product folder, because DeepFashion's folders
hold many photos of one product and the official partition spreads a product over
train, val and test, which leaks near-duplicates into evaluation. Everything here is a
pure function of the annotations and the seed.
"""

from __future__ import annotations

import collections
import dataclasses
import posixpath
from typing import Optional, Sequence

import numpy as np

from data_pipeline.conversion.annotations import DeepFashionAnnotations, LabelledImage

SPLITS = ("train", "val", "test")
DEFAULT_NUM_CATEGORIES = 15


class SelectionError(ValueError):
    """A selection that the annotations cannot satisfy."""


@dataclasses.dataclass(frozen=True)
class SelectedImage:
    image: LabelledImage
    label: int  # 0-based index into the chosen class list
    class_name: str
    split: str


def product_folder(relative_path: str) -> str:
    """`img/Sheer_Pleated-Front_Blouse/img_00000001.jpg` -> `img/Sheer_Pleated-Front_Blouse`."""
    return posixpath.dirname(relative_path)


def category_counts(annotations: DeepFashionAnnotations) -> list[int]:
    counts = [0] * len(annotations.categories)
    for image in annotations.images:
        counts[image.category] += 1
    return counts


def choose_categories(
    annotations: DeepFashionAnnotations, names: Optional[Sequence[str]] = None, num_categories: int = DEFAULT_NUM_CATEGORIES
) -> list[int]:
    """Category indices in label order.

    Default: the `num_categories` most frequent, most frequent first, ties broken by name.
    With `names`, exactly those, in the order given.
    """
    counts = category_counts(annotations)
    all_names = [c.name for c in annotations.categories]
    with_images = [n for n, c in zip(all_names, counts) if c]
    if names is None:
        ranked = sorted(range(len(all_names)), key=lambda i: (-counts[i], all_names[i]))
        chosen = [i for i in ranked[:num_categories] if counts[i]]
        if len(chosen) < num_categories:
            raise SelectionError(
                f"only {len(chosen)} categories have images, {num_categories} requested; "
                f"categories with images: {', '.join(with_images)}"
            )
        return chosen
    if len(set(names)) != len(names):
        raise SelectionError(f"a category is named twice in {list(names)}")
    chosen = []
    for name in names:
        if name not in all_names:
            raise SelectionError(f"unknown category {name!r}; valid names: {', '.join(all_names)}")
        index = all_names.index(name)
        if not counts[index]:
            raise SelectionError(
                f"category {name!r} has no images in {annotations.annotation_dir}/list_category_img.txt; "
                f"categories with images: {', '.join(with_images)}"
            )
        chosen.append(index)
    return chosen


def _largest_remainder(total: int, weights: Sequence[int]) -> list[int]:
    """Integer shares of `total` proportional to `weights`; leftovers go to the largest
    fractional parts, ties to the earlier entry."""
    weight_sum = sum(weights)
    exact = [total * w / weight_sum for w in weights]
    shares = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


def images_per_class(available: Sequence[int], class_names: Sequence[str], max_images: int, sampling: str) -> list[int]:
    """How many images to draw from each class.

    `balanced`: `max_images // k` each, the remainder one extra to the first classes in
    label order (50,000 over 15 classes: 3,334 for the first five, 3,333 for the rest).
    `proportional`: shares proportional to the class sizes. `max_images <= 0`: all.
    """
    if sampling not in ("balanced", "proportional"):
        raise SelectionError(f"sampling must be 'balanced' or 'proportional', got {sampling!r}")
    total = sum(available)
    if max_images <= 0:
        max_images = total if sampling == "proportional" else min(available) * len(available)
    if sampling == "proportional":
        return list(available) if max_images >= total else _largest_remainder(max_images, available)
    base, extra = divmod(max_images, len(available))
    wanted = [base + (i < extra) for i in range(len(available))]
    short = [f"{name} has {have}, needs {need}" for name, have, need in zip(class_names, available, wanted) if have < need]
    if short:
        raise SelectionError(
            f"--max_images {max_images} drawn class-balanced needs {base}-{base + (extra > 0)} images per class, "
            f"but {'; '.join(short)}. Lower --max_images (at most {min(available) * len(available)}) "
            "or use --sampling proportional"
        )
    return wanted


def _parse_ratios(split: str) -> list[float]:
    try:
        ratios = [float(r) for r in split.split(":")]
    except ValueError:
        ratios = []
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise SelectionError(f"--split must be 'official' or three ratios like 8:1:1, got {split!r}")
    return [r / sum(ratios) for r in ratios]


def grouped_split(images: Sequence[LabelledImage], labels: Sequence[int], num_classes: int, ratios, rng) -> list[str]:
    """Assigns whole product folders to splits, tracking the ratios per class.

    Folders go largest first (random order among equal sizes) through `assign_groups`.
    """
    folders: dict[str, list[int]] = collections.defaultdict(list)
    for i, image in enumerate(images):
        folders[product_folder(image.path)].append(i)
    names = sorted(folders)
    order = rng.permutation(len(names))
    names = sorted((names[i] for i in order), key=lambda n: -len(folders[n]))
    class_totals = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    targets = np.outer(np.asarray(ratios), class_totals)  # (split, class)
    group_counts = [np.bincount([labels[i] for i in folders[name]], minlength=num_classes) for name in names]
    chosen = assign_groups(group_counts, targets, np.zeros_like(targets), ratios)
    result = [""] * len(images)
    for name, split_index in zip(names, chosen):
        for i in folders[name]:
            result[i] = SPLITS[split_index]
    return result


def assign_groups(group_counts: Sequence[np.ndarray], targets: np.ndarray, assigned: np.ndarray,
                  ratios) -> list[int]:
    """The split index of each group, placed one after another in the order given.

    `group_counts[g]` is group g's images per class; `targets` and `assigned` are
    (split, class) arrays, `assigned` what earlier placements hold (updated in place).
    Each group goes to the split where it most reduces the summed distance
    |assigned - target| over its classes, so large groups (given first) land where there
    is room and small ones then fill the gaps exactly. Ties go to the split furthest
    behind its overall target; a split of ratio 0 gets nothing.
    """
    closed = np.asarray(ratios) == 0
    chosen = []
    for counts in group_counts:
        change = np.abs(assigned + counts - targets) - np.abs(assigned - targets)
        cost = change.sum(axis=1)
        cost[closed] = np.inf
        # Among equally good splits, the one furthest behind its overall target.
        fill = assigned.sum(axis=1) / np.maximum(targets.sum(axis=1), 1.0)
        split_index = int(np.lexsort((fill, np.round(cost, 9)))[0])
        assigned[split_index] += counts
        chosen.append(split_index)
    return chosen


def select(
    annotations: DeepFashionAnnotations,
    *,
    categories: Optional[Sequence[str]] = None,
    max_images: int = 50000,
    sampling: str = "balanced",
    split: str = "8:1:1",
    seed: int = 0,
) -> tuple[list[str], list[SelectedImage]]:
    """Returns `(class_names, selected images)`; within each split the order is shuffled."""
    chosen = choose_categories(annotations, categories)
    class_names = [annotations.categories[i].name for i in chosen]
    label_of = {category: label for label, category in enumerate(chosen)}
    by_class: list[list[LabelledImage]] = [[] for _ in chosen]
    for image in annotations.images:
        if image.category in label_of:
            by_class[label_of[image.category]].append(image)
    counts = images_per_class([len(c) for c in by_class], class_names, max_images, sampling)
    rng = np.random.default_rng(seed)
    drawn: list[LabelledImage] = []
    labels: list[int] = []
    for label, (members, count) in enumerate(zip(by_class, counts)):
        members = sorted(members, key=lambda im: im.path)
        picks = np.sort(rng.permutation(len(members))[:count])
        drawn.extend(members[i] for i in picks)
        labels.extend([label] * count)
    if split == "official":
        if annotations.partition is None:
            raise SelectionError("--split official needs Eval/list_eval_partition.txt")
        missing = [im for im in drawn if im.path not in annotations.partition]
        if missing:
            raise SelectionError(
                f"{missing[0].path} ({missing[0].source}) has no entry in Eval/list_eval_partition.txt "
                f"({len(missing)} selected images lack one)"
            )
        splits = [annotations.partition[im.path][0] for im in drawn]
    else:
        splits = grouped_split(drawn, labels, len(chosen), _parse_ratios(split), rng)
    selected = [SelectedImage(im, lb, class_names[lb], sp) for im, lb, sp in zip(drawn, labels, splits)]
    shuffled = [selected[i] for i in rng.permutation(len(selected))]
    return class_names, [s for name in SPLITS for s in shuffled if s.split == name]
