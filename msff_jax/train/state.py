"""The training state: one pytree that holds everything a resumed run needs.

Parameters, BatchNorm statistics, optimizer state, the EMA of the parameters, the step,
the dropout RNG and the float16 loss scale all live in `TrainState`, so one Orbax item
saves and restores them together and the jitted step is a pure function of (state,
batch).
"""

from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from msff_jax.train import mesh as mesh_lib
# The model and dtype a config names; re-exported because callers reach them here.
from msff_jax.train.config_model import COMPUTE_DTYPES, build_model, compute_dtype  # noqa: F401


@flax.struct.dataclass
class DynamicLossScale:
    """float16 loss scaling: halve on overflow, double after `growth_interval` good steps."""

    scale: jax.Array
    good_steps: jax.Array


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    ema_params: Optional[Any]  # None when config.ema_decay == 0.
    rng: jax.Array  # Fixed; each step folds in its step number.
    loss_scale: Optional[DynamicLossScale]  # None unless dtype == 'float16'.

    def eval_variables(self) -> dict:
        """The variables evaluation uses: EMA parameters when kept, else the parameters."""
        params = self.params if self.ema_params is None else self.ema_params
        return {"params": params, "batch_stats": self.batch_stats}


def _init_fn(config, model, tx):
    def init(rng):
        params_rng, dropout_rng, step_rng = jax.random.split(rng, 3)
        dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
        variables = model.init({"params": params_rng, "dropout": dropout_rng}, dummy, train=False)
        params = variables["params"]
        loss_scale = None
        if config.dtype == "float16":
            loss_scale = DynamicLossScale(
                scale=jnp.asarray(config.loss_scale.initial, jnp.float32),
                good_steps=jnp.zeros((), jnp.int32))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            ema_params=jax.tree.map(jnp.copy, params) if config.ema_decay > 0 else None,
            rng=step_rng,
            loss_scale=loss_scale,
        )

    return init


def state_shardings(abstract_state, mesh: Mesh):
    """Every leaf replicated: data parallelism. The one place to shard parameters later."""
    return jax.tree.map(lambda _: mesh_lib.replicated(mesh), abstract_state)


def abstract_train_state(config, model, tx, mesh: Mesh, rng):
    """Shapes, dtypes and shardings of the state, without computing it (for restore)."""
    abstract = jax.eval_shape(_init_fn(config, model, tx), rng)
    shardings = state_shardings(abstract, mesh)
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract, shardings)


def create_train_state(config, model, tx, mesh: Mesh, rng, abstract_state=None) -> TrainState:
    """Initialises the state directly into its shardings (no host copy, no device 0 spike).

    Pass the run's `abstract_train_state` to skip tracing the initialiser a second time.
    """
    if abstract_state is None:
        abstract_state = abstract_train_state(config, model, tx, mesh, rng)
    shardings = jax.tree.map(lambda leaf: leaf.sharding, abstract_state)
    return jax.jit(_init_fn(config, model, tx), out_shardings=shardings)(rng)


def with_pretrained(state: TrainState, variables: dict, mesh: Mesh) -> TrainState:
    """Puts loaded weights into a fresh state (EMA starts from them too).

    Optimizer moments of SGD and AdamW start at zero and do not depend on the parameter
    values, so the fresh `opt_state` stays valid.
    """
    put = lambda tree: jax.device_put(tree, mesh_lib.replicated(mesh))
    params = put(variables["params"])
    return state.replace(
        params=params,
        batch_stats=put(variables.get("batch_stats", state.batch_stats)),
        ema_params=None if state.ema_params is None else put(variables["params"]),
    )
