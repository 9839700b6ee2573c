"""What the user gave, as a list of labelled files: a folder per class, the same split
into train/val/test folders, or a table (CSV, TSV or JSON Lines).

    ROOT/<class>/<image>                    one class per folder (torchvision's ImageFolder)
    ROOT/<class>/<product>/<image>          every folder below a class folder is one product
    ROOT/{train,val,test}/<class>/...       the user's own split, kept as given
    --table FILE: path,label[,group][,split] with paths relative to ROOT

Nothing is dropped without a word: a row or file that cannot be used becomes a
`Problem` (the caller stops on it, or skips it and lists it in the report), and files
that are not images by their extension, hidden files and folders, and a second link to
a folder already read are listed as ignored.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import posixpath
import re
from typing import Iterator, Optional, Sequence

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")  # compared in lower case
SPLITS = ("train", "val", "test")
_SPLIT_SPELLINGS = {"train": "train", "training": "train", "val": "val", "valid": "val",
                    "validation": "val", "dev": "val", "test": "test", "testing": "test"}
_DRIVE = re.compile(r"^[A-Za-z]:/")


class CatalogueError(ValueError):
    """Input that cannot be converted at all (no policy applies): the message says what
    to change."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One labelled image as listed."""

    path: str  # relative to the image root, with forward slashes
    label: str
    group: Optional[str]  # product (SKU, listing); None: the image is a product of its own
    split: Optional[str]  # the user's split, or None
    where: str  # for messages: the path, or the table's file and line


@dataclasses.dataclass(frozen=True)
class Problem:
    """A row, file or class left out (with --skip_bad) or stopping the run (without)."""

    where: str
    reason: str
    kind: str  # a few words the report and the error message count by, one spelling a kind
    images: int = 1  # how many images it stands for (a whole folder or class: more)


@dataclasses.dataclass
class Discovery:
    layout: str  # "folders", "split folders" or "table"
    entries: list[Entry]
    problems: list[Problem]
    ignored: list[str]  # no images by extension, hidden, or a folder linked a second time
    class_folders: list[str]  # folder layouts: every class folder, empty ones included
    user_split: bool
    group_source: str  # what makes a product: "subfolders", "the 'sku' column", "none"


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _walk(root: str, top: str, found: Discovery) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk in sorted order (the result must not depend on the file system's order),
    yielding `(folder, subfolders not entered, files)`. It follows links to folders, as
    people build datasets out of links, but enters no folder twice (a second link to it,
    or a link cycle), and no hidden folder; the caller lists those as ignored. A folder
    that cannot be listed (os.walk would pass over it without a word) is a problem in
    `found`: its images would be missing from the dataset."""
    status = os.stat(top)
    seen = {(status.st_dev, status.st_ino)}

    def unreadable(err: OSError) -> None:
        found.problems.append(Problem(_relative(root, err.filename) + "/", "cannot list the folder "
                                      f"({err.strerror or err})", "unreadable folder", images=0))

    for directory, folders, files in os.walk(top, followlinks=True, onerror=unreadable):
        entered, passed = [], []
        for name in sorted(folders):
            status = os.stat(os.path.join(directory, name))
            key = (status.st_dev, status.st_ino)
            if _hidden(name) or key in seen:
                passed.append(name)
            else:
                seen.add(key)
                entered.append(name)
        folders[:] = entered
        yield directory, passed, sorted(files)


def _relative(root: str, path: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _scan_class_folders(root: str, top: str, split: Optional[str], group_subfolders: bool,
                        found: Discovery) -> None:
    """Adds the images of `top/<class>/**` to `found`."""
    for directory, passed, files in _walk(root, top, found):
        depth = len(os.path.relpath(directory, top).split(os.sep)) if directory != top else 0
        found.ignored += [_relative(root, os.path.join(directory, p)) + "/" for p in passed]
        if depth == 0:
            for name in files:
                relative = _relative(root, os.path.join(directory, name))
                if is_image_name(name) and not _hidden(name):
                    found.problems.append(Problem(relative, "image outside any class folder", "no class folder"))
                else:
                    found.ignored.append(relative)
            continue
        parts = os.path.relpath(directory, top).split(os.sep)
        class_name = parts[0]
        if depth == 1 and class_name not in found.class_folders:
            found.class_folders.append(class_name)
        group = "/".join(parts) if depth > 1 and group_subfolders else None
        for name in files:
            relative = _relative(root, os.path.join(directory, name))
            if _hidden(name) or not is_image_name(name):
                found.ignored.append(relative)
                continue
            found.entries.append(Entry(relative, class_name, group, split, relative))


def discover_folders(root: str, *, group_subfolders: bool = True) -> Discovery:
    """ROOT/<class>/... or ROOT/{train,val,test}/<class>/..."""
    top = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not _hidden(d))
    split_named = [d for d in top if d in SPLITS]
    user_split = bool(split_named)
    if user_split and len(split_named) != len(top):
        others = [d for d in top if d not in SPLITS]
        raise CatalogueError(
            f"{root} holds split folders ({', '.join(split_named)}) beside other folders "
            f"({', '.join(others[:5])}); use one layout: {root}/<class>/... or "
            f"{root}/{{train,val,test}}/<class>/...")
    if user_split and "train" not in split_named:
        raise CatalogueError(f"{root} has {', '.join(split_named)} folders but no train folder")
    found = Discovery("split folders" if user_split else "folders", [], [], [], [], user_split,
                      "subfolders" if group_subfolders else "none")
    if not user_split:
        _scan_class_folders(root, root, None, group_subfolders, found)
    else:
        for directory, passed, files in _walk(root, root, found):  # the root itself: loose files only
            found.ignored += [_relative(root, os.path.join(directory, p)) + "/" for p in passed]
            for name in files:
                relative = _relative(root, os.path.join(directory, name))
                if is_image_name(name) and not _hidden(name):
                    found.problems.append(Problem(relative, "image outside any split and class folder",
                                                  "no class folder"))
                else:
                    found.ignored.append(relative)
            break
        for split in split_named:
            _scan_class_folders(root, os.path.join(root, split), split, group_subfolders, found)
    if not found.class_folders:
        raise CatalogueError(f"{root} has no class folders: expected {root}/<class>/<image> "
                             f"(or {root}/train/<class>/<image>); image names end in "
                             f"{', '.join(IMAGE_EXTENSIONS)} (any case)")
    found.class_folders.sort()
    return found


# ------------------------------------------------------------------------------ tables


@dataclasses.dataclass(frozen=True)
class Columns:
    path: str = "path"
    label: str = "label"
    group: str = ""  # "" : no group column
    split: str = ""  # "" : no split column


def _rows(table: str) -> Iterator[tuple[int, object]]:
    """(line number, row as a dict, or a string saying why the line is no row). A UTF-8
    byte-order mark, as spreadsheet programs write, is dropped."""
    extension = os.path.splitext(table)[1].lower()
    try:
        with open(table, encoding="utf-8-sig", newline="") as stream:
            if extension in (".csv", ".tsv", ".txt"):
                reader = csv.DictReader(stream, delimiter="\t" if extension == ".tsv" else ",")
                yield 0, reader.fieldnames or []
                for row in reader:
                    yield reader.line_num, row
            elif extension in (".jsonl", ".ndjson", ".json"):
                yield 0, None
                for number, line in enumerate(stream, start=1):
                    if not line.strip():
                        continue
                    if number == 1 and line.lstrip().startswith("["):
                        raise CatalogueError(f"{table}: holds a JSON array; write one JSON object per line "
                                             "(JSON Lines)")
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        yield number, f"not valid JSON ({err.msg} at column {err.colno})"
                        continue
                    yield number, row if isinstance(row, dict) else "not a JSON object"
            else:
                raise CatalogueError(f"{table}: unknown table type {extension!r}; use .csv, .tsv or "
                                     ".jsonl (JSON Lines)")
    except UnicodeDecodeError as err:
        raise CatalogueError(f"{table}: line {_first_line_not_utf8(table)} is not UTF-8 text; save the "
                             "table as UTF-8 (CSV UTF-8 in spreadsheet programs)") from err
    except csv.Error as err:
        raise CatalogueError(f"{table}: not a readable CSV file ({err})") from err


def _first_line_not_utf8(table: str) -> int:
    with open(table, "rb") as stream:
        for number, line in enumerate(stream, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


def _value(row: dict, column: str) -> str:
    value = row.get(column)
    return "" if value is None else str(value).strip()


def clean_relative_path(path: str) -> Optional[str]:
    """The path with forward slashes and no `.` parts, or None when it leaves the root
    (absolute, a drive letter, or `..` above the root). Symbolic links are not followed:
    a link inside the root is the user's own way to lay out files."""
    path = path.replace("\\", "/")
    if path.startswith("/") or _DRIVE.match(path):
        return None
    normal = posixpath.normpath(path)
    if normal == ".." or normal.startswith("../") or normal == ".":
        return None
    return normal


def discover_table(root: str, table: str, columns: Columns) -> Discovery:
    """One entry per row; a bad row becomes a Problem naming the table's line."""
    rows = _rows(table)
    _, header = next(rows)
    wanted = [c for c in (columns.path, columns.label, columns.group, columns.split) if c]
    if header is not None:
        missing = [c for c in wanted if c not in header]
        if missing:
            raise CatalogueError(
                f"{table}: no column {' and no column '.join(repr(c) for c in missing)}; its columns are "
                f"{', '.join(repr(c) for c in header)} (set --path_column, --label_column, "
                "--group_column, --split_column)")
    found = Discovery("table", [], [], [], [], bool(columns.split),
                      f"the {columns.group!r} column" if columns.group else "none")
    first_line: dict[str, int] = {}
    name = os.path.basename(table)
    for line, row in rows:
        where = f"{name} line {line}"
        if isinstance(row, str):
            found.problems.append(Problem(where, row, "bad row"))
            continue
        raw_path, label = _value(row, columns.path), _value(row, columns.label)
        if not raw_path or not label:
            empty = columns.path if not raw_path else columns.label
            found.problems.append(Problem(where, f"no value in column {empty!r}", "bad row"))
            continue
        path = clean_relative_path(raw_path)
        if path is None:
            found.problems.append(Problem(f"{where} ({raw_path})", "the path leaves the image root; "
                                          "paths are relative to --image_root", "outside the root"))
            continue
        split = None
        if columns.split:
            split = _SPLIT_SPELLINGS.get(_value(row, columns.split).lower())
            if split is None:
                found.problems.append(Problem(where, f"split {_value(row, columns.split)!r} is not train, val "
                                              "or test", "bad row"))
                continue
        if path in first_line:
            found.problems.append(Problem(f"{where} ({path})", f"the same file again (first at line "
                                          f"{first_line[path]})", "repeated row"))
            continue
        first_line[path] = line
        if not os.path.isfile(os.path.join(root, path)):
            found.problems.append(Problem(f"{where} ({path})", f"file missing under {root}", "missing file"))
            continue
        group = _value(row, columns.group) if columns.group else ""
        found.entries.append(Entry(path, label, group or None, split, f"{where} ({path})"))
    if not found.entries and not found.problems:
        raise CatalogueError(f"{table}: no rows")
    return found


# --------------------------------------------------------------------------- classes


def restrict_to_classes(found: Discovery, classes: Sequence[str]) -> None:
    """Keeps the entries whose label is one of `classes`; the others become problems:
    one per row for a table, one per class folder for folders."""
    allowed = set(classes)
    outside = [e for e in found.entries if e.label not in allowed]
    found.entries = [e for e in found.entries if e.label in allowed]
    listed = ", ".join(classes)
    if found.layout == "table":
        found.problems += [Problem(e.where, f"label {e.label!r} is not one of --classes ({listed})",
                                   "unknown label") for e in outside]
        return
    by_folder: dict[str, int] = {}
    for entry in outside:
        folder = "/".join(entry.path.split("/")[:2 if entry.split else 1])  # [split/]class
        by_folder[folder] = by_folder.get(folder, 0) + 1
    found.problems += [Problem(f"{folder}/", f"class folder {folder.split('/')[-1]!r} is not one of "
                               f"--classes ({listed})", "unknown label", images=n)
                       for folder, n in sorted(by_folder.items())]
