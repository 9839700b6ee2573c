"""What a compiled GPU program launches: kernels by kind, their bytes and FLOPs, the
convolutions cuDNN gets with unaligned channels, and a lower bound on the step's time.

Definitions (docs/GUIDE.md, "Plan a GPU run on any machine", says what they mean and do
not):
- A kernel is a top-level instruction of the entry computation that the GPU runtime
  launches: an XLA fusion, a library call (cuDNN, cuBLAS), a copy, a collective. Kernels
  inside a loop body count once per iteration when XLA knows the trip count.
- Bytes at kernel boundaries: per kernel, its operands plus its results, as the compiled
  shapes say (an operand a fusion only slices counts as the slices it reads, and an
  elementwise loop fusion reads at most as many elements of an operand as it writes). Inside a fusion the data stays in registers and shared memory, so this is
  the traffic a perfect kernel would still have to move through device memory (caches
  can only lower it).
- FLOPs: convolutions and matrix products only (2 per multiply-add); elementwise
  arithmetic is left out, which matters little in memory-bound kernels.
- Lower bound: per kernel, the larger of bytes / memory bandwidth and FLOPs / dense
  peak for its dtype, summed, plus ring all-reduce time over the device link. Launch
  gaps, tails and imperfect kernels only add to it: it is an estimate from the plan,
  never a measurement.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter

from msff_jax.analysis.plan import hlo
from msff_jax.analysis.plan.targets import GpuTarget

KINDS = ("fusion", "transpose", "gemm", "cudnn_conv_forward", "cudnn_conv_backward_input",
         "cudnn_conv_backward_filter", "library_call", "copy", "collective", "other")

_CONV_TARGETS = {
    "__cudnn$convForward": "cudnn_conv_forward",
    "__cudnn$convBiasActivationForward": "cudnn_conv_forward",
    "__cudnn$convForwardGraph": "cudnn_conv_forward",
    "__cudnn$convBackwardInput": "cudnn_conv_backward_input",
    "__cudnn$convBackwardFilter": "cudnn_conv_backward_filter",
}
_GEMM_FUSIONS = ("__triton_gemm", "__triton_nested_gemm_fusion", "__cublas", "__cudnn$fusion")
_COLLECTIVES = ("all-reduce", "all-reduce-start", "all-gather", "all-gather-start",
                "reduce-scatter", "all-to-all", "collective-permute",
                "collective-permute-start", "collective-broadcast", "ragged-all-to-all")
# Instructions that launch nothing: they name, reshape or wait for buffers.
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
         "opt-barrier", "add-dependency", "domain", "all-reduce-done", "all-gather-done",
         "collective-permute-done", "copy-done", "async-done", "async-update", "send-done",
         "recv-done", "partition-id", "replica-id"}
_SIXTEEN_BIT = ("bf16", "f16")


@dataclasses.dataclass
class Kernel:
    name: str
    kind: str
    layer: str  # The model layer (or "" for the optimizer and bookkeeping).
    phase: str  # "forward", "backward" or "update" (optimizer and bookkeeping).
    bytes: int
    flops: float
    dtype: str  # Element type of the arithmetic, for the FLOP peak.
    count: int = 1  # Launches per step (loop trip counts).
    conv: dict | None = None  # Channels and window of a cuDNN convolution.

    def seconds(self, target: GpuTarget, num_devices: int) -> float:
        """This kernel's lower bound on `target`, all launches."""
        if self.kind == "collective":
            ring = 2 * (num_devices - 1) / num_devices if num_devices > 1 else 0.0
            return self.count * ring * self.bytes / 2 / target.link_bandwidth
        peak = target.peak_flops_16bit if self.dtype in _SIXTEEN_BIT else target.peak_flops_tf32
        return self.count * max(self.bytes / target.memory_bandwidth, self.flops / peak)


def layer_of(op_name: str) -> str:
    """'jit(step)/transpose(jvp(MSFFNet))/stage1_block0/iasm/spatial/conv/conv_general_dilated'
    (or 'jit(step)/MSFFNet/stage1_block0/...') -> 'stage1_block0/iasm/spatial/conv': the
    module path below the root, without the transformations and the primitive."""
    parts = [p for p in op_name.split("/") if p and not re.fullmatch(r"[\w.\-]+\(.*\)", p)]
    parts = parts[:-1]
    # Outside a transformation the root module's class name (CamelCase by Flax's
    # convention, e.g. 'MSFFNet') leads the path; inside one it is the transformation's
    # argument ('jvp(MSFFNet)'), dropped above. Either way the layer starts below it.
    if len(parts) > 1 and parts[0][:1].isupper():
        parts = parts[1:]
    return "/".join(parts)


def phase_of(op_name: str) -> str:
    if "transpose(jvp(" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    return "update"


def _operand_arrays(instruction: hlo.Instruction) -> list[hlo.Array]:
    return [a for shapes in instruction.operand_shapes for a in shapes]


_PASS_THROUGH = {"convert", "bitcast", "copy", "reshape", "negate", "abs", "exponential", "log",
                 "sqrt", "rsqrt", "tanh", "logistic", "sign", "floor", "ceil"}


def _sliced_reads(module: hlo.Module, instruction: hlo.Instruction) -> dict[int, int]:
    """Bytes a fusion reads of operands it only slices: {operand index: bytes}.

    A fusion that takes a large buffer and keeps a slice of it (splitting a flat buffer
    back into parameters, or one branch's channels of a joint convolution's output)
    reads the slice, not the buffer, also when it converts the values on the way."""
    body = module.computations.get(instruction.called[0]) if instruction.called else None
    if body is None:
        return {}
    users: dict[str, list[hlo.Instruction]] = {}
    for inner in body.instructions:
        for name in inner.operands:
            users.setdefault(name, []).append(inner)

    def elements_read(name: str) -> int | None:
        """Elements of `name` that reach the fusion's result through slices; None if
        some use needs all of them."""
        total = 0
        for user in users.get(name, []):
            if user.opcode in ("slice", "dynamic-slice"):
                total += sum(a.elements for a in user.shapes)
            elif user.opcode in _PASS_THROUGH and len(user.operands) == 1:
                inner = elements_read(user.name)
                if inner is None:
                    return None
                total += inner
            else:
                return None
        return total

    sliced = {}
    for inner in body.instructions:
        if inner.opcode == "parameter" and inner.parameter_number is not None and users.get(inner.name):
            count = elements_read(inner.name)
            if count is not None:
                shape = inner.shapes[0]
                per_element = shape.bytes // max(shape.elements, 1)
                sliced[inner.parameter_number] = min(count * per_element, inner.result_bytes)
    return sliced


_NOT_ELEMENTWISE = {"reduce", "reduce-window", "select-and-scatter", "scatter", "dot",
                    "convolution", "sort", "custom-call", "fusion"}


def _elementwise_loop(module: hlo.Module, instruction: hlo.Instruction) -> bool:
    """A loop fusion computing each output element from a few input elements: it reads
    no more of an operand than it writes elements."""
    if instruction.attribute("kind") != "kLoop" or not instruction.called:
        return False
    body = module.computations.get(instruction.called[0])
    return body is not None and not any(i.opcode in _NOT_ELEMENTWISE for i in body.instructions)


def _boundary_bytes(module: hlo.Module, instruction: hlo.Instruction) -> int:
    results = instruction.shapes
    if instruction.opcode == "custom-call":  # A library call's scratch is not traffic.
        results = [a for a in results if a.dtype != "u8"]
    written = sum(a.bytes for a in results)
    if instruction.opcode != "fusion":
        return sum(a.bytes for a in _operand_arrays(instruction)) + written
    sliced = _sliced_reads(module, instruction)
    elementwise = _elementwise_loop(module, instruction)
    out_elements = sum(a.elements for a in results)
    reads = 0
    for index, shapes in enumerate(instruction.operand_shapes):
        size = sum(a.bytes for a in shapes)
        if index in sliced:
            size = sliced[index]
        elif elementwise and shapes:  # E.g. an update computed only where it is sliced.
            size = min(size, out_elements * (shapes[0].bytes // max(shapes[0].elements, 1)))
        reads += size
    return reads + written


def _labels(dim_labels: str) -> tuple[str, str, str]:
    lhs, rest = dim_labels.split("_", 1)
    rhs, out = rest.split("->")
    return lhs, rhs, out


def _conv_facts(instruction: hlo.Instruction, kind: str) -> dict | None:
    """Channels, window and FLOPs of a cuDNN convolution custom call."""
    labels = instruction.attribute("dim_labels")
    if not labels:
        return None
    _, rhs, out = _labels(labels)
    operands = [shapes[0] for shapes in instruction.operand_shapes if shapes]
    if kind == "cudnn_conv_backward_filter":
        kernel, output = instruction.shapes[0], operands[1]
    elif kind == "cudnn_conv_backward_input":
        kernel, output = operands[1], operands[0]
    else:
        kernel, output = operands[1], instruction.shapes[0]
    dims = dict(zip(rhs, kernel.dims))
    window = [dims[c] for c in rhs if c.isdigit()]
    groups = int(instruction.attribute("feature_group_count") or 1)
    in_per_group, out_channels = dims["i"], dims["o"]
    return {
        "in_channels": in_per_group * groups,
        "out_channels": out_channels,
        "groups": groups,
        "kernel": "x".join(str(w) for w in window),
        "dtype": operands[0].dtype,
        "flops": 2.0 * output.elements * math.prod(window) * in_per_group,
        "output_labels": out,
    }


def _dot_flops(instruction: hlo.Instruction) -> float:
    contracting = instruction.attribute("lhs_contracting_dims") or ""
    axes = [int(a) for a in re.findall(r"\d+", contracting)]
    lhs = instruction.operand_shapes[0][0] if instruction.operand_shapes and instruction.operand_shapes[0] else None
    if lhs is None:
        return 0.0
    depth = math.prod(lhs.dims[a] for a in axes if a < len(lhs.dims))
    return 2.0 * instruction.shapes[0].elements * depth


def _dots_within(module: hlo.Module, names: list[str], seen: set | None = None):
    """Every `dot` in the computations `names` call, recursively (nested gemm fusions)."""
    seen = set() if seen is None else seen
    for name in names:
        if name in seen or name not in module.computations:
            continue
        seen.add(name)
        for instruction in module.computations[name].instructions:
            if instruction.opcode == "dot":
                yield instruction
            yield from _dots_within(module, instruction.called, seen)


def _fusion_kind(module: hlo.Module, instruction: hlo.Instruction) -> str:
    config = instruction.backend_config.get("fusion_backend_config", {})
    if str(config.get("kind", "")).startswith(_GEMM_FUSIONS):
        return "gemm"
    body = module.computations.get(instruction.called[0]) if instruction.called else None
    root = body.root if body else None
    if root is not None and root.opcode == "transpose":
        return "transpose"
    return "fusion"


def _trip_count(instruction: hlo.Instruction) -> int:
    known = instruction.backend_config.get("known_trip_count", {})
    try:
        return max(1, int(known.get("n", 1)))
    except (TypeError, ValueError):
        return 1


def _classify(module: hlo.Module, instruction: hlo.Instruction, count: int) -> Kernel | None:
    opcode = instruction.opcode
    if opcode in _FREE:
        return None
    flops, dtype, conv = 0.0, "", None
    if opcode == "fusion":
        kind = _fusion_kind(module, instruction)
        for dot in _dots_within(module, instruction.called):
            flops += _dot_flops(dot)
            dtype = dot.operand_shapes[0][0].dtype if dot.operand_shapes[0] else dtype
    elif opcode == "custom-call":
        target = instruction.attribute("custom_call_target") or ""
        if target in _CONV_TARGETS:
            kind = _CONV_TARGETS[target]
            conv = _conv_facts(instruction, kind)
            if conv:
                flops, dtype = conv["flops"], conv["dtype"]
        elif target.startswith("__cublas"):
            kind = "gemm"
            numbers = instruction.backend_config.get("gemm_backend_config", {}).get(
                "dot_dimension_numbers", {})
            axes = [int(a) for a in numbers.get("lhs_contracting_dimensions", [])]
            lhs = _operand_arrays(instruction)[0]
            flops = 2.0 * instruction.shapes[0].elements * math.prod(lhs.dims[a] for a in axes)
            dtype = lhs.dtype
        else:
            kind = "library_call"
    elif opcode in ("copy", "copy-start"):
        kind = "copy"
    elif opcode in _COLLECTIVES or (opcode == "async-start" and any(
            c in name for name in instruction.called for c in ("all-", "reduce-scatter", "collective"))):
        kind = "collective"
    else:
        kind = "other"
    op_name = instruction.op_name
    return Kernel(name=instruction.name, kind=kind, layer=layer_of(op_name), phase=phase_of(op_name),
                  bytes=_boundary_bytes(module, instruction), flops=flops, dtype=dtype, count=count,
                  conv=conv)


def launched_kernels(module: hlo.Module) -> list[Kernel]:
    """The kernels one call of the program launches, loop bodies expanded by trip count."""
    kernels: list[Kernel] = []

    def walk(computation: hlo.Computation, count: int, seen: tuple[str, ...]) -> None:
        for instruction in computation.instructions:
            if instruction.opcode in ("while", "conditional", "call"):
                trips = _trip_count(instruction) if instruction.opcode == "while" else 1
                for name in instruction.called:
                    if name in module.computations and name not in seen:
                        walk(module.computations[name], count * trips, seen + (name,))
                continue
            kernel = _classify(module, instruction, count)
            if kernel is not None:
                kernels.append(kernel)

    walk(module.entry, 1, (module.entry.name,))
    return kernels


def unaligned_convolutions(kernels: list[Kernel], multiple: int = 8) -> list[dict]:
    """cuDNN convolutions in float16/bfloat16 whose input or output channel count is not
    a multiple of `multiple` (XLA pads channels for float16 only, so bfloat16 ones reach
    cuDNN as they are). Grouped (depthwise) convolutions use other kernels and are left
    out."""
    found = []
    for kernel in kernels:
        conv = kernel.conv
        if not conv or conv["dtype"] not in _SIXTEEN_BIT or conv["groups"] != 1:
            continue
        if conv["in_channels"] % multiple or conv["out_channels"] % multiple:
            found.append({
                "layer": kernel.layer or kernel.name,
                "kind": kernel.kind.replace("cudnn_conv_", ""),
                "in_channels": conv["in_channels"],
                "out_channels": conv["out_channels"],
                "kernel": conv["kernel"],
            })
    return found


def summarize(kernels: list[Kernel], target: GpuTarget, num_devices: int) -> dict:
    """Counts by kind, bytes, FLOPs, collectives and the lower bound of one program."""
    counts = Counter()
    for kernel in kernels:
        counts[kernel.kind] += kernel.count
    by_kind = {kind: counts.get(kind, 0) for kind in KINDS}
    by_phase = Counter()
    for kernel in kernels:
        by_phase[kernel.phase] += kernel.count
    collectives = [k for k in kernels if k.kind == "collective"]
    timed = sorted(((k.seconds(target, num_devices), k) for k in kernels),
                   key=lambda pair: -pair[0])
    return {
        "kernels": {"total": sum(counts.values()), **by_kind},
        "kernels_by_phase": {p: by_phase.get(p, 0) for p in ("forward", "backward", "update")},
        "collective_bytes": sum(k.bytes * k.count for k in collectives),
        "unaligned_convs": unaligned_convolutions(kernels),
        "flops": sum(k.flops * k.count for k in kernels),
        "bytes": sum(k.bytes * k.count for k in kernels if k.kind != "collective"),
        "lower_bound_step_s": sum(seconds for seconds, _ in timed),
        "top_kernels": [
            {"name": k.name, "kind": k.kind, "layer": k.layer, "phase": k.phase,
             "bytes": k.bytes, "flops": k.flops, "lower_bound_s": seconds}
            for seconds, k in timed[:10]
        ],
    }


def analyse(compiled_text: str, target: GpuTarget, num_devices: int) -> dict:
    """`summarize` of a compiled module's text (`jax.stages.Compiled.as_text()`)."""
    return summarize(launched_kernels(hlo.parse_module(compiled_text)), target, num_devices)
