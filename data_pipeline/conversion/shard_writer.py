"""Writes TFRecord shards and their manifest so that a killed run is harmless.

Guarantees:
- A file with a final shard name (`train-00000-of-00004.tfrecord`) is always complete:
  shards are written as `<name>.partial`, fsynced, then renamed with `os.replace`.
- `manifest.json` exists only when every shard it lists exists with the listed SHA-256:
  it is deleted when a run starts and written (atomically) only after the last shard.
- A rerun of the same command finishes the job: each finished shard is recorded in a
  journal (`.shard_journal.jsonl`) with a fingerprint of exactly what went into it; a
  shard whose fingerprint and checksum still match is reused, anything else rewritten.

Encoding (reading, checking, cropping images) runs in a process pool; the main process
writes records in plan order, so the output is identical for any number of workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import re
import sys
from typing import Any, Callable, Iterator, Optional, Sequence

import tqdm

from data_pipeline.records import tfrecord_format

MANIFEST = "manifest.json"
JOURNAL = ".shard_journal.jsonl"
FORMAT_VERSION = 1
_SHARD_NAME = re.compile(r"^[a-z]+-\d{5}-of-\d{5}\.tfrecord(\.partial)?$")


class BadImageError(ValueError):
    """A listed image that cannot be used, with `--on_bad_image=error`."""


@dataclasses.dataclass(frozen=True)
class Encoded:
    """What an encode function returns for one item: a record, or why there is none."""

    description: str  # names the item for messages: path and annotation line
    label: int
    record: Optional[bytes] = None
    problem: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    split: str
    index: int
    num_shards: int
    items: tuple  # picklable, with a deterministic repr (it is fingerprinted)

    @property
    def file(self) -> str:
        return f"{self.split}-{self.index:05d}-of-{self.num_shards:05d}.tfrecord"


def plan_shards(split: str, items: Sequence, estimated_bytes: int, shard_size_bytes: int) -> list[ShardSpec]:
    """Cuts a split into equally many items per shard, about `shard_size_bytes` each."""
    num_shards = max(1, min(len(items), round(estimated_bytes / max(1, shard_size_bytes)))) if items else 1
    bounds = [len(items) * i // num_shards for i in range(num_shards + 1)]
    return [ShardSpec(split, i, num_shards, tuple(items[bounds[i]:bounds[i + 1]])) for i in range(num_shards)]


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fingerprint(shard: ShardSpec, options: str) -> str:
    return hashlib.sha256(f"{FORMAT_VERSION}|{options}|{shard.file}|{shard.items!r}".encode()).hexdigest()


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_journal(output_dir: pathlib.Path) -> dict[str, dict]:
    entries = {}
    journal = output_dir / JOURNAL
    if journal.exists():
        for line in journal.read_text().splitlines():
            try:
                entry = json.loads(line)
                entries[entry["file"]] = entry
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash: that shard is simply redone
    return entries


def _reusable(output_dir: pathlib.Path, entry: Optional[dict], fingerprint: str) -> bool:
    """A finished shard of the same plan, intact, and without skips (a skipped image may
    have been fixed since, so such shards are redone). Source images are trusted not to
    have changed under the same paths."""
    if not entry or entry.get("fingerprint") != fingerprint or entry.get("skipped"):
        return False
    path = output_dir / entry["file"]
    return path.is_file() and sha256_file(path) == entry.get("sha256")


def _clean_stale_files(output_dir: pathlib.Path, planned: set[str]) -> None:
    """Removes the manifest and any shard-named file that is not part of this plan."""
    (output_dir / MANIFEST).unlink(missing_ok=True)
    for path in output_dir.iterdir():
        if _SHARD_NAME.match(path.name) and path.name not in planned:
            path.unlink()


def write_shards(
    output_dir: str | os.PathLike,
    shards: Sequence[ShardSpec],
    encode: Callable[[Any], Encoded],
    *,
    num_classes: int,
    options: str,
    on_bad_image: str = "error",
    num_workers: Optional[int] = None,
    progress: bool = True,
    skip_hint: str = "use --on_bad_image=skip to leave such images out",
) -> tuple[dict[str, list[dict]], list[dict]]:
    """Writes every shard (reusing finished ones); returns `(shard infos per split, skipped)`.

    `encode` maps one item to an `Encoded`; it must be a module-level function when
    `num_workers > 1`. `options` is everything else that changes the bytes written
    (crop, resize, ...); it is part of each shard's fingerprint. `skip_hint` ends the
    error for a bad image: how the program's user asks to skip such images.
    """
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale_files(output_dir, {s.file for s in shards})
    journal = _read_journal(output_dir)
    todo = [(shard, fingerprint) for shard in shards
            if not _reusable(output_dir, journal.get(shard.file), fingerprint := _fingerprint(shard, options))]
    for shard, _ in todo:  # a same-named shard of another run must not pass for this run's
        (output_dir / shard.file).unlink(missing_ok=True)
    items = [item for shard, _ in todo for item in shard.items]
    total = sum(len(s.items) for s in shards)
    bar = tqdm.tqdm(total=total, initial=total - len(items), unit="img", desc=f"writing shards to {output_dir}",
                    file=sys.stderr, disable=not progress, smoothing=0.05)
    workers = num_workers or os.cpu_count() or 1
    pool = multiprocessing.get_context("forkserver").Pool(workers) if workers > 1 and items else None
    try:
        # Results come back in item order whatever the worker count, so shards are identical.
        results: Iterator[Encoded] = pool.imap(encode, items, chunksize=8) if pool else map(encode, items)
        with open(output_dir / JOURNAL, "a") as journal_stream:
            for shard, fingerprint in todo:
                entry = _write_one(output_dir, shard, results, num_classes, on_bad_image, skip_hint, bar)
                entry["fingerprint"] = fingerprint
                journal_stream.write(json.dumps(entry) + "\n")
                journal_stream.flush()
                os.fsync(journal_stream.fileno())
                journal[shard.file] = entry
    finally:
        bar.close()
        if pool:
            pool.terminate()
    infos: dict[str, list[dict]] = {}
    skipped: list[dict] = []
    for shard in shards:
        entry = journal[shard.file]
        infos.setdefault(shard.split, []).append(
            {k: entry[k] for k in ("file", "num_records", "sha256", "class_counts")})
        skipped.extend(entry["skipped"])
    return infos, skipped


def _write_one(output_dir, shard: ShardSpec, results, num_classes, on_bad_image, skip_hint, bar) -> dict:
    final = output_dir / shard.file
    partial = output_dir / (shard.file + ".partial")
    digest = hashlib.sha256()
    class_counts = [0] * num_classes
    skipped = []
    with open(partial, "wb") as stream:
        for _ in shard.items:
            encoded = next(results)
            bar.update(1)
            if encoded.problem is not None:
                if on_bad_image == "error":
                    raise BadImageError(
                        f"{encoded.description}: {encoded.problem} ({skip_hint})")
                skipped.append({"image": encoded.description, "problem": encoded.problem})
                bar.write(f"skipped {encoded.description}: {encoded.problem}", file=sys.stderr)
                continue
            framed = tfrecord_format.frame_record(encoded.record)
            stream.write(framed)
            digest.update(framed)
            class_counts[encoded.label] += 1
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(partial, final)
    _fsync_dir(output_dir)
    return {"file": shard.file, "num_records": sum(class_counts), "sha256": digest.hexdigest(),
            "class_counts": class_counts, "skipped": skipped}


def build_manifest(class_names: Sequence[str], image_format: str, infos: dict[str, list[dict]], source: dict) -> dict:
    splits = {}
    for split, shards in infos.items():
        counts = [sum(s["class_counts"][c] for s in shards) for c in range(len(class_names))]
        splits[split] = {
            "num_examples": sum(counts),
            "class_counts": counts,
            "shards": [{k: s[k] for k in ("file", "num_records", "sha256")} for s in shards],
        }
    return {"format_version": FORMAT_VERSION, "class_names": list(class_names), "image_format": image_format,
            "splits": splits, "source": source}


def write_manifest(output_dir: str | os.PathLike, manifest: dict) -> pathlib.Path:
    """Writes `manifest.json` atomically; called only after every shard is in place."""
    output_dir = pathlib.Path(output_dir)
    partial = output_dir / (MANIFEST + ".partial")
    with open(partial, "w") as stream:
        json.dump(manifest, stream, indent=1)
        stream.write("\n")
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(partial, output_dir / MANIFEST)
    _fsync_dir(output_dir)
    return output_dir / MANIFEST
