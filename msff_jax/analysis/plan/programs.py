"""The programs a run would run, lowered for compile-only GPU devices from abstract inputs.

`train_step` and `eval_step` are built by `msff_jax.train.steps` exactly as training
builds them (the config's model, dtype, speed options, optimizer, accumulation), over a
mesh of the target's devices with training's shardings; `export` is the function
`--mode export` serialises (uint8 images to logits and probabilities, normalisation
included), on one device. Inputs are `jax.ShapeDtypeStruct`s, so nothing is allocated;
each program can be lowered at any global batch size, which is how the largest batch
that fits is found.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from msff_jax.console import UserError
from msff_jax.analysis.plan.targets import GpuTarget, target_config_text
from msff_jax.train import class_weights
from msff_jax.train import mesh as mesh_lib
from msff_jax.train import optimizers
from msff_jax.train import state as train_state
from msff_jax.train import steps

PROGRAMS = ("train_step", "eval_step", "export")
DEVICES_PER_HOST = 8
# The schedule's run length changes constants, not the program.
_NOMINAL_STEPS_PER_EPOCH = 1000


class PluginMissing(UserError):
    """No JAX CUDA plugin to compile with; the message says what to install."""


@dataclasses.dataclass
class Program:
    name: str
    batch_size: int  # Global batch of the config.
    batch_unit: int  # Global batches must be multiples of this.
    num_devices: int  # Devices the program is sharded over.
    lower: Callable[[int], "jax.stages.Lowered"]  # Lowered at a global batch size.


def compile_only_devices(target: GpuTarget, num_devices: int) -> list:
    """`num_devices` devices of `target` that XLA compiles for but nothing runs on."""
    from msff_jax import cuda_plugin

    if num_devices < 1 or (num_devices > DEVICES_PER_HOST and num_devices % DEVICES_PER_HOST):
        raise UserError(f"config.plan.num_devices={num_devices} must be 1-{DEVICES_PER_HOST} "
                        f"(one host) or a multiple of {DEVICES_PER_HOST} (hosts of "
                        f"{DEVICES_PER_HOST} GPUs).")
    if cuda_plugin.installed_plugin() is None:
        raise PluginMissing("--mode plan compiles for the GPU with JAX's CUDA compiler plugin, "
                            f"which is not installed: {cuda_plugin.install_advice()}")
    from jax.experimental import topologies

    hosts = max(1, num_devices // DEVICES_PER_HOST)
    per_host = num_devices // hosts
    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=target_config_text(target),
            topology=f"1x{hosts}x{per_host}")
    except Exception as err:  # The plugin is there but did not load or refuses the target.
        message = " ".join(str(err).split())[:300]
        raise PluginMissing(
            f"JAX's CUDA plugin cannot describe {num_devices} x {target.name} "
            f"({type(err).__name__}: {message}); check that the plugin matches JAX: "
            f"{cuda_plugin.install_advice()}") from err
    return list(topology.devices)


def _batch(config, batch_size: int, sharding, *, with_mask: bool) -> dict:
    size = config.image_size
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8, sharding=sharding),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding),
    }
    if with_mask:
        batch["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.bool_, sharding=sharding)
    return batch


def _with_batch(config, batch_size: int):
    config = config.copy_and_resolve_references()
    config.batch_size = batch_size
    return config


def build_programs(config, devices: list, names=PROGRAMS) -> list[Program]:
    """The programs `names` of `config`'s run, over `devices`."""
    mesh = mesh_lib.make_mesh(config.mesh_shape, devices)
    data_devices = mesh.shape["data"]
    model = train_state.build_model(config)
    tx = optimizers.make_optimizer(config, _NOMINAL_STEPS_PER_EPOCH)
    abstract_state = train_state.abstract_train_state(config, model, tx, mesh,
                                                      jax.random.PRNGKey(0))
    sharding = mesh_lib.batch_sharding(mesh)
    programs = []

    if "train_step" in names:
        def lower_train(batch_size: int):
            sized = _with_batch(config, batch_size)
            step = steps.make_train_step(sized, model, tx, mesh, class_weights.stand_in(config))
            return step.lower(abstract_state, _batch(sized, batch_size, sharding, with_mask=False))

        programs.append(Program("train_step", config.batch_size,
                                data_devices * int(config.grad_accum_steps), mesh.size,
                                lower_train))

    if "eval_step" in names:
        eval_step = steps.make_eval_step(config, model, mesh)
        variables = abstract_state.eval_variables()

        def lower_eval(batch_size: int):
            return eval_step.lower(variables, _batch(config, batch_size, sharding, with_mask=True))

        programs.append(Program("eval_step", config.eval_batch_size, data_devices, mesh.size,
                                lower_eval))

    if "export" in names:
        programs.append(_export_program(config, model, abstract_state, devices[0],
                                        max(1, config.eval_batch_size // data_devices)))
    return programs


def _export_program(config, model, abstract_state, device, batch_size: int) -> Program:
    """The exported inference function on one device; variables are arguments here (the
    artifact closes over them as constants: the same buffers, the same kernels)."""
    from jax.sharding import SingleDeviceSharding

    from msff_jax.inference.export import make_inference_fn

    one = SingleDeviceSharding(device)
    variables = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=one),
                             abstract_state.eval_variables())
    dtype = train_state.compute_dtype(config)

    def infer(variables, images_uint8):
        return make_inference_fn(model, variables, config.mean_rgb, config.stddev_rgb, dtype)(
            images_uint8)

    jitted = jax.jit(infer)

    def lower_export(batch: int):
        size = config.image_size
        images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8, sharding=one)
        return jitted.lower(variables, images)

    return Program("export", batch_size, 1, 1, lower_export)
