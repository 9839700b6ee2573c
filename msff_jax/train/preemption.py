"""SIGTERM as a request to save and stop, from the first moment of the process.

Schedulers (SLURM, Kubernetes, container stops) usually send SIGTERM to the whole
process group, so the decode workers get it too. They must survive it (the trainer still
needs them until it has saved), from the moment they are born: a worker that dies of it
makes the trainer's next batch raise. So `install()`, called before any thread or worker
process exists, blocks SIGTERM in the main thread; every thread created afterwards, and
every process those threads start, inherits the block, and one watcher thread takes the
signal with `sigtimedwait` and sets a flag. Nothing is interrupted: the training loop reads
the flag at points where stopping is safe, saves, and exits 0. A second SIGTERM only sets
the flag again, so it cannot interrupt the save.

`MSFF_TEST_SIGTERM` is a test hook (see `signal_point`); unset, it costs a dict lookup.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from absl import logging

# The environment variable the tests and benchmarks/preemption_soak.py use to make a run
# signal itself at a named point (see `signal_point`).
TEST_HOOK_ENV = "MSFF_TEST_SIGTERM"


class _Listener:
    def __init__(self):
        self.event = threading.Event()
        self.count = 0
        self.phase = "start-up"
        self._stop = threading.Event()
        self._previous_handler = None
        self._previous_mask = None
        self._thread = None

    def _on_signal(self, where: str) -> None:
        self.count += 1
        first = not self.event.is_set()
        self.event.set()
        logging.warning("SIGTERM received (%s) during %s: %s", where, self.phase,
                        "saving what is due and stopping" if first else "already stopping")

    def _watch(self) -> None:
        while not self._stop.is_set():
            if signal.sigtimedwait([signal.SIGTERM], 0.25) is not None:
                self._on_signal("watcher")

    def start(self) -> None:
        # The multiprocessing resource tracker unblocks SIGTERM in whichever thread first
        # starts it; started now, before the block, it never does so again.
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        # For a thread that existed before the block (only where install() came late): the
        # signal lands there, and this handler, run by the main thread, sets the flag.
        self._previous_handler = signal.signal(signal.SIGTERM, lambda *_: self._on_signal("handler"))
        self._previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
        self._thread = threading.Thread(target=self._watch, name="sigterm-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        signal.signal(signal.SIGTERM, self._previous_handler or signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, self._previous_mask)


_listener: _Listener | None = None


def install() -> None:
    """Turns SIGTERM into the stop flag for the rest of the process (or until
    `uninstall`). Call it from the main thread before anything starts threads or
    processes (msff_jax.main does it first thing); calling it again does nothing."""
    global _listener
    if _listener is None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("preemption.install() must run in the main thread")
        listener = _Listener()
        listener.start()
        _listener = listener


def uninstall(*, resend: bool = False) -> None:
    """Gives SIGTERM back its previous meaning (modes other than training: a SIGTERM
    stops them at once, as usual). With `resend`, a SIGTERM taken while installed is
    delivered again under that meaning."""
    global _listener
    if _listener is None:
        return
    listener, _listener = _listener, None
    listener.stop()
    if resend and listener.event.is_set():
        signal.raise_signal(signal.SIGTERM)


@contextlib.contextmanager
def listening():
    """Installed for the block, unless it already was (then left as it is)."""
    if _listener is not None:
        yield
        return
    install()
    try:
        yield
    finally:
        uninstall()


def requested() -> bool:
    """Whether a SIGTERM has come (since `install`)."""
    return _listener is not None and _listener.event.is_set()


def set_phase(phase: str) -> None:
    """What the process is doing, for the log line a SIGTERM writes."""
    if _listener is not None:
        _listener.phase = phase


# ------------------------------------------------------------------------- test hook

_fired: set = set()


def _hook_entries():
    for number, entry in enumerate(filter(None, os.environ.get(TEST_HOOK_ENV, "").split(","))):
        fields = (entry.split(":") + ["", "", ""])[:4]
        name, index, target, delay = fields
        if target not in ("", "group", "self"):
            raise ValueError(f"{TEST_HOOK_ENV}={os.environ[TEST_HOOK_ENV]!r}: entry {entry!r}: target "
                             f"must be 'group' or 'self', got {target!r}")
        yield number, name, (int(index) if index else None), target or "group", float(delay or 0)


def signal_point(phase: str, index: int | None = None) -> None:
    """Test hook: sends SIGTERM where `MSFF_TEST_SIGTERM` names this point.

    The variable holds comma-separated entries `PHASE[:INDEX[:TARGET[:DELAY]]]`: at the
    point `PHASE` (with `INDEX`, a step number, when given), SIGTERM goes to the process
    group (`group`, default; the run must lead its own group, e.g. started with setsid)
    or to this process only (`self`), after `DELAY` seconds in a timer thread (so it can
    land while the main thread is busy, e.g. while decode workers start). Each entry
    fires once; two equal entries send two signals.
    """
    if TEST_HOOK_ENV not in os.environ:
        return
    for number, name, wanted, target, delay in _hook_entries():
        if name != phase or number in _fired or (wanted is not None and wanted != index):
            continue
        if target == "group" and os.getpgrp() != os.getpid():
            raise RuntimeError(f"{TEST_HOOK_ENV}: signalling the process group needs a run that "
                               "leads its own group (start it with setsid / start_new_session)")
        _fired.add(number)
        send = (lambda: os.killpg(os.getpgrp(), signal.SIGTERM)) if target == "group" else \
            (lambda: os.kill(os.getpid(), signal.SIGTERM))
        logging.warning("test hook %s: SIGTERM to the %s at %s%s%s", TEST_HOOK_ENV,
                        "process group" if target == "group" else "main process", phase,
                        "" if index is None else f" {index}", f" after {delay} s" if delay else "")
        if delay:
            timer = threading.Timer(delay, send)
            timer.daemon = True
            timer.start()
        else:
            seen = _listener.count if _listener is not None else 0
            send()
            # The watcher takes it within milliseconds; waiting makes the stop point exact.
            for _ in range(400):
                if _listener is None or _listener.count > seen:
                    break
                threading.Event().wait(0.025)
