"""Parsers for the DeepFashion Category and Attribute Prediction list files.

Every list file has the same shape: line 1 is the number of entries, line 2 the column
names, then one row per entry with columns padded by runs of spaces. Images are named by
their path relative to `Img/` (`img/<Product_Folder>/img_00000001.jpg`); file names
repeat across folders, so the whole relative path is the key.

Anything suspicious stops the conversion with an `AnnotationError` that names the file
and line: a mislabelled or silently dropped image would poison every result downstream.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Optional

NUM_CATEGORIES = 50
CATEGORY_TYPES = {1: "upper-body", 2: "lower-body", 3: "full-body"}
PARTITIONS = ("train", "val", "test")
ANNOTATION_DIRS = ("Anno", "Anno_coarse")


class AnnotationError(ValueError):
    """A list file that does not have the format described above."""


@dataclasses.dataclass(frozen=True)
class Category:
    name: str
    type: int  # 1 upper-body, 2 lower-body, 3 full-body


@dataclasses.dataclass(frozen=True)
class SourceLine:
    """Where an entry came from, for error messages: `Anno/list_category_img.txt:17`."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclasses.dataclass(frozen=True)
class LabelledImage:
    path: str  # relative to Img/, as in the list files
    category: int  # 0-based index into the 50 categories
    source: SourceLine


@dataclasses.dataclass(frozen=True)
class BoundingBox:
    x1: int
    y1: int
    x2: int
    y2: int
    source: SourceLine


@dataclasses.dataclass
class DeepFashionAnnotations:
    root: pathlib.Path
    annotation_dir: str  # "Anno" or "Anno_coarse"
    categories: list[Category]
    images: list[LabelledImage]
    partition: Optional[dict[str, tuple[str, SourceLine]]]  # None unless asked for
    bboxes: Optional[dict[str, BoundingBox]]  # None unless asked for

    def image_file(self, relative_path: str) -> pathlib.Path:
        return self.root / "Img" / relative_path


def _rows(path: pathlib.Path, display: str, num_columns: int) -> list[tuple[int, list[str]]]:
    """`(line_number, fields)` of every data row, after checking the count and widths."""
    try:
        # utf-8-sig: a byte-order mark some editors put at the start is not line 1's count.
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise AnnotationError(f"{display}: file not found ({path})") from None
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{display}: not UTF-8 text ({err})") from None
    lines = text.splitlines()
    if len(lines) < 2:
        raise AnnotationError(f"{display}: expected a count on line 1 and column names on line 2")
    try:
        declared = int(lines[0].strip())
    except ValueError:
        raise AnnotationError(f"{display}:1: expected the number of entries, got {lines[0].strip()!r:.60}") from None
    rows = []
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue  # trailing blank lines are harmless
        if len(fields) != num_columns:
            raise AnnotationError(
                f"{display}:{number}: expected {num_columns} columns, found {len(fields)}: {line.strip()!r:.100}"
            )
        rows.append((number, fields))
    if declared != len(rows):
        raise AnnotationError(f"{display}:1: line 1 declares {declared} entries but the file has {len(rows)} rows")
    return rows


def check_relative_path(path: str, where: SourceLine) -> str:
    """Rejects paths that would read outside the dataset folder."""
    posix = pathlib.PurePosixPath(path)
    if posix.is_absolute() or pathlib.PureWindowsPath(path).drive or path.startswith("\\"):
        raise AnnotationError(f"{where}: absolute path {path!r} (paths must be relative to Img/)")
    if ".." in posix.parts or ".." in pathlib.PureWindowsPath(path).parts:
        raise AnnotationError(f"{where}: path {path!r} escapes the dataset folder ('..')")
    return path


def _int(field: str, what: str, where: SourceLine) -> int:
    try:
        return int(field)
    except ValueError:
        raise AnnotationError(f"{where}: {what} must be an integer, got {field!r}") from None


def parse_category_cloth(path: pathlib.Path, display: str) -> list[Category]:
    categories, seen = [], set()
    for line, (name, type_field) in _rows(path, display, 2):
        where = SourceLine(display, line)
        kind = _int(type_field, "category type", where)
        if kind not in CATEGORY_TYPES:
            raise AnnotationError(f"{where}: category type must be 1, 2 or 3, got {kind}")
        if name in seen:
            raise AnnotationError(f"{where}: category {name!r} listed twice")
        seen.add(name)
        categories.append(Category(name, kind))
    if len(categories) != NUM_CATEGORIES:
        raise AnnotationError(f"{display}: expected {NUM_CATEGORIES} categories, found {len(categories)}")
    return categories


def parse_category_img(path: pathlib.Path, display: str, num_categories: int = NUM_CATEGORIES) -> list[LabelledImage]:
    images, seen = [], {}
    for line, (image_path, label_field) in _rows(path, display, 2):
        where = SourceLine(display, line)
        check_relative_path(image_path, where)
        label = _int(label_field, "label", where)
        if not 1 <= label <= num_categories:
            raise AnnotationError(f"{where}: label {label} outside 1..{num_categories} for {image_path}")
        if image_path in seen:
            raise AnnotationError(f"{where}: {image_path} already listed on line {seen[image_path]}")
        seen[image_path] = line
        images.append(LabelledImage(image_path, label - 1, where))
    return images


def parse_eval_partition(path: pathlib.Path, display: str) -> dict[str, tuple[str, SourceLine]]:
    partition: dict[str, tuple[str, SourceLine]] = {}
    for line, (image_path, value) in _rows(path, display, 2):
        where = SourceLine(display, line)
        check_relative_path(image_path, where)
        if value not in PARTITIONS:
            raise AnnotationError(f"{where}: partition must be one of {', '.join(PARTITIONS)}, got {value!r}")
        if image_path in partition:
            raise AnnotationError(f"{where}: {image_path} already listed at {partition[image_path][1]}")
        partition[image_path] = (value, where)
    return partition


def parse_bbox(path: pathlib.Path, display: str) -> dict[str, BoundingBox]:
    boxes: dict[str, BoundingBox] = {}
    for line, (image_path, *coords) in _rows(path, display, 5):
        where = SourceLine(display, line)
        check_relative_path(image_path, where)
        x1, y1, x2, y2 = (_int(c, "a bounding-box coordinate", where) for c in coords)
        if min(x1, y1) < 0 or x2 <= x1 or y2 <= y1:
            raise AnnotationError(f"{where}: bounding box ({x1}, {y1}, {x2}, {y2}) is empty or negative")
        if image_path in boxes:
            raise AnnotationError(f"{where}: {image_path} already listed at {boxes[image_path].source}")
        boxes[image_path] = BoundingBox(x1, y1, x2, y2, where)
    return boxes


def find_annotation_dir(root: pathlib.Path) -> str:
    for name in ANNOTATION_DIRS:
        if (root / name / "list_category_img.txt").is_file():
            return name
    raise AnnotationError(
        f"{root}: no Anno/list_category_img.txt or Anno_coarse/list_category_img.txt; point --deepfashion_dir "
        "at the folder holding Anno/ (or Anno_coarse/), Eval/ and Img/ of the Category and Attribute "
        "Prediction Benchmark"
    )


def load_annotations(root: str | os.PathLike, *, need_partition: bool = False, need_bboxes: bool = False) -> DeepFashionAnnotations:
    """Reads the list files under `root`; the partition and the boxes only when asked for."""
    root = pathlib.Path(root)
    anno = find_annotation_dir(root)
    categories = parse_category_cloth(root / anno / "list_category_cloth.txt", f"{anno}/list_category_cloth.txt")
    images = parse_category_img(root / anno / "list_category_img.txt", f"{anno}/list_category_img.txt", len(categories))
    partition = bboxes = None  # parsed only when used, so an unused file cannot block a run
    if need_partition:
        partition = parse_eval_partition(root / "Eval" / "list_eval_partition.txt", "Eval/list_eval_partition.txt")
    if need_bboxes:
        bboxes = parse_bbox(root / anno / "list_bbox.txt", f"{anno}/list_bbox.txt")
    return DeepFashionAnnotations(root, anno, categories, images, partition, bboxes)
