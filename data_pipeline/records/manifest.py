"""Reading `DATA_DIR/manifest.json` and checking the shards against it.

The manifest is the reader's only source of truth about a split: which shard files,
how many records each, their SHA-256, the class names. A manifest that is missing,
malformed or disagrees with the shards must stop training before the first step, with a
message that names the file and what is wrong, rather than surface as a wrong dataset.
"""

from __future__ import annotations

import hashlib
import json
import os

from data_pipeline.records.tfrecord_format import DATA_ADVICE

MANIFEST_NAME = "manifest.json"
SUPPORTED_FORMAT_VERSIONS = (1,)
_CHUNK = 1 << 20


class ManifestError(ValueError):
    """`manifest.json` is missing a field, holds a wrong type, or names an unknown split."""

    user_fixable, advice = True, DATA_ADVICE


class ShardChecksumError(ValueError):
    """A shard's SHA-256 differs from the one recorded in the manifest; `path` is the shard."""

    user_fixable, advice = True, DATA_ADVICE

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path

    def __reduce__(self):  # Travels intact from grain's worker processes.
        return type(self), (str(self), self.path)


class MissingShardError(FileNotFoundError):
    """Shard files the manifest lists are not on disk."""

    user_fixable, advice = True, DATA_ADVICE


def _require(mapping, key: str, kind: type, where: str, path: str):
    if not isinstance(mapping, dict) or key not in mapping:
        raise ManifestError(f"{path}: {where} lacks the key {key!r}")
    value = mapping[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(
            f"{path}: {where}[{key!r}] must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _check_split(name: str, split, path: str) -> None:
    where = f"splits[{name!r}]"
    num_examples = _require(split, "num_examples", int, where, path)
    shards = _require(split, "shards", list, where, path)
    total = 0
    for i, shard in enumerate(shards):
        shard_where = f"{where}['shards'][{i}]"
        file = _require(shard, "file", str, shard_where, path)
        if os.path.isabs(file) or ".." in file.replace("\\", "/").split("/"):
            raise ManifestError(f"{path}: {shard_where}['file'] = {file!r} escapes the data directory")
        total += _require(shard, "num_records", int, shard_where, path)
        _require(shard, "sha256", str, shard_where, path)
    if total != num_examples:
        raise ManifestError(
            f"{path}: {where}: shards hold {total} records in all but num_examples is {num_examples}"
        )


def load_manifest(data_dir: str | os.PathLike) -> dict:
    """Reads and validates `data_dir/manifest.json` (see ARCHITECTURE.md for the schema)."""
    path = os.path.join(os.fspath(data_dir), MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {os.fspath(data_dir)!r}: convert the dataset first "
            "(python -m data_pipeline.conversion.deepfashion ...)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: line {err.lineno} column {err.colno}: not valid JSON: {err.msg}") from err
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: top level must be a JSON object")
    version = _require(manifest, "format_version", int, "manifest", path)
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ManifestError(f"{path}: format_version {version} is not one of {SUPPORTED_FORMAT_VERSIONS}")
    class_names = _require(manifest, "class_names", list, "manifest", path)
    if not class_names or not all(isinstance(c, str) for c in class_names):
        raise ManifestError(f"{path}: class_names must be a non-empty list of strings")
    _require(manifest, "image_format", str, "manifest", path)
    splits = _require(manifest, "splits", dict, "manifest", path)
    for name, split in splits.items():
        _check_split(name, split, path)
    return manifest


def split_info(manifest: dict, split: str, data_dir: str | os.PathLike = "") -> dict:
    """The manifest entry of `split`, or a `ManifestError` listing the splits there are."""
    splits = manifest["splits"]
    if split not in splits:
        where = os.path.join(os.fspath(data_dir), MANIFEST_NAME) if data_dir else MANIFEST_NAME
        raise ManifestError(f"{where}: unknown split {split!r}; it has {sorted(splits)}")
    return splits[split]


def shard_paths(data_dir: str | os.PathLike, manifest: dict, split: str) -> list[str]:
    """Absolute paths of the split's shards, in manifest order."""
    return [
        os.path.join(os.fspath(data_dir), shard["file"])
        for shard in split_info(manifest, split, data_dir)["shards"]
    ]


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_shards_exist(data_dir: str | os.PathLike, split: str, manifest: dict) -> None:
    """Raises `MissingShardError` listing every shard of `split` that is not a file: all
    of them at once, so one rerun of the copy fixes them all."""
    paths = shard_paths(data_dir, manifest, split)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        where = os.path.join(os.fspath(data_dir), MANIFEST_NAME)
        raise MissingShardError(
            f"{where}: split {split!r} lists {len(paths)} shard files and {len(missing)} of them "
            f"are missing: {', '.join(missing)}; copy them back or re-run the conversion "
            "(which writes the shards and a matching manifest.json)")


def verify_split_checksums(
    data_dir: str | os.PathLike, split: str, manifest: dict | None = None
) -> None:
    """Raises `ShardChecksumError` naming the first shard whose SHA-256 is not the
    manifest's (or `MissingShardError` for missing shards)."""
    manifest = load_manifest(data_dir) if manifest is None else manifest
    check_shards_exist(data_dir, split, manifest)
    for shard in split_info(manifest, split, data_dir)["shards"]:
        path = os.path.join(os.fspath(data_dir), shard["file"])
        actual = file_sha256(path)
        if actual != shard["sha256"].lower():
            raise ShardChecksumError(
                f"{path}: SHA-256 {actual} does not match the manifest's {shard['sha256']} "
                "(the shard was modified or damaged after conversion)", path)


def describe(manifest: dict) -> str:
    """One line for a person: classes and examples per split."""
    counts = ", ".join(f"{name} {s['num_examples']}" for name, s in manifest["splits"].items())
    return f"{len(manifest['class_names'])} classes; {counts}"
