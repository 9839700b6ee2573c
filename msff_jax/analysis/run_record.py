"""WORKDIR/study_run.json: every attempt of one study run and what it cost.

The study writes an attempt when it starts (`begin_attempt`, status "running", no end)
and completes it when the training process exits (`end_attempt`). An attempt whose
study was killed (SIGKILL, a lost machine) therefore stays in the file with its start,
so the time and cost tables never lose it: `settled` reads such an open attempt as
lasting until the run last showed life, the newest modification time of its launch.log
(where the training writes every line) or eval_results.json, and says so in its status.
The next study run writes that reading into the file (`close_open_attempts`).

The record: variant, model, seed, status (the latest attempt's), wall_time_s and
device_hours (sums over attempts; device-hours = wall time x devices), device_kind and
device_count (the latest attempt's), and `attempts`, each with started (local time),
started_unix, ended_unix (null while open), wall_time_s, returncode, status, devices,
device_kind, device_count, and `estimated` when its end was read from file times.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

RUN_RECORD = "study_run.json"
LOG_FILE = "launch.log"
RESULTS_FILE = "eval_results.json"
RUNNING = "running"


def read(workdir: Path) -> dict:
    """The record, or {} when there is none. A file that is not a JSON object raises
    ValueError naming it."""
    path = Path(workdir) / RUN_RECORD
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}")
    return record


def _write(workdir: Path, record: dict) -> dict:
    path = Path(workdir) / RUN_RECORD
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)
    return record


def _is_open(attempt: dict) -> bool:
    """Open: begun and never ended. Attempts written before starts were recorded have
    no `ended_unix` key and are complete."""
    return "ended_unix" in attempt and attempt["ended_unix"] is None


def _with_totals(record: dict) -> dict:
    attempts = record.get("attempts", [])
    record["wall_time_s"] = sum(float(a.get("wall_time_s", 0.0)) for a in attempts)
    record["device_hours"] = sum(float(a.get("wall_time_s", 0.0)) / 3600 * int(a.get("device_count", 1))
                                 for a in attempts)
    if attempts:
        last = attempts[-1]
        record["status"] = last.get("status", record.get("status", ""))
        record["device_kind"] = last.get("device_kind", record.get("device_kind", ""))
        record["device_count"] = last.get("device_count", record.get("device_count", 1))
    return record


def begin_attempt(workdir: Path, *, variant: str, model: str, seed: int, devices: list[str],
                  device_kind: str, started: float | None = None) -> int:
    """Records an attempt as started, before the training process runs; returns its
    index for `end_attempt`."""
    started = time.time() if started is None else started
    record = read(workdir)
    attempts = list(record.get("attempts", []))
    attempts.append({
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "started_unix": started, "ended_unix": None, "wall_time_s": 0.0, "returncode": None,
        "status": RUNNING, "device_kind": device_kind, "device_count": max(len(devices), 1),
        "devices": list(devices)})
    record.update(variant=variant, model=model, seed=seed, attempts=attempts)
    _write(workdir, _with_totals(record))
    return len(attempts) - 1


def end_attempt(workdir: Path, index: int, *, returncode: int, status: str,
                ended: float | None = None) -> dict:
    """Completes attempt `index` with its exit status and wall time."""
    ended = time.time() if ended is None else ended
    record = read(workdir)
    attempt = record["attempts"][index]
    attempt.update(ended_unix=ended, wall_time_s=max(0.0, ended - attempt["started_unix"]),
                   returncode=returncode, status=status)
    return _write(workdir, _with_totals(record))


def _last_sign_of_life(workdir: Path, since: float) -> tuple[float, bool]:
    """(when the run last wrote its log or results, whether it finished since `since`)."""
    times = [since]
    finished = False
    for name in (LOG_FILE, RESULTS_FILE):
        try:
            mtime = os.path.getmtime(Path(workdir) / name)
        except OSError:
            continue
        times.append(mtime)
        finished = finished or (name == RESULTS_FILE and mtime >= since)
    return max(times), finished


def settled(record: dict, workdir: Path) -> dict:
    """A copy of `record` in which every open attempt has the wall time and status read
    from the run's files (see the module docstring), and the totals include them."""
    if not any(_is_open(a) for a in record.get("attempts", [])):
        return record
    record = json.loads(json.dumps(record))
    for attempt in record.get("attempts", []):
        if not _is_open(attempt):
            continue
        started = float(attempt.get("started_unix", 0.0))
        last, finished = _last_sign_of_life(workdir, started)
        attempt.update(wall_time_s=max(0.0, last - started), estimated=True,
                       status=("trained (the study stopped before recording it)" if finished
                               else "no end recorded (stopped with the study, or still running)"))
    return _with_totals(record)


def close_open_attempts(workdir: Path) -> dict:
    """Writes `settled`'s reading of open attempts into the file (the study calls this
    before a run's next attempt, when no attempt of it can still be running)."""
    record = read(workdir)
    if not any(_is_open(a) for a in record.get("attempts", [])):
        return record
    record = settled(record, workdir)
    for attempt in record["attempts"]:
        if attempt.get("estimated") and attempt.get("ended_unix", 0) is None:
            attempt["ended_unix"] = attempt["started_unix"] + attempt["wall_time_s"]
            if attempt["status"].startswith("no end recorded"):
                attempt["status"] = "interrupted (the study stopped during it)"
    return _write(workdir, _with_totals(record))
