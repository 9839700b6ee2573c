"""Published peak arithmetic rates, so a measured rate can be read as a fraction (MFU).

Model FLOPs utilisation only means something against the chip's real ceiling, and JAX
does not report one, so we keep a small table keyed by the `device_kind` string JAX
gives. Figures are the vendors' datasheet numbers for *dense* matrix arithmetic (no
2:4 sparsity): bfloat16 on the tensor cores, and plain (non-tensor-core) float32.
A device we do not know gets `None`, and the benchmark leaves MFU empty rather than
guessing.
"""

from __future__ import annotations

# (lower-case substring of jax.Device.device_kind, {dtype name: FLOP/s}).
# Order matters: the first substring that matches wins, so the PCIe and NVL variants
# come before the plain "h100" (JAX reports the SXM part as "NVIDIA H100 80GB HBM3").
_PEAK_FLOPS_BY_DEVICE_KIND: tuple[tuple[str, dict[str, float]], ...] = (
    ("h100 pcie", {"bfloat16": 756e12, "float32": 51e12}),
    ("h100 nvl", {"bfloat16": 835e12, "float32": 60e12}),
    ("h200", {"bfloat16": 989e12, "float32": 67e12}),
    ("h100", {"bfloat16": 989e12, "float32": 67e12}),
    ("a100", {"bfloat16": 312e12, "float32": 19.5e12}),
)


def peak_flops_per_second(device_kind: str, dtype: str) -> float | None:
    """The device's dense peak for `dtype` ('bfloat16' or 'float32'), or None if unknown."""
    kind = device_kind.lower()
    for key, peaks in _PEAK_FLOPS_BY_DEVICE_KIND:
        if key in kind:
            return peaks.get(dtype)
    return None


def model_flops_utilisation(
    forward_flops_per_image: float | None,
    train_images_per_second: float,
    peak_flops: float | None,
) -> float | None:
    """Training MFU with the usual convention: a training step costs 3x the forward pass.

    The backward pass costs about twice the forward (one product for the gradient with
    respect to the activations, one for the weights), hence 3x. Recomputation and the
    optimizer update are not counted, as in the PaLM paper's definition of MFU.
    """
    if not forward_flops_per_image or not peak_flops:
        return None
    return 3.0 * forward_flops_per_image * train_images_per_second / peak_flops
