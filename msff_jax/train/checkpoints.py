"""Orbax checkpoints of the train state and the data iterator's position.

One `CheckpointManager` under WORKDIR/checkpoints keeps the latest `keep` checkpoints
plus the best one by validation macro-F1. Each checkpoint holds two items:

- 'state': the whole `TrainState` (parameters, BatchNorm statistics, optimizer state,
  EMA, step, RNG, loss scale);
- 'data_iter': the grain iterator's state, one JSON file per process (each process
  reads its own slice of the data), written by grain's Orbax handler.

Orbax writes a checkpoint into a temporary directory and renames it only once every
process has finished, so a checkpoint interrupted mid-write (SIGKILL, lost node) is never
listed, let alone restored.

A machine crash or a partial copy can still leave a listed step with a file missing or
cut short. Orbax lists such a step and fails deep inside TensorStore when restoring it
(or, without the tree metadata, reads it as a tree of another shape), so every committed
step gets a list of its files and their sizes (`checkpoint_files`), checked before a
restore. Resuming (`restore_latest_intact`) tries the steps newest first, moves each
damaged one aside to WORKDIR/checkpoints_damaged/ with a warning naming it (nothing is
ever deleted), and stops with a clear error when none restores; it never starts from
scratch while checkpoints exist.

A save that fails (a full disk, a read-only or unwritable checkpoints/, an I/O error, a
handler that raises) raises `CheckpointWriteError` naming the step, the path and the
cause: at once when the synchronous part fails (the step directory is created before
`save` returns, not in the background, where Orbax would wait minutes for it), and from
the asynchronous part at the first `check_saves` after it failed, which the training
loop calls every step. The earlier checkpoints are untouched and a rerun resumes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import weakref

import grain
import jax
from absl import logging
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_manager as orbax_checkpoint_manager
from orbax.checkpoint import checkpoint_managers

from msff_jax import console
from msff_jax.train import checkpoint_files
from msff_jax.train.checkpoint_files import DamagedCheckpointError

STATE_ITEM = "state"
DATA_ITER_ITEM = "data_iter"
BEST_METRIC = "val_macro_f1"
# Where Orbax keeps a checkpoint's metrics (STEP/metrics/metrics).
METRICS_ITEM = orbax_checkpoint_manager.METRIC_ITEM_NAME


# Where damaged steps are moved: beside checkpoints/, so Orbax neither lists nor deletes them.
DAMAGED_DIR = "checkpoints_damaged"


class CheckpointWriteError(console.UserError, OSError):
    """A checkpoint could not be written; the message names the step, path and cause."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def saved_steps(workdir: str) -> list[int]:
    """The step directories under WORKDIR/checkpoints, without starting Orbax."""
    return _step_dirs(checkpoint_dir(workdir))


def _exception_chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= 400 else text[:400] + "..."


# TensorStore's status codes for data that is absent or not what its metadata says.
_DAMAGE_CODES = re.compile(r"\b(NOT_FOUND|OUT_OF_RANGE|DATA_LOSS|FAILED_PRECONDITION)\b")


def _damage_reason(err: BaseException) -> str | None:
    """Why `err` shows a damaged checkpoint (a file missing, short or unreadable), or
    None for anything else: a model or config that does not match the checkpoint, or
    running out of memory, must not make resume skip a good checkpoint."""
    for e in _exception_chain(err):
        if isinstance(e, DamagedCheckpointError):
            return str(e)
        if isinstance(e, (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, EOFError,
                          UnicodeDecodeError)):
            return f"{type(e).__name__}: {_short(e)}"
        if isinstance(e, KeyError) and "was not found in the checkpoint" in str(e):
            return _short(e).strip("'\"")
        if _DAMAGE_CODES.search(str(e)):
            return _short(e)
    return None


_OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_CAUSES = [
    (_OUT_OF_SPACE, ("No space left on device", "Disk quota exceeded", "File too large"),
     "the disk is full (or the quota or file-size limit is reached)", "free some space"),
    ({errno.EROFS}, ("Read-only file system",), "the file system is read-only",
     "make it writable"),
    ({errno.EACCES, errno.EPERM}, ("Permission denied", "PERMISSION_DENIED"),
     "permission denied", "make it writable for this user"),
]


def _cause(err: BaseException) -> tuple[str, str, str | None]:
    """(what went wrong, what to do, the path it happened at) for a failed save.

    Orbax raises Python's OSError for what it writes itself and TensorStore's error text
    (`os_error_code=N`, `Failed writing: "PATH"`) for the arrays."""
    codes, texts, path = set(), [], None
    for e in _exception_chain(err):
        texts.append(str(e))
        if isinstance(e, OSError) and e.errno is not None:
            codes.add(e.errno)
            path = path or (e.filename and str(e.filename))
        code = re.search(r"os_error_code='?(\d+)", str(e))
        if code:
            codes.add(int(code.group(1)))
        written = re.search(r'(?:Failed writing|Error writing[^"]*at local file): "([^"]+)"', str(e))
        path = path or (written and written.group(1))
    for numbers, words, what, remedy in _CAUSES:
        if codes & numbers or any(w in t for w in words for t in texts):
            return what, remedy, path
    if codes:
        code = min(codes)
        return (f"an I/O error ({errno.errorcode.get(code, code)}: {os.strerror(code)})",
                "fix the storage", path)
    return f"{type(err).__name__}: {_short(err)}", "fix the cause", path


def _write_error(manager: ocp.CheckpointManager, err: BaseException,
                 step: int | None = None) -> CheckpointWriteError:
    directory = str(manager.directory)
    if step is None:
        failed = re.search(r"/(\d+)\.orbax-checkpoint-tmp", str(err))
        step = int(failed.group(1)) if failed else None
    which = f"step {step}" if step is not None else "a checkpoint"
    what, remedy, path = _cause(err)
    kept = [s for s in _step_dirs(directory) if s != step]  # On disk: Orbax's own list may omit rotated steps.
    return CheckpointWriteError(
        f"saving {which} under {directory} failed: {what}"
        f"{f' at {path}' if path else ''}: {_short(err)}. The checkpoints already written "
        f"({', '.join(map(str, kept)) or 'none'}) are intact and the unfinished one is never "
        f"restored; {remedy} and rerun the same command to resume.")


def _step_dirs(directory: str) -> list[int]:
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def _set_aside(directory: str, step: int) -> str:
    """Moves step directory `step` to WORKDIR/checkpoints_damaged/ (never deletes it)."""
    root = os.path.join(os.path.dirname(directory), DAMAGED_DIR)
    os.makedirs(root, exist_ok=True)
    target, n = os.path.join(root, str(step)), 0
    while os.path.exists(target):
        n += 1
        target = os.path.join(root, f"{step}-{n}")
    os.rename(os.path.join(directory, str(step)), target)
    return target


def _unreadable_metrics(directory: str) -> dict[int, str]:
    """Steps whose STEP/metrics/metrics is not JSON: Orbax reads them all when the manager
    starts and fails with a bare JSONDecodeError naming no file."""
    damaged = {}
    for step in _step_dirs(directory):
        path = os.path.join(directory, str(step), METRICS_ITEM, METRICS_ITEM)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    json.load(f)
            except (OSError, ValueError) as err:
                damaged[step] = f"{path}: unreadable metrics ({_short(err)})"
    return damaged


def _best_metric(metrics) -> float:
    return float(metrics[BEST_METRIC])


def make_manager(workdir: str, config, *, read_only: bool = False) -> ocp.CheckpointManager:
    """Keeps the latest `checkpoint.keep` plus the best by `val_macro_f1`. The training
    loop decides when to save (every `checkpoint.every_steps` steps, at evaluations, on
    preemption) and always forces the save, so the manager has no interval of its own.

    A step whose metrics file is unreadable (a machine crash) is moved aside with a
    warning when training (`read_only=False`); reading (eval, export) stops with an error
    naming it.
    """
    from msff_jax.train import distributed

    directory = checkpoint_dir(workdir)
    damaged = _unreadable_metrics(directory)
    if damaged and read_only:
        raise DamagedCheckpointError(
            "; ".join(damaged.values()) + ". The checkpoint is damaged: move its step directory "
            f"out of {directory} (training does so itself, to {DAMAGED_DIR}/) and choose another.")
    if damaged:
        distributed.barrier("checkpoint metrics checked")
        if distributed.is_primary():
            for step, reason in damaged.items():
                logging.warning("checkpoint %s/%d is damaged (%s); moved to %s", directory, step,
                                reason, _set_aside(directory, step))
        distributed.barrier("damaged checkpoints moved aside")
    preservation = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=max(1, int(config.checkpoint.keep))),
        checkpoint_managers.BestN(get_metric_fn=_best_metric, reverse=False, n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=None if read_only else preservation,
        best_fn=_best_metric,
        best_mode="max",
        enable_async_checkpointing=bool(config.checkpoint.asynchronous) and not read_only,
        # The step directory is made before `save` returns, so a checkpoints/ that cannot
        # be written fails there; made in the background, Orbax's writers would wait for it
        # for minutes (ignoring SIGTERM) before failing with a timeout naming nothing.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), item_names=(STATE_ITEM, DATA_ITER_ITEM),
                                 options=options)


class _FrozenIteratorState:
    """The iterator's state captured when `save` is called, in the form grain's handler
    writes for non-`DatasetIterator` items (`get_state()` returning JSON bytes).

    Capturing it up front means an asynchronous save can never record a position the
    training loop reached after the step being saved.
    """

    def __init__(self, state: dict):
        self._state = json.dumps(state, indent=2).encode()

    def get_state(self) -> bytes:
        return self._state


# Per manager, the step of the asynchronous save started last and not yet seen to end.
_pending_steps: "weakref.WeakKeyDictionary[ocp.CheckpointManager, int]" = weakref.WeakKeyDictionary()


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, *,
         metrics: dict | None = None, force: bool = False) -> bool:
    """Collective on every process. Returns whether a checkpoint was started. A save that
    fails (this one's synchronous part, or the previous one's asynchronous part) raises
    `CheckpointWriteError`."""
    args = ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardSave(state),
        DATA_ITER_ITEM: grain.checkpoint.CheckpointSave(_FrozenIteratorState(data_iterator.get_state())),
    })
    wait_until_finished(manager)  # The previous save's failure is named as its own.
    if force and step in manager.all_steps():
        return False  # Already saved at this step (e.g. periodic save, then the final one).
    try:
        started = manager.save(step, args=args, metrics=metrics, force=force)
    except Exception as err:
        raise _write_error(manager, err, step) from err
    if started:
        _pending_steps[manager] = step
        if not manager.is_saving_in_progress():  # Synchronous: committed already.
            wait_until_finished(manager)
    return started


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
    """Waits for a pending asynchronous save and lists the files of the step it wrote;
    a save that failed raises `CheckpointWriteError`."""
    step = _pending_steps.pop(manager, None)
    try:
        manager.wait_until_finished()
    except Exception as err:
        raise _write_error(manager, err, step) from err
    if step is not None:
        from msff_jax.train import distributed

        if distributed.is_primary() and os.path.isdir(os.path.join(str(manager.directory), str(step))):
            checkpoint_files.record(os.path.join(str(manager.directory), str(step)))


def check_saves(manager: ocp.CheckpointManager) -> None:
    """Raises `CheckpointWriteError` if the pending asynchronous save has failed; cheap
    while it is still running or when there is none. The training loop calls it every
    step, so a save failing in the background stops the run within a step of it.

    With several processes it is a collective (call it at the same step everywhere): a
    failure one process sees stops them all. There Orbax itself may only see the failure
    once its cross-process barrier gives up."""
    failed = None
    if manager in _pending_steps and not manager.is_saving_in_progress():
        try:
            wait_until_finished(manager)
        except CheckpointWriteError as err:
            failed = err
    if jax.process_count() > 1:
        from msff_jax.train import distributed

        if distributed.any_process(failed is not None) and failed is None:
            failed = CheckpointWriteError(f"saving a checkpoint under {manager.directory} failed "
                                          "on another process (its log names the step and cause)")
    if failed is not None:
        raise failed


def add_metrics(manager: ocp.CheckpointManager, step: int, metrics: dict) -> None:
    """Records `metrics` for the committed checkpoint `step`, which was saved without
    them (a preemption on an evaluation step saves first and evaluates never).

    Collective on every process. Orbax keeps a checkpoint's metrics as JSON in
    STEP/metrics/metrics and reads them back when it lists checkpoints; process 0 writes
    that file atomically, then every process reloads the list, so the best-checkpoint
    choice and its preservation see the step like any other evaluated one.
    """
    from msff_jax.train import distributed

    if distributed.is_primary():
        directory = os.path.join(str(manager.directory), str(step), METRICS_ITEM)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, METRICS_ITEM)
        with open(path + ".tmp", "w") as f:
            json.dump(metrics, f)
        os.replace(path + ".tmp", path)
        checkpoint_files.update(os.path.dirname(directory), f"{METRICS_ITEM}/{METRICS_ITEM}")
    distributed.barrier(f"metrics of step {step} written")
    manager.reload()
    if manager.metrics(step) != metrics:
        raise RuntimeError(f"{manager.directory}/{step}: the metrics just written do not read "
                           "back; this Orbax keeps them elsewhere.")


def _read_position(path: str) -> dict:
    try:
        with open(path) as f:
            position = json.load(f)
    except (OSError, ValueError) as err:
        raise DamagedCheckpointError(f"{path}: unreadable data-iterator position ({err})") from err
    if not isinstance(position, dict) or "next_batch" not in position:
        raise DamagedCheckpointError(f"{path}: the data-iterator position lacks 'next_batch'")
    return position


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator=None):
    """Restores the state into the shardings of `abstract_state`, and the iterator's
    position into `data_iterator` (unless None).

    A step directory with a file missing, cut short or unreadable raises
    `DamagedCheckpointError` naming it; any other failure (a model that does not match
    the checkpoint, memory) propagates unchanged.
    """
    try:
        checkpoint_files.check_step(os.path.join(str(manager.directory), str(step)))
    except DamagedCheckpointError as err:
        raise DamagedCheckpointError(f"{manager.directory}/{step}: the checkpoint is damaged: "
                                     f"{err}") from err
    position = None if data_iterator is None else saved_iterator_state(manager, step)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))
    except Exception as err:
        reason = _damage_reason(err)
        if reason is None:
            raise
        raise DamagedCheckpointError(
            f"{manager.directory}/{step}: the checkpoint is damaged (a file missing, cut short or "
            f"unreadable): {reason}") from err
    if data_iterator is not None:
        data_iterator.set_state(position)
    return restored[STATE_ITEM]


def restore_latest_intact(manager: ocp.CheckpointManager, abstract_state, data_iterator=None):
    """(step, state) of the newest checkpoint that restores, or (None, None) when there
    is no checkpoint at all: resuming after a crash of the machine.

    Each damaged step tried on the way (newer than the one restored) is named in a
    warning and moved to WORKDIR/checkpoints_damaged/, so that the resumed run can save
    that step again and the damaged copy is neither listed, chosen as the best, nor
    counted among the kept ones. Nothing is deleted. When every step is damaged this
    raises `DamagedCheckpointError` listing them and moves nothing: training never starts
    from scratch over existing checkpoints.
    """
    from msff_jax.train import distributed

    directory = str(manager.directory)
    damaged = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state = restore(manager, step, abstract_state, data_iterator)
        except DamagedCheckpointError as err:
            logging.warning("checkpoint %s/%d cannot be restored, trying the next older one: %s",
                            directory, step, err)
            damaged.append(str(err))
            continue
        if damaged:
            distributed.barrier(f"checkpoint {step} restored")
            if distributed.is_primary():
                for bad in sorted(set(manager.all_steps()) - set(range(step + 1))):
                    logging.warning("moved the damaged checkpoint %s/%d to %s", directory, bad,
                                    _set_aside(directory, bad))
            distributed.barrier("damaged checkpoints moved aside")
            manager.reload()
        return step, state
    if damaged:
        raise DamagedCheckpointError(
            f"no checkpoint under {directory} can be restored: {'; '.join(damaged)}. Nothing was "
            "moved or deleted. Training does not start from scratch while checkpoints exist: "
            f"repair them, or move {directory} away to train afresh.")
    return None, None


def saved_iterator_state(manager: ocp.CheckpointManager, step: int) -> dict:
    """The data position saved at `step`, whatever number of processes saved it.

    Grain's handler writes one `process_{i}-of-{n}.json` per process. The position is
    global (the number of global batches consumed, see `data_pipeline.records.reader`), so every
    process wrote the same one, and a run may resume on another number of hosts: this
    process reads its own file when there is one, else any, after checking they agree.
    """
    directory = os.path.join(str(manager.directory), str(step), DATA_ITER_ITEM)
    own = os.path.join(directory, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    if os.path.isfile(own):  # The usual case: same number of processes.
        return _read_position(own)
    names = sorted(n for n in os.listdir(directory) if n.startswith("process_") and n.endswith(".json")) \
        if os.path.isdir(directory) else []
    if not names:
        raise DamagedCheckpointError(f"{directory} holds no data-iterator position "
                                     "(process_*-of-*.json); the checkpoint is incomplete.")
    states = {name: _read_position(os.path.join(directory, name)) for name in names}
    first = next(iter(states.values()))
    differing = [name for name, state in states.items() if state != first]
    if differing:
        raise ValueError(f"{directory}: the processes saved different data positions "
                         f"({names[0]} and {differing[0]}); cannot resume on "
                         f"{jax.process_count()} processes.")
    return first


def restore_for_inference(config, workdir: str, which: str = "best", mesh=None):
    """(variables, step) for inference: `{'params', 'batch_stats'}`, with the EMA
    parameters in 'params' when the run kept an EMA.

    `which='best'` is the checkpoint with the highest validation macro-F1 (the latest if
    none was evaluated yet); `'latest'` the most recent. Arrays land replicated on `mesh`
    (default: this process's devices), whatever machine wrote them.
    """
    from msff_jax.train import mesh as mesh_lib
    from msff_jax.train import optimizers
    from msff_jax.train import state as train_state_lib

    if which not in ("best", "latest"):
        raise ValueError(f"which={which!r}; use 'best' or 'latest'.")
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints under {directory}; train first "
                                f"(python launch.py --config ... --workdir {workdir}).")
    manager = make_manager(workdir, config, read_only=True)
    step = manager.best_step() if which == "best" else None
    if step is None:
        step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{directory} holds no finished checkpoint.")
    model = train_state_lib.build_model(config)
    tx = optimizers.make_optimizer(config, steps_per_epoch=1)  # Only its state's shapes matter.
    mesh = mesh or mesh_lib.make_mesh((-1, 1), devices=jax.local_devices())
    abstract = train_state_lib.abstract_train_state(config, model, tx, mesh, jax.random.PRNGKey(0))
    state = restore(manager, step, abstract)
    manager.close()
    return state.eval_variables(), int(step)
