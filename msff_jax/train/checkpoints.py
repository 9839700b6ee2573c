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
"""

from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_manager as orbax_checkpoint_manager
from orbax.checkpoint import checkpoint_managers

STATE_ITEM = "state"
DATA_ITER_ITEM = "data_iter"
BEST_METRIC = "val_macro_f1"
# Where Orbax keeps a checkpoint's metrics (STEP/metrics/metrics).
METRICS_ITEM = orbax_checkpoint_manager.METRIC_ITEM_NAME


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _best_metric(metrics) -> float:
    return float(metrics[BEST_METRIC])


def make_manager(workdir: str, config, *, read_only: bool = False) -> ocp.CheckpointManager:
    """Keeps the latest `checkpoint.keep` plus the best by `val_macro_f1`. The training
    loop decides when to save (every `checkpoint.every_steps` steps, at evaluations, on
    preemption) and always forces the save, so the manager has no interval of its own."""
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


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, *,
         metrics: dict | None = None, force: bool = False) -> bool:
    """Collective on every process. Returns whether a checkpoint was started."""
    args = ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardSave(state),
        DATA_ITER_ITEM: grain.checkpoint.CheckpointSave(_FrozenIteratorState(data_iterator.get_state())),
    })
    if force and step in manager.all_steps():
        return False  # Already saved at this step (e.g. periodic save, then the final one).
    return manager.save(step, args=args, metrics=metrics, force=force)


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
    distributed.barrier(f"metrics of step {step} written")
    manager.reload()
    if manager.metrics(step) != metrics:
        raise RuntimeError(f"{manager.directory}/{step}: the metrics just written do not read "
                           "back; this Orbax keeps them elsewhere.")


def _read_position(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable data-iterator position ({err})") from err


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator=None):
    """Restores the state into the shardings of `abstract_state`, and the iterator's
    position into `data_iterator` (unless None)."""
    restored = manager.restore(step, args=ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))
    if data_iterator is not None:
        data_iterator.set_state(saved_iterator_state(manager, step))
    return restored[STATE_ITEM]


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
        raise FileNotFoundError(f"{directory} holds no data-iterator position "
                                "(process_*-of-*.json); the checkpoint is incomplete.")
    states = {name: _read_position(os.path.join(directory, name)) for name in names}
    first = next(iter(states.values()))
    differing = [name for name, state in states.items() if state != first]
    if differing:
        raise ValueError(f"{directory}: the processes saved different data positions "
                         f"({names[0]} and {differing[0]}); cannot resume on "
                         f"{jax.process_count()} processes.")
    return first


def restore_for_inference(config, workdir: str, which: str = "best"):
    """(variables, step) for inference: `{'params', 'batch_stats'}`, with the EMA
    parameters in 'params' when the run kept an EMA.

    `which='best'` is the checkpoint with the highest validation macro-F1 (the latest if
    none was evaluated yet); `'latest'` the most recent. Arrays land replicated on this
    process's devices, whatever machine wrote them.
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
    mesh = mesh_lib.make_mesh((-1, 1), devices=jax.local_devices())
    abstract = train_state_lib.abstract_train_state(config, model, tx, mesh, jax.random.PRNGKey(0))
    state = restore(manager, step, abstract)
    manager.close()
    return state.eval_variables(), int(step)
