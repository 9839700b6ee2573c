"""One run per workdir: an exclusive lock, taken before anything is written there.

Two runs writing one workdir (a second launch, a requeued job whose predecessor is still
stopping) would mix their checkpoints, configs and reports. So training, `--mode eval`
and `--mode export` take WORKDIR/run.lock with `fcntl.flock` first; a second launch is
refused at once, its one error line naming the holder (host, pid, since when, command)
read from the lock file. The lock belongs to the open file, not to the file's existence:
it goes with its process however that ends (SIGKILL and the OOM killer included), so a
dead holder never blocks a rerun, and a leftover run.lock means nothing. `flock` works
across the hosts of an NFS mount; on a file system without it (some Lustre mounts) the
run goes on with a warning.

The processes of one multi-process run share the lock: process 0 takes it and tells the
others through jax.distributed, so a second run is refused on every one of its
processes, and a second multi-process run on shared storage too. `wait_secs` lets a
requeued job wait for the old holder to end instead of failing
(`config.workdir_lock_wait_secs`). Read-only modes (report, summary, benchmark) take
none.
"""

from __future__ import annotations

import atexit
import datetime
import fcntl
import itertools
import json
import os
import shlex
import socket
import sys
import time

from absl import logging

from msff_jax import console

LOCK_FILE = "run.lock"
# The modes that write into the workdir.
WRITING_MODES = ("train", "eval", "export")


class WorkdirBusyError(console.UserError):
    """Another run holds the workdir's lock."""


class _Held:
    def __init__(self, path: str, fd: int, created_workdir: bool):
        self.path, self.fd, self.created_workdir = path, fd, created_workdir


# Locks this process holds, by the workdir's real path (taking one twice is a no-op).
_held: dict[str, _Held] = {}
_acquisitions = itertools.count()
_hooks_installed = False


def acquire(workdir: str, *, wait_secs: float = 0.0) -> None:
    """Takes WORKDIR's lock for the rest of this process (or until `release`); call it
    on every process of a run, before writing anything into WORKDIR. Raises
    `WorkdirBusyError` naming the holder when another run has it, after waiting up to
    `wait_secs` for it to end."""
    from msff_jax.train import distributed

    number = next(_acquisitions)  # The same on every process: they call this in step.
    failure = distributed.on_primary(f"workdir_lock/{number}", lambda: _acquire_here(workdir, wait_secs),
                                     timeout_secs=max(0.0, wait_secs) + 300)
    if failure and failure.kind == WorkdirBusyError.__name__:
        raise WorkdirBusyError(failure.message)
    if failure:
        raise RuntimeError(f"process 0 could not take the lock of {workdir}: {failure.message}")


def release(workdir: str) -> None:
    """Gives the lock back: removes run.lock (and the workdir, when taking the lock made
    it and nothing else was written), then lets go. Runs at exit by itself."""
    held = _held.pop(os.path.realpath(workdir), None)
    if held is None:
        return
    try:
        os.unlink(held.path)  # Still locked: a waiting run then retries on a new file.
        if held.created_workdir:
            os.rmdir(os.path.dirname(held.path))  # Only when empty.
    except OSError:
        pass
    os.close(held.fd)


def holder(workdir: str) -> dict | None:
    """What the current (or last) holder wrote into WORKDIR/run.lock, or None."""
    try:
        with open(os.path.join(workdir, LOCK_FILE), encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    try:
        found = json.loads(text)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


# ----------------------------------------------------------------------------- here


def _acquire_here(workdir: str, wait_secs: float) -> None:
    key = os.path.realpath(workdir)
    if key in _held:
        return
    created = not os.path.isdir(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    deadline = time.monotonic() + max(0.0, wait_secs)
    said_waiting = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise WorkdirBusyError(_refusal(workdir, waited=wait_secs)) from None
            if not said_waiting:
                console.say(f"{workdir} is in use by {_describe(_holder_soon(workdir))}; waiting up "
                            f"to {wait_secs:.0f} s for it to end (config.workdir_lock_wait_secs)")
                said_waiting = True
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
            continue
        except OSError as err:  # No flock on this file system.
            os.close(fd)
            logging.warning("cannot lock %s (%s): a second run on this workdir would not be "
                            "refused", path, err)
            return
        # The previous holder removes the file as it lets go: a lock taken on the removed
        # file guards nothing, so take the new one.
        try:
            current = os.stat(path)
            ours = os.fstat(fd)
            same = (current.st_dev, current.st_ino) == (ours.st_dev, ours.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_this_process()).encode(), 0)
    _held[key] = _Held(path, fd, created)
    global _hooks_installed
    if not _hooks_installed:
        atexit.register(_release_all)
        os.register_at_fork(after_in_child=_forget_in_child)
        _hooks_installed = True


def _this_process() -> dict:
    command = shlex.join([os.path.basename(sys.executable), *sys.argv])
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command if len(command) <= 400 else command[:400] + "..."}


def _holder_soon(workdir: str) -> dict | None:
    """The holder's details; it writes them just after locking, so a launch that lost
    the race by milliseconds reads again briefly."""
    for _ in range(20):
        found = holder(workdir)
        if found:
            return found
        time.sleep(0.05)
    return None


def _describe(found: dict | None) -> str:
    if not found:
        return "another run (it has not written its details)"
    since = str(found.get("since", "?")).replace("T", " ")
    return (f"another run (host {found.get('host', '?')}, pid {found.get('pid', '?')}, since "
            f"{since}, command: {found.get('command', '?')})")


def _refusal(workdir: str, *, waited: float) -> str:
    found = _holder_soon(workdir)
    stop = (f"stop it (kill {found['pid']} on {found.get('host', 'its host')})"
            if found and "pid" in found else "stop it")
    after = f" after waiting {waited:.0f} s" if waited > 0 else ""
    return (f"--workdir {workdir} is in use by {_describe(found)}{after}: one run writes a "
            f"workdir at a time. Wait for it to end or {stop}, or pass another --workdir; a "
            "requeued job can wait for it with --config.workdir_lock_wait_secs=SECONDS.")


def _release_all() -> None:
    for workdir in list(_held):
        release(workdir)


def _forget_in_child() -> None:
    """A forked child shares the lock's open file; closing its copy (never unlocking)
    leaves the lock with the parent alone, so a child outliving it holds nothing."""
    for held in _held.values():
        try:
            os.close(held.fd)
        except OSError:
            pass
    _held.clear()
