"""A product catalogue (class folders or a table) to shards, manifest.json and a report.

The steps, one module each: `layouts` (what was given, as labelled files), `images`
(every file read and decoded once), `duplicates` (exact and near, and the products a
split may not cut), `splitting`, the shared `shard_writer`, and `report`.

Bad input is handled by one policy. Without `skip_bad`, the first problem stops the run
with one message naming the row or file (and counting the others), before any shard is
written. With it, each problem leaves out what it names (a row, a file, a class) and is
listed in the report and the manifest. Cheap checks (the listing) run before the
expensive one (decoding every image), so a typo in a table fails in a second.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import multiprocessing
import os
import sys
from typing import Optional, Sequence

import numpy as np
import tqdm

from data_pipeline.conversion import shard_writer
from data_pipeline.conversion.catalogue import duplicates
from data_pipeline.conversion.catalogue import images as image_files
from data_pipeline.conversion.catalogue import layouts
from data_pipeline.conversion.catalogue import report as report_lib
from data_pipeline.conversion.catalogue import splitting
from data_pipeline.conversion.catalogue.layouts import CatalogueError, Problem

TOOL = "data_pipeline.conversion.catalogue"
DEFAULT_NEAR_DUPLICATE_BITS = 6
SKIP_HINT = "pass --skip_bad to leave such input out; it is then listed in data_report.md"
_POOL_MIN_IMAGES = 64  # below this, starting worker processes costs more than it saves


@dataclasses.dataclass(frozen=True)
class CatalogueImage:
    entry: layouts.Entry
    inspection: image_files.Inspection


class _Policy:
    """Stops on the first problem, or (skip_bad) collects every problem as a skip."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.skipped: list[Problem] = []

    def apply(self, problems: Sequence[Problem]) -> None:
        if not problems:
            return
        if not self.skip_bad:
            first = problems[0]
            others = ""
            if len(problems) > 1:
                kinds = collections.Counter(p.kind for p in problems[1:])
                others = f" (and {len(problems) - 1} more: {', '.join(f'{k} {n}' for k, n in kinds.items())})"
            raise CatalogueError(f"{first.where}: {first.reason}{others}; fix it, or {SKIP_HINT}")
        self.skipped.extend(problems)


def _check_paths(image_root, output_dir, table) -> tuple[str, str, Optional[str]]:
    root = os.path.abspath(os.fspath(image_root))
    out = os.path.abspath(os.fspath(output_dir))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--image_root {root} is not a folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CatalogueError(f"--output_dir {out} is a file; give a folder (created if missing)")
    if table is not None:
        table = os.path.abspath(os.fspath(table))
        if not os.path.isfile(table):
            raise FileNotFoundError(f"--table {table} is not a file")
    elif os.path.commonpath([root, out]) == root:
        raise CatalogueError(f"--output_dir {out} lies inside --image_root {root}, whose folders are read as "
                             "classes; write the shards elsewhere")
    return root, out, table


def _inspect_all(root: str, entries: Sequence[layouts.Entry], max_side: int, num_workers: Optional[int],
                 progress: bool) -> list[image_files.Inspection]:
    """Every file read and decoded, in a process pool for large catalogues; results in
    entry order whatever the worker count."""
    files = [os.path.join(root, e.path) for e in entries]
    inspect = functools.partial(image_files.inspect, max_side=max_side)
    workers = num_workers or os.cpu_count() or 1
    bar = tqdm.tqdm(total=len(files), unit="img", desc="reading images", file=sys.stderr,
                    disable=not progress, smoothing=0.05)
    pool = (multiprocessing.get_context("forkserver").Pool(workers)
            if workers > 1 and len(files) >= _POOL_MIN_IMAGES else None)
    try:
        results = []
        for result in (pool.imap(inspect, files, chunksize=16) if pool else map(inspect, files)):
            results.append(result)
            bar.update(1)
        return results
    finally:
        bar.close()
        if pool:
            pool.terminate()


def _drop_cross_split_copies(found: Sequence[CatalogueImage], policy: _Policy) -> list[CatalogueImage]:
    """In a split the user made, the same bytes in two splits are a leak: the copy in
    the earliest split (train, val, test) stays, the later ones are problems."""
    order = {s: i for i, s in enumerate(splitting.SPLITS)}
    first: dict[str, CatalogueImage] = {}
    for image in sorted(found, key=lambda im: (order[im.entry.split], im.entry.path)):
        first.setdefault(image.inspection.sha256, image)
    leaks = [im for im in found if first[im.inspection.sha256].entry.split != im.entry.split]
    policy.apply([Problem(im.entry.where, f"the same bytes as {first[im.inspection.sha256].entry.path} in "
                          f"{first[im.inspection.sha256].entry.split}: a test of memory, not recognition",
                          "duplicate across splits") for im in leaks])
    leaked = {id(im) for im in leaks}
    return [im for im in found if id(im) not in leaked]


@dataclasses.dataclass
class _Analysis:
    labels: list[int]
    exact: list[tuple[int, ...]]
    near: list[duplicates.NearDuplicateSet]
    units: list[list[int]]


def _analyse(found: Sequence[CatalogueImage], class_names: Sequence[str], near_bits: int,
             group_near: bool) -> _Analysis:
    index = {name: i for i, name in enumerate(class_names)}
    sha256s = [im.inspection.sha256 for im in found]
    exact = duplicates.exact_duplicate_sets(sha256s)
    near = duplicates.near_duplicate_sets(sha256s, [im.inspection.phash for im in found], near_bits)
    units = duplicates.product_units([im.entry.group for im in found], exact, near, group_near)
    return _Analysis([index[im.entry.label] for im in found], exact, near, units)


def _class_problems(found: Sequence[CatalogueImage], class_names: Sequence[str], analysis: _Analysis,
                    user_split: bool) -> dict[str, Problem]:
    """{class: problem} for the classes that cannot be trained and measured: empty, too
    small to split, or (in a user's split) absent from train."""
    totals = np.bincount(analysis.labels, minlength=len(class_names))
    problems = {name: Problem(f"class {name!r}", "has no usable images", "empty class", 0)
                for name, total in zip(class_names, totals) if not total}
    if user_split:
        in_train = collections.Counter(lb for lb, im in zip(analysis.labels, found) if im.entry.split == "train")
        for c, name in enumerate(class_names):
            if totals[c] and not in_train[c]:
                problems[name] = Problem(f"class {name!r}", f"has no images in train ({totals[c]} in val and "
                                         "test)", "class not in train", int(totals[c]))
    else:
        for c, products in splitting.too_small_classes(analysis.labels, analysis.units, len(class_names)).items():
            if totals[c]:
                problems[class_names[c]] = Problem(
                    f"class {class_names[c]!r}", f"has {totals[c]} images in {products} product(s); a "
                    "train/val/test split needs at least 3 (an image without a group is a product of its own)",
                    "class too small", int(totals[c]))
    return {name: problems[name] for name in class_names if name in problems}


def _record_tasks(root: str, found: Sequence[CatalogueImage], labels: Sequence[int], class_names, max_side: int):
    return [image_files.RecordTask(
        file=os.path.join(root, im.entry.path), relative_path=im.entry.path, label=label,
        class_name=class_names[label], sha256=im.inspection.sha256, keep_bytes=im.inspection.keep_bytes,
        width=im.inspection.width, height=im.inspection.height, max_side=max_side)
        for im, label in zip(found, labels)]


def _estimated_bytes(found: Sequence[CatalogueImage]) -> int:
    return sum((im.inspection.file_bytes if im.inspection.keep_bytes
                else im.inspection.width * im.inspection.height // 2) + 300 for im in found)


def convert(
    image_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    table: Optional[str | os.PathLike] = None,
    columns: layouts.Columns = layouts.Columns(),
    classes: Optional[Sequence[str]] = None,
    split: str = "8:1:1",
    seed: int = 0,
    skip_bad: bool = False,
    group_subfolders: bool = True,
    group_near_duplicates: bool = False,
    near_duplicate_bits: int = DEFAULT_NEAR_DUPLICATE_BITS,
    max_side: int = 0,
    shard_size_mb: float = 128,
    num_workers: Optional[int] = None,
    progress: bool = True,
) -> tuple[dict, dict]:
    """Converts; writes data_report.{md,png,json} and then `output_dir/manifest.json`
    last; returns `(manifest, report)`."""
    root, out, table = _check_paths(image_root, output_dir, table)
    fractions = splitting.parse_fractions(split)
    if classes is not None and len(set(classes)) != len(classes):
        raise CatalogueError(f"--classes names a class twice: {', '.join(classes)}")
    found = (layouts.discover_table(root, table, columns) if table
             else layouts.discover_folders(root, group_subfolders=group_subfolders))
    if classes:
        layouts.restrict_to_classes(found, classes)
    policy = _Policy(skip_bad)
    policy.apply(found.problems)

    entries = sorted(found.entries, key=lambda e: e.path)
    inspections = _inspect_all(root, entries, max_side, num_workers, progress)
    policy.apply([Problem(e.where, i.problem, "missing file" if i.problem == "file missing" else "unreadable image")
                  for e, i in zip(entries, inspections) if i.problem])
    usable = [CatalogueImage(e, i) for e, i in zip(entries, inspections) if not i.problem]
    if found.user_split:
        usable = _drop_cross_split_copies(usable, policy)

    class_names = list(classes) if classes else sorted({im.entry.label for im in usable} | set(found.class_folders))
    analysis = _analyse(usable, class_names, near_duplicate_bits, group_near_duplicates)
    problems = _class_problems(usable, class_names, analysis, found.user_split)
    policy.apply(list(problems.values()))
    if problems:  # skipped: those classes leave the class list
        class_names = [name for name in class_names if name not in problems]
        usable = [im for im in usable if im.entry.label in class_names]
        analysis = _analyse(usable, class_names, near_duplicate_bits, group_near_duplicates)
    if len(class_names) < 2:
        raise CatalogueError(f"{root}: {len(class_names)} usable class(es); a classifier needs at least two")

    splits = ([im.entry.split for im in usable] if found.user_split
              else splitting.assign_splits(analysis.labels, analysis.units, class_names, fractions, seed))
    tasks = _record_tasks(root, usable, analysis.labels, class_names, max_side)
    rng = np.random.default_rng([seed, 1])  # the order inside each split
    shards = []
    for split_name in splitting.SPLITS:
        members = [i for i, s in enumerate(splits) if s == split_name]
        members = [members[k] for k in rng.permutation(len(members))]
        if not members:
            continue
        shards += shard_writer.plan_shards(split_name, [tasks[i] for i in members],
                                           _estimated_bytes([usable[i] for i in members]),
                                           int(shard_size_mb * 2**20))
    try:
        infos, write_skips = shard_writer.write_shards(
            out, shards, image_files.encode_record, num_classes=len(class_names),
            options=f"catalogue|max_side={max_side}", on_bad_image="skip" if skip_bad else "error",
            num_workers=num_workers, progress=progress, skip_hint=SKIP_HINT)
    except shard_writer.BadImageError as err:
        raise CatalogueError(str(err)) from err
    policy.skipped += [Problem(s["image"], s["problem"], "changed during conversion") for s in write_skips]
    written = {s["image"] for s in write_skips}
    kept = [i for i, im in enumerate(usable) if im.entry.path not in written]

    report = report_lib.build(
        image_root=root, table=table, layout=found.layout, group_source=found.group_source,
        user_split=found.user_split, fractions=fractions, seed=seed, class_names=class_names,
        paths=[im.entry.path for im in usable], labels=analysis.labels, splits=splits,
        inspections=[im.inspection for im in usable], kept=kept, units=analysis.units,
        exact=analysis.exact, near=analysis.near, near_bits=near_duplicate_bits,
        group_near=group_near_duplicates, skipped=policy.skipped, ignored=found.ignored)
    report_lib.write(out, report)
    source = {
        "tool": TOOL, "image_root": root, "table": table, "layout": found.layout,
        "args": {"split": split, "seed": seed, "skip_bad": skip_bad, "classes": list(classes) if classes else None,
                 "columns": dataclasses.asdict(columns) if table else None, "group_subfolders": group_subfolders,
                 "group_near_duplicates": group_near_duplicates, "near_duplicate_bits": near_duplicate_bits,
                 "max_side": max_side, "shard_size_mb": shard_size_mb},
        "report": report_lib.JSON_NAME,
        "num_skipped": sum(p.images for p in policy.skipped),
        "skipped": [{"image": p.where, "problem": p.reason} for p in policy.skipped],
    }
    manifest = shard_writer.build_manifest(class_names, "jpeg", infos, source)
    shard_writer.write_manifest(out, manifest)
    return manifest, report
