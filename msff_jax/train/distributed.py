"""Several processes (hosts) in one JAX program.

`initialize` must run before anything touches a JAX device. After it, `jax.devices()`
lists the devices of every process, the mesh spans them all, and the jitted step is one
SPMD program; each process feeds only its own slice of every global batch.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

import jax
import numpy as np
from absl import logging


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins the processes into one JAX program, or does nothing for a single process.

    - Flags given (`--coordinator_address host:port --num_processes N --process_id i`):
      uses them; every process runs the same command with its own id.
    - In a SLURM job step of several tasks (`srun`): JAX reads the coordinator, process
      count and id from SLURM's environment.
    - Otherwise: one process. That includes a batch script or `salloc` shell of an
      allocation with several tasks, which holds one process until `srun` starts the
      rest; a warning says so.
    """
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id too.")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes}).")
    elif not _in_a_slurm_step_of_several_tasks():
        return
    # Cross-process collectives between CPU devices need an implementation; it only
    # affects the CPU backend, so GPU runs are unchanged.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    logging.info("process %d of %d, %d local of %d devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def _slurm_count(name: str) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else 1


def _in_a_slurm_step_of_several_tasks() -> bool:
    """True inside `srun` with more than one task: SLURM then sets the step variables
    (SLURM_STEP_NODELIST among them) that JAX's SLURM detection reads."""
    if "SLURM_JOB_ID" not in os.environ:
        return False
    if "SLURM_STEP_NODELIST" in os.environ:
        return _slurm_count("SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in os.environ
                            else "SLURM_NTASKS") > 1
    tasks = _slurm_count("SLURM_NTASKS")
    if tasks > 1:
        logging.warning("SLURM allocation of %d tasks, but this is not an srun step: running as "
                        "one process. Start it with `srun python launch.py ...` to run %d "
                        "processes.", tasks, tasks)
    return False


def is_primary() -> bool:
    """Process 0 writes logs, summaries and files; checkpoints are written by all."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier of this name (a collective)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def joined_process() -> tuple[int, int]:
    """(this process's index, process count) as `initialize` set them, (0, 1) when it
    joined nothing. Starts no backend, so code that may also run outside a training
    process (the study driver making demo data) can ask."""
    from jax._src import distributed as jax_distributed  # The runtime's own record.

    state = jax_distributed.global_state
    if state.client is None:
        return 0, 1
    return state.process_id, state.num_processes


def from_primary(key: str, text: str | None, *, timeout_secs: float) -> str:
    """Process 0's `text` on every process (`text` is ignored elsewhere).

    Goes through jax.distributed's key-value store rather than a device collective: no
    compilation, and a timeout of our choosing, so process 0 may take minutes (waiting
    for a lock, making data) before it answers. Call it once per `key` on every process.
    """
    index, count = joined_process()
    if count == 1:
        return text
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    key = f"msff_jax/{key}"
    if index == 0:
        client.key_value_set(key, text)
        return text
    try:
        return client.blocking_key_value_get(key, int(timeout_secs * 1000))
    except Exception as err:  # The runtime reports a timeout as its own error type.
        raise TimeoutError(f"process 0 did not report {key!r} within {timeout_secs:.0f} s "
                           f"(its log says why): {err}") from err


class PrimaryFailure(NamedTuple):
    """How `on_primary`'s work failed on process 0: the exception's type name and text."""

    kind: str
    message: str


def on_primary(key: str, work: Callable[[], None], *, timeout_secs: float) -> PrimaryFailure | None:
    """Runs `work` on process 0 alone and tells every process how it ended.

    Process 0 re-raises its own exception after telling the others; they get the
    failure (None when `work` returned) and raise an error of their own that says it
    was process 0's, so all processes stop with the same message instead of the others
    waiting out a timeout. Call it once per `key` on every process."""
    if joined_process()[0] == 0:
        try:
            work()
        except Exception as err:
            from_primary(key, f"failed:{type(err).__name__}:{err}", timeout_secs=0)
            raise
        from_primary(key, "done", timeout_secs=0)
        return None
    outcome = from_primary(key, None, timeout_secs=timeout_secs)
    if outcome == "done":
        return None
    kind, _, message = outcome.removeprefix("failed:").partition(":")
    return PrimaryFailure(kind, message)


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any (a collective: call it everywhere
    at the same step)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
    return bool(np.asarray(flags).any())
