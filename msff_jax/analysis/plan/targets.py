"""The GPUs a plan can be made for: the facts XLA's GPU compiler needs, and the peaks the
plan's lower bound divides by.

XLA compiles for a GPU it cannot see from a `GpuTargetConfigProto`: compute capability,
SM count, shared memory and register limits, memory size and bandwidth, cuDNN version.
We keep one small table of those facts per device and write the proto text from it.
Sources: NVIDIA's datasheets (H100, H200, A100) for SM counts, memory, bandwidth and
dense tensor-core peaks; XLA's device descriptions
(`xla/backends/gpu/target_config/specs/*.txtpb` in openxla/xla) for the byte-exact
memory sizes and per-SM limits the driver reports. jaxlib 0.10 rejects the spec files'
newer `collective_memory_granularity` field, which is one reason they are not read as
they are.

The cuDNN version is the one JAX's CUDA 12 wheels ship with (9.x); it decides which
cuDNN fusions XLA may form, not the arithmetic.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """One GPU model, as the compiler and the plan's estimate see it."""

    name: str  # What users type: --config.plan.device=NAME.
    description: str  # The device kind the driver reports.
    compute_capability: tuple[int, int]
    sm_count: int
    fpus_per_sm: int
    clock_ghz: float
    memory_bytes: int
    memory_bandwidth: float  # Bytes per second (HBM).
    l2_cache_bytes: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    # Dense (no 2:4 sparsity) peaks in FLOP/s: tensor cores for bfloat16/float16 and for
    # float32 convolutions and matmuls (TF32, XLA's default precision on these GPUs).
    peak_flops_16bit: float
    peak_flops_tf32: float
    # One direction of the device-to-device link (NVLink, else PCIe), bytes per second.
    link_bandwidth: float

    @property
    def arch_specific(self) -> bool:
        """Hopper's sm_90a features (wgmma, TMA), which XLA uses when told they exist."""
        return self.compute_capability[0] >= 9


# SXM parts unless the name says otherwise.
TARGETS: dict[str, GpuTarget] = {
    target.name: target
    for target in (
        GpuTarget(
            name="h100", description="NVIDIA H100 80GB HBM3", compute_capability=(9, 0),
            sm_count=132, fpus_per_sm=128, clock_ghz=1.98, memory_bytes=84_942_979_072,
            memory_bandwidth=3.35e12, l2_cache_bytes=52_428_800,
            shared_memory_per_sm=233_472, shared_memory_per_block_optin=232_448,
            peak_flops_16bit=989.4e12, peak_flops_tf32=494.7e12, link_bandwidth=450e9),
        GpuTarget(
            name="h100_pcie", description="NVIDIA H100 PCIe", compute_capability=(9, 0),
            sm_count=114, fpus_per_sm=128, clock_ghz=1.755, memory_bytes=84_942_979_072,
            memory_bandwidth=2.0e12, l2_cache_bytes=52_428_800,
            shared_memory_per_sm=233_472, shared_memory_per_block_optin=232_448,
            peak_flops_16bit=756.5e12, peak_flops_tf32=378e12, link_bandwidth=64e9),
        GpuTarget(
            name="h200", description="NVIDIA H200", compute_capability=(9, 0),
            sm_count=132, fpus_per_sm=128, clock_ghz=1.98, memory_bytes=151_397_597_184,
            memory_bandwidth=4.8e12, l2_cache_bytes=52_428_800,
            shared_memory_per_sm=233_472, shared_memory_per_block_optin=232_448,
            peak_flops_16bit=989.4e12, peak_flops_tf32=494.7e12, link_bandwidth=450e9),
        GpuTarget(
            name="a100", description="NVIDIA A100-SXM4-80GB", compute_capability=(8, 0),
            sm_count=108, fpus_per_sm=64, clock_ghz=1.41, memory_bytes=85_100_068_864,
            memory_bandwidth=2.039e12, l2_cache_bytes=41_943_040,
            shared_memory_per_sm=167_936, shared_memory_per_block_optin=166_912,
            peak_flops_16bit=312e12, peak_flops_tf32=156e12, link_bandwidth=300e9),
        GpuTarget(
            name="a100_40gb", description="NVIDIA A100-SXM4-40GB", compute_capability=(8, 0),
            sm_count=108, fpus_per_sm=64, clock_ghz=1.41, memory_bytes=42_331_013_120,
            memory_bandwidth=1.555e12, l2_cache_bytes=41_943_040,
            shared_memory_per_sm=167_936, shared_memory_per_block_optin=166_912,
            peak_flops_16bit=312e12, peak_flops_tf32=156e12, link_bandwidth=300e9),
    )
}

_CUDNN_VERSION = (9, 10, 0)


def get_target(name: str) -> GpuTarget:
    """The target called `name`; a ValueError listing the known ones otherwise."""
    key = str(name).strip().lower()
    if key not in TARGETS:
        raise ValueError(f"config.plan.device={name!r} is not a known GPU; use one of "
                         f"{', '.join(TARGETS)}.")
    return TARGETS[key]


def target_for_device_kind(device_kind: str) -> GpuTarget | None:
    """The table's entry for a real device's `device_kind` (benchmark mode on a GPU), or
    None for a GPU the table does not know."""
    kind = device_kind.lower()
    if "h200" in kind:
        return TARGETS["h200"]
    if "h100" in kind:
        return TARGETS["h100_pcie" if "pcie" in kind else "h100"]
    if "a100" in kind:
        return TARGETS["a100_40gb" if "40gb" in kind else "a100"]
    return None


def target_config_text(target: GpuTarget) -> str:
    """The `GpuTargetConfigProto` text XLA compiles against for `target`."""
    major, minor = target.compute_capability
    extension = "ACCELERATED_FEATURES" if target.arch_specific else "NONE"
    dnn_major, dnn_minor, dnn_patch = _CUDNN_VERSION
    fields = {
        "threads_per_block_limit": 1024,
        "threads_per_warp": 32,
        "shared_memory_per_block": 49152,
        "shared_memory_per_core": target.shared_memory_per_sm,
        "shared_memory_per_block_optin": target.shared_memory_per_block_optin,
        "threads_per_core_limit": 2048,
        "core_count": target.sm_count,
        "fpus_per_core": target.fpus_per_sm,
        "block_dim_limit_x": 2147483647,
        "block_dim_limit_y": 65535,
        "block_dim_limit_z": 65535,
        "thread_dim_limit_x": 1024,
        "thread_dim_limit_y": 1024,
        "thread_dim_limit_z": 64,
        "memory_bandwidth": int(target.memory_bandwidth),
        "l2_cache_size": target.l2_cache_bytes,
        "clock_rate_ghz": target.clock_ghz,
        "device_memory_size": target.memory_bytes,
        "registers_per_core_limit": 65536,
        "registers_per_block_limit": 65536,
    }
    lines = ["gpu_device_info {"]
    lines += [f"  {key}: {value}" for key, value in fields.items()]
    lines += [
        "  cuda_compute_capability {",
        f"    major: {major}",
        f"    minor: {minor}",
        f"    feature_extension: {extension}",
        "  }",
        "}",
        'platform_name: "CUDA"',
        f"dnn_version_info {{ major: {dnn_major} minor: {dnn_minor} patch: {dnn_patch} }}",
        f'device_description_str: "{target.description}"',
    ]
    return "\n".join(lines) + "\n"
