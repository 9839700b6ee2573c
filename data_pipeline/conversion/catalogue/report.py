"""The data report beside the manifest: what a person should see before spending GPU
time on a dataset.

`data_report.json` holds everything (every skipped row, every duplicate set);
`data_report.md` the same for reading, long lists cut with a pointer to the JSON;
`data_report.png` images per class and split, and the image sizes.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Optional, Sequence

import numpy as np

from data_pipeline.conversion.catalogue import duplicates, images, layouts, splitting

FORMAT_VERSION = 1
JSON_NAME = "data_report.json"
MARKDOWN_NAME = "data_report.md"
PLOT_NAME = "data_report.png"
TRAINING_SIDE = 224  # the recipe's image size: smaller photos are enlarged to train
IMBALANCE_WORTH_WEIGHTS = 3.0  # largest/smallest training class from which weights are suggested
_MARKDOWN_ROWS = 60


def _quantiles(values: Sequence[int]) -> dict:
    if not len(values):
        return {}
    q = np.percentile(np.asarray(values, dtype=np.float64), [0, 10, 50, 90, 100])
    return dict(zip(("min", "p10", "median", "p90", "max"),
                    (int(v) if float(v).is_integer() else round(float(v), 1) for v in q)))


def _histogram(values: Sequence[int], bins: int = 20) -> dict:
    if not len(values):
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(np.asarray(values), bins=bins)
    return {"edges": [round(float(e), 1) for e in edges], "counts": counts.tolist()}


def _imbalance(class_names: Sequence[str], train_counts: Sequence[int]) -> dict:
    counts = np.asarray(train_counts)
    largest, smallest = int(np.argmax(counts)), int(np.argmin(counts))
    ratio = float(counts[largest]) / max(1, int(counts[smallest]))
    statement = (f"The largest class ({class_names[largest]}, {counts[largest]} training images) has "
                 f"{ratio:.1f}x the training images of the smallest ({class_names[smallest]}, "
                 f"{counts[smallest]}).")
    if counts[largest] == counts[smallest]:  # argmax and argmin would name one class twice
        statement = f"Every class has {counts[largest]} training images."
    if ratio >= IMBALANCE_WORTH_WEIGHTS:
        statement += (" That is imbalanced: consider training with --config.class_weights=balanced "
                      "(docs/GUIDE.md), and read per-class recall, not only accuracy.")
    else:
        statement += " That is close to balanced."
    return {"largest": {"class": class_names[largest], "train_images": int(counts[largest])},
            "smallest": {"class": class_names[smallest], "train_images": int(counts[smallest])},
            "ratio": round(ratio, 2), "statement": statement}


def build(*, image_root: str, table: Optional[str], layout: str, group_source: str, user_split: bool,
          fractions: Sequence[float], seed: int, class_names: Sequence[str], paths: Sequence[str],
          labels: Sequence[int], splits: Sequence[str], inspections: Sequence[images.Inspection],
          kept: Sequence[int], units: Sequence[Sequence[int]], exact: Sequence[tuple[int, ...]],
          near: Sequence[duplicates.NearDuplicateSet], near_bits: int, group_near: bool,
          skipped: Sequence[layouts.Problem], ignored: Sequence[str]) -> dict:
    """The report as a JSON-ready dict; indices refer to `paths` (the usable images)."""
    def file(i: int) -> dict:
        return {"path": paths[i], "class": class_names[labels[i]], "split": splits[i]}

    per_split = {}
    for split in splitting.SPLITS:
        counts = np.bincount([labels[i] for i in kept if splits[i] == split], minlength=len(class_names))
        per_split[split] = {"num_images": int(counts.sum()), "class_counts": counts.tolist()}
    kept_inspections = [inspections[i] for i in kept]
    widths = [im.width for im in kept_inspections]
    heights = [im.height for im in kept_inspections]
    short = [min(w, h) for w, h in zip(widths, heights)]
    split_of_unit = [{splits[i] for i in unit} for unit in units]
    warnings = [f"class {name!r} has no {split} images: its {split} measures are undefined"
                for split in ("val", "test") for c, name in enumerate(class_names)
                if per_split[split]["class_counts"][c] == 0]
    across = sum(len(s) > 1 for s in split_of_unit)
    if user_split and across:
        warnings.append(f"{across} product(s) (a product folder or group id, with its duplicates) have images in "
                        "more than one of your splits: the model is then tested on products it has seen")
    near_sets = [{"max_distance": s.max_distance, "files": [file(i) for i in s.members],
                  "splits_differ": len({splits[i] for i in s.members}) > 1} for s in near]
    report = {
        "format_version": FORMAT_VERSION,
        "image_root": image_root,
        "table": table,
        "layout": layout,
        "split": "as given by the user" if user_split else
                 f"{':'.join(f'{f:g}' for f in np.round(np.asarray(fractions) * 100, 2))} (percent), "
                 f"stratified by class, grouped by product, seed {seed}",
        "seed": seed,
        "class_names": list(class_names),
        "splits": per_split,
        "images": {"converted": len(kept), "skipped": int(sum(p.images for p in skipped)),
                   "ignored_files": len(ignored)},
        "products": {"grouped_by": group_source, "count": len(units),
                     "with_several_images": sum(len(u) > 1 for u in units),
                     "largest": max((len(u) for u in units), default=0),
                     "across_splits": across},
        "class_imbalance": _imbalance(class_names, per_split["train"]["class_counts"]),
        "skipped": [{"where": p.where, "reason": p.reason, "kind": p.kind, "images": p.images} for p in skipped],
        "skipped_by_kind": dict(collections.Counter(p.kind for p in skipped)),
        "ignored_files": list(ignored),
        "exact_duplicates": [{"files": [file(i) for i in members],
                              "classes_differ": len({labels[i] for i in members}) > 1,
                              "splits_differ": len({splits[i] for i in members}) > 1} for members in exact],
        "near_duplicates": {"max_bits": near_bits, "grouped": group_near, "sets": near_sets},
        "image_sizes": {"width": _quantiles(widths), "height": _quantiles(heights), "short_side": _quantiles(short),
                        "short_side_histogram": _histogram(short),
                        f"short_side_below_{TRAINING_SIDE}": sum(s < TRAINING_SIDE for s in short)},
        "image_kinds": {
            "formats": dict(sorted(collections.Counter(im.source_format for im in kept_inspections).items())),
            "modes": dict(sorted(collections.Counter(im.source_mode for im in kept_inspections).items())),
            "exif_rotated": sum(im.rotated for im in kept_inspections),
            "transparent": sum(im.transparent for im in kept_inspections),
            "stored_as_is": sum(im.keep_bytes for im in kept_inspections),
            "re_encoded": sum(not im.keep_bytes for im in kept_inspections)},
        "warnings": warnings,
    }
    return report


# ---------------------------------------------------------------------------- markdown


def _table(header: Sequence[str], rows: Sequence[Sequence], note_total: Optional[int] = None) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows[:_MARKDOWN_ROWS]]
    total = len(rows) if note_total is None else note_total
    if total > _MARKDOWN_ROWS:
        lines.append(f"\n({total - _MARKDOWN_ROWS} more rows in {JSON_NAME})")
    return lines


def _set_rows(sets: Sequence[dict], extra) -> list[list]:
    rows = []
    for number, item in enumerate(sets, start=1):
        for f in item["files"]:
            rows.append([number, f"`{f['path']}`", f["class"], f["split"], extra(item)])
    return rows


def markdown(report: dict) -> str:
    names = report["class_names"]
    splits = report["splits"]
    totals = [sum(splits[s]["class_counts"][c] for s in splitting.SPLITS) for c in range(len(names))]
    source = report["table"] or report["image_root"]
    images_ = report["images"]
    products = report["products"]
    lines = [
        f"# Data report: {source}", "",
        f"- layout: {report['layout']}; split: {report['split']}",
        f"- {images_['converted']} images converted in {len(names)} classes: "
        + ", ".join(f"{s} {splits[s]['num_images']}" for s in splitting.SPLITS),
        f"- {images_['skipped']} images skipped (listed below), {images_['ignored_files']} files ignored "
        "(not images by their extension, hidden, or a second link to a folder)",
        f"- {products['count']} products (grouped by {products['grouped_by']}, exact duplicates joined): "
        f"{products['with_several_images']} with several images, the largest {products['largest']}; "
        f"{products['across_splits']} across splits",
        f"- class imbalance: {report['class_imbalance']['statement']}",
    ]
    lines += [f"- warning: {w}" for w in report["warnings"]]
    lines += ["", "## Images per class and split", ""]
    lines += _table(["class", "train", "val", "test", "total"],
                    [[name] + [splits[s]["class_counts"][c] for s in splitting.SPLITS] + [totals[c]]
                     for c, name in enumerate(names)]
                    + [["**all**"] + [splits[s]["num_images"] for s in splitting.SPLITS] + [sum(totals)]])
    lines += ["", "## Skipped", ""]
    if report["skipped"]:
        lines += _table(["file, row or class", "why", "images"],
                        [[f"`{p['where']}`", p["reason"], p["images"]] for p in report["skipped"]])
    else:
        lines.append("Nothing was skipped.")
    exact = report["exact_duplicates"]
    lines += ["", "## Exact duplicates (the same bytes)", ""]
    if exact:
        lines.append(f"{len(exact)} sets; each set is kept in one split"
                     + ("" if report["split"] != "as given by the user" else " (copies across your splits are "
                        "skipped as leaks, or stop the run)") + ". A set whose classes differ is labelled "
                     "two ways: check those labels.")
        lines.append("")
        lines += _table(["set", "file", "class", "split", "classes differ"],
                        _set_rows(exact, lambda s: "yes" if s["classes_differ"] else ""))
    else:
        lines.append("None found.")
    near = report["near_duplicates"]
    lines += ["", f"## Near-duplicates (perceptual hash within {near['max_bits']} of 64 bits)", ""]
    if near["sets"]:
        across = sum(s["splits_differ"] for s in near["sets"])
        lines.append(f"{len(near['sets'])} sets of the same photo stored in other bytes (resized, re-encoded); "
                     + ("grouped like one product (--group_near_duplicates)." if near["grouped"] else
                        f"{across} of them across splits; --group_near_duplicates keeps each set in one split."))
        lines.append("")
        lines += _table(["set", "file", "class", "split", "bits apart (at most)"],
                        _set_rows(near["sets"], lambda s: s["max_distance"]))
    else:
        lines.append("None found.")
    sizes, kinds = report["image_sizes"], report["image_kinds"]
    lines += ["", "## Image sizes (as stored, in pixels)", ""]
    lines += _table(["", "min", "10%", "median", "90%", "max"],
                    [[name.replace("_", " ")] + [sizes[name].get(k, "") for k in ("min", "p10", "median", "p90", "max")]
                     for name in ("width", "height", "short_side")])
    below = sizes[f"short_side_below_{TRAINING_SIDE}"]
    lines += ["", f"{below} images have a short side below {TRAINING_SIDE} px (enlarged when training at "
              f"{TRAINING_SIDE} px).",
              "Formats: " + ", ".join(f"{k} {v}" for k, v in kinds["formats"].items())
              + "; pixel modes: " + ", ".join(f"{k} {v}" for k, v in kinds["modes"].items()) + ".",
              f"{kinds['exif_rotated']} turned upright by their EXIF orientation, {kinds['transparent']} with "
              f"transparency laid on white; {kinds['stored_as_is']} stored as they were, {kinds['re_encoded']} "
              "re-encoded as JPEG."]
    if report["ignored_files"]:
        lines += ["", "## Ignored files", ""]
        shown = report["ignored_files"][:_MARKDOWN_ROWS]
        lines += [f"- `{name}`" for name in shown]
        if len(report["ignored_files"]) > len(shown):
            lines.append(f"- ... {len(report['ignored_files']) - len(shown)} more in {JSON_NAME}")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------- plot


def plot(report: dict, path: str) -> None:
    """Stacked bars of images per class and split; a histogram of the short sides."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = report["class_names"]
    figure = Figure(figsize=(11, max(3.5, 0.32 * len(names) + 1.5)))
    FigureCanvasAgg(figure)
    bars, sizes = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    left = np.zeros(len(names))
    for split, colour in zip(splitting.SPLITS, ("#4477aa", "#ee8866", "#44aa99")):
        counts = np.asarray(report["splits"][split]["class_counts"])
        bars.barh(range(len(names)), counts, left=left, color=colour, label=split)
        left += counts
    bars.set_yticks(range(len(names)), names)
    bars.invert_yaxis()
    bars.set_xlabel("images")
    bars.set_title("images per class and split")
    bars.legend(loc="lower right")
    histogram = report["image_sizes"]["short_side_histogram"]
    if histogram["counts"]:
        edges = np.asarray(histogram["edges"])
        sizes.bar(edges[:-1], histogram["counts"], width=np.diff(edges), align="edge", color="#777777")
        sizes.axvline(TRAINING_SIDE, color="#cc3311", linestyle="--", label=f"{TRAINING_SIDE} px")
        sizes.legend()
    sizes.set_xlabel("short side (px)")
    sizes.set_ylabel("images")
    sizes.set_title("image sizes")
    figure.suptitle(f"{report['images']['converted']} images, {len(names)} classes")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def write(output_dir: str, report: dict) -> None:
    """data_report.json, .md and .png in `output_dir` (created if missing)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, JSON_NAME), "w") as stream:
        json.dump(report, stream, indent=1)
        stream.write("\n")
    with open(os.path.join(output_dir, MARKDOWN_NAME), "w") as stream:
        stream.write(markdown(report))
    plot(report, os.path.join(output_dir, PLOT_NAME))
