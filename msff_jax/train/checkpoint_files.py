"""Which files a checkpoint step holds, so that one missing or cut short is found before
anything is restored from it.

Once a step is committed (Orbax renamed it into place), process 0 lists every file in it
with its size into STEP/file_sizes.json. Before a restore, `check_step` compares the
step with that list: a file gone (a partial copy, a crash before the data reached the
disk) or shorter than written (a truncated copy) names the step and the file. A step
without the list (committed just before a crash, or written before this check existed)
gets the checks that need no list: the tree metadata is there and every JSON file
parses; anything else shows when TensorStore reads it. Sizes cannot show a flipped bit,
and Orbax keeps no checksum of array contents.
"""

from __future__ import annotations

import json
import os

from msff_jax import console

SIZES_FILE = "file_sizes.json"
# Files a step always has, whatever else Orbax writes: the state's tree structure, without
# which Orbax reads the state as a tree of another shape.
REQUIRED = ("state/_METADATA",)
_JSON_NAMES = ("_CHECKPOINT_METADATA", "_METADATA", "metrics")


class DamagedCheckpointError(console.UserError, ValueError):
    """A checkpoint step directory with a file missing, truncated or unreadable."""


def _files(step_dir: str) -> dict[str, int]:
    sizes = {}
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, step_dir)
            if not relative.startswith(SIZES_FILE):  # Nor its temporary copy.
                sizes[relative] = os.path.getsize(path)
    return sizes


def record(step_dir: str) -> None:
    """Writes STEP/file_sizes.json for a committed step (process 0; atomically)."""
    listed = {"format": 1, "files": dict(sorted(_files(step_dir).items()))}
    path = os.path.join(step_dir, SIZES_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(listed, f, indent=1)
    os.replace(path + ".tmp", path)


def update(step_dir: str, relative: str) -> None:
    """Records the new size of one file rewritten in a committed step (its metrics)."""
    path = os.path.join(step_dir, SIZES_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        listed = json.load(f)
    listed["files"][relative] = os.path.getsize(os.path.join(step_dir, relative))
    with open(path + ".tmp", "w") as f:
        json.dump(listed, f, indent=1)
    os.replace(path + ".tmp", path)


def check_step(step_dir: str) -> None:
    """Raises `DamagedCheckpointError` naming the first file of the step that is missing,
    shorter or longer than recorded, or unreadable."""
    listed = _listed_sizes(step_dir)
    if listed is not None:
        for relative, size in sorted(listed.items()):
            path = os.path.join(step_dir, relative)
            try:
                found = os.path.getsize(path)
            except OSError:
                raise DamagedCheckpointError(f"{path} is missing") from None
            if found != size:
                raise DamagedCheckpointError(f"{path} holds {found} bytes, {size} were written")
    for relative in REQUIRED:
        if not os.path.isfile(os.path.join(step_dir, relative)):
            raise DamagedCheckpointError(f"{os.path.join(step_dir, relative)} is missing")
    for root, _, names in os.walk(step_dir):
        for name in names:
            if name.endswith(".json") or name in _JSON_NAMES:
                _check_json(os.path.join(root, name))


def _listed_sizes(step_dir: str) -> dict[str, int] | None:
    path = os.path.join(step_dir, SIZES_FILE)
    if not os.path.exists(path):
        return None
    listed = _check_json(path)
    files = listed.get("files") if isinstance(listed, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, int) for v in files.values()):
        raise DamagedCheckpointError(f"{path}: not the list of the step's files")
    return files


def _check_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise DamagedCheckpointError(f"{path} is unreadable ({err})") from err
