"""Decode workers that end with their run, and the shared memory they leave behind.

grain's worker processes wait on their output queue for as long as nobody tells them to
stop. When the training process dies without stopping them (SIGKILL, the OOM killer),
they would wait forever, re-parented to PID 1, SIGTERM blocked from birth (see
msff_jax.train.preemption), each holding shared-memory batches, and the multiprocessing
resource tracker would wait for them. So:

- a parent watch (in every worker): a thread that checks every half second whether the
  process that started the worker is still its parent, and ends the worker when it is
  not. (Linux's PR_SET_PDEATHSIG is no substitute: it fires when the *thread* that
  started the worker ends, and grain starts workers from a thread pool.) Once the
  workers are gone, the resource tracker sees its pipe close, removes the shared memory
  still registered with it, and exits.
- tagged shared memory (in every worker): names its shared-memory blocks
  `psm_msff_<pid namespace>_<parent pid>_<parent start time>_<random>` instead of
  `psm_<random>`, so that they can be traced to their run.
- `remove_orphaned_shared_memory` (in the process that starts workers, once): blocks a
  whole process group killed at once left in /dev/shm (the tracker died with it) are
  removed when their name proves them ours and their run dead: this project's prefix,
  this PID namespace, and no live process with that pid and start time.

`worker_init_fn(...)` is grain's `worker_init_fn` doing the first two in each worker; it
does the third itself, in the process that builds the pipeline.
"""

from __future__ import annotations

import functools
import os
import secrets
import threading
import time
from typing import Callable

from absl import logging

SHM_DIR = "/dev/shm"
SHM_PREFIX = "psm_msff_"
WATCH_INTERVAL_SECS = 0.5


def stat_fields(pid: int | str) -> list[str] | None:
    """Fields 3 onward of /proc/PID/stat (state, parent pid, process group, ...; index
    i is field i + 3), or None when the process is gone or this is not Linux. The
    command name (field 2, in parentheses) may hold spaces, so the split starts after
    its closing parenthesis."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22), or None."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def run_tag(pid: int) -> str | None:
    """`<pid namespace>_<pid>_<start time>` for the process `pid`, or None off Linux."""
    namespace, started = _pid_namespace(), _start_time(pid)
    if namespace is None or started is None:
        return None
    return f"{namespace:x}_{pid}_{started}"


def _alive(pid: int, started: int) -> bool:
    return _start_time(pid) == started


# ----------------------------------------------------------------------------- workers


def worker_init_fn(also: Callable[[int, int], None]) -> Callable[[int, int], None]:
    """grain's `worker_init_fn` for workers of this process: `also(worker_index,
    worker_count)`, then the parent watch and tagged shared memory. Called where the
    pipeline is built, it first removes what killed runs left (once per process)."""
    remove_orphaned_shared_memory()
    return functools.partial(_worker_init, also=also, parent_pid=os.getpid())


def _worker_init(worker_index: int, worker_count: int, *, also, parent_pid: int) -> None:
    also(worker_index, worker_count)
    if os.getppid() != parent_pid:  # The run died while this worker started.
        os._exit(0)
    tag_shared_memory(parent_pid)
    threading.Thread(target=_watch, args=(parent_pid,), name="parent-watch", daemon=True).start()


def _watch(parent_pid: int) -> None:
    while True:
        time.sleep(WATCH_INTERVAL_SECS)
        if os.getppid() != parent_pid:
            # Nobody reads this worker's batches any more. Its shared memory is still
            # registered with the resource tracker, which removes it once the last worker
            # has closed the tracker's pipe, i.e. now.
            os._exit(0)


def tag_shared_memory(parent_pid: int) -> None:
    """New shared-memory blocks of this process carry the run's tag (see the module
    docstring); unchanged where the standard library offers no hook."""
    from multiprocessing import shared_memory

    tag = run_tag(parent_pid)
    if tag is None or not hasattr(shared_memory, "_make_filename"):
        return
    prefix = "/" if getattr(shared_memory, "_USE_POSIX", False) else ""
    shared_memory._make_filename = lambda: f"{prefix}{SHM_PREFIX}{tag}_{secrets.token_hex(4)}"


# ----------------------------------------------------------------------------- later runs


_swept = False


def remove_orphaned_shared_memory(shm_dir: str = SHM_DIR) -> int:
    """Removes tagged blocks whose run is provably gone; returns how many. Once per
    process (later calls return 0)."""
    global _swept
    if _swept or not os.path.isdir(shm_dir):
        return 0
    _swept = True
    namespace = _pid_namespace()
    removed, freed = 0, 0
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return 0
    for name in names:
        owner = _owner(name)
        if owner is None or owner[0] != namespace or _alive(owner[1], owner[2]):
            continue
        path = os.path.join(shm_dir, name)
        try:
            size = os.path.getsize(path)
            os.remove(path)
        except OSError:  # Another user's, or removed meanwhile.
            continue
        removed, freed = removed + 1, freed + size
    if removed:
        logging.warning(
            "removed %d shared-memory blocks (%.1f MB) in %s left by decode workers of runs that "
            "were killed", removed, freed / 1e6, shm_dir)
    return removed


def _owner(name: str) -> tuple[int, int, int] | None:
    """(pid namespace, pid, start time) from a tagged block's name, or None."""
    if not name.startswith(SHM_PREFIX):
        return None
    fields = name[len(SHM_PREFIX):].split("_")
    if len(fields) != 4:
        return None
    try:
        return int(fields[0], 16), int(fields[1]), int(fields[2])
    except ValueError:
        return None
