"""A reader for the text of a compiled (optimised, scheduled) XLA module.

The compiled text is the one record of what a GPU step will launch: every top-level
instruction of the entry computation that is not bookkeeping (parameters, tuples,
bitcasts, the `-done` halves of asynchronous pairs) is a kernel or a library call, in
the order the runtime issues them. This module turns the text into computations of
instructions with their shapes, operands, attributes and source metadata; what the
instructions mean is `kernels.py`'s business.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

# Bytes per element of XLA's primitive types (sub-byte types rounded up to one byte).
_ELEMENT_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e3m4": 1, "f8e8m0fnu": 1, "f4e2m1fn": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")


@dataclasses.dataclass(frozen=True)
class Array:
    dtype: str
    dims: tuple[int, ...]

    @property
    def bytes(self) -> int:
        return _ELEMENT_BYTES.get(self.dtype, 4) * math.prod(self.dims)

    @property
    def elements(self) -> int:
        return math.prod(self.dims)


@dataclasses.dataclass
class Instruction:
    name: str
    opcode: str
    shapes: list[Array]  # One per tuple element; a single array for array results.
    operands: list[str]
    attributes: str  # Everything after the operand list, as printed.
    is_root: bool = False
    operand_shapes: list[list[Array]] = dataclasses.field(default_factory=list)
    parameter_number: int | None = None  # For `parameter(N)` instructions.

    @property
    def result_bytes(self) -> int:
        return sum(a.bytes for a in self.shapes)

    def attribute(self, key: str) -> str | None:
        """`key=value` from the attributes: a quoted string, a `{...}` block or a word."""
        match = re.search(r"(?:^|[\s,])" + re.escape(key) + r"=", self.attributes)
        if not match:
            return None
        return _value_at(self.attributes, match.end())

    @property
    def op_name(self) -> str:
        metadata = self.attribute("metadata") or ""
        match = re.search(r'op_name="([^"]*)"', metadata)
        return match.group(1) if match else ""

    @property
    def backend_config(self) -> dict:
        text = self.attribute("backend_config")
        if not text:
            return {}
        try:
            value = json.loads(text)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    @property
    def called(self) -> list[str]:
        """Computations this instruction calls (fusion bodies, loop bodies, branches)."""
        names = []
        for key in ("calls", "body", "condition", "to_apply", "branch_computations",
                    "true_computation", "false_computation"):
            value = self.attribute(key)
            if value:
                names += [n.lstrip("%") for n in re.findall(r"%?[\w.\-]+", value)]
        return names


@dataclasses.dataclass
class Computation:
    name: str
    is_entry: bool
    instructions: list[Instruction]

    @property
    def root(self) -> Instruction | None:
        for instruction in self.instructions:
            if instruction.is_root:
                return instruction
        return self.instructions[-1] if self.instructions else None


@dataclasses.dataclass
class Module:
    computations: dict[str, Computation]
    entry: Computation


def _value_at(text: str, start: int) -> str:
    """The attribute value that starts at `text[start]`."""
    if start >= len(text):
        return ""
    opener = text[start]
    if opener == '"':
        end = start + 1
        while end < len(text) and text[end] != '"':
            end += 2 if text[end] == "\\" else 1
        return text[start + 1:end]
    if opener == "{":
        return text[start:_matching(text, start) + 1]
    match = re.match(r"[^\s,]+", text[start:])
    return match.group(0) if match else ""


def _matching(text: str, start: int) -> int:
    """Index of the bracket that closes `text[start]`, skipping quoted strings."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    closer, depth, index, quoted = pairs[text[start]], 0, start, False
    opener = text[start]
    while index < len(text):
        char = text[index]
        if quoted:
            if char == "\\":
                index += 1
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == opener:
            depth += 1
        elif char == closer:
            depth -= 1
            if depth == 0:
                return index
        index += 1
    return len(text) - 1


def parse_shapes(text: str) -> list[Array]:
    """Every array in a (possibly tuple) shape, layouts ignored; tokens count nothing."""
    return [Array(dtype, tuple(int(d) for d in dims.split(",") if d))
            for dtype, dims in _ARRAY.findall(text)]


def _parse_instruction(line: str) -> Instruction | None:
    match = _INSTRUCTION.match(line)
    if not match:
        return None
    rest = line[match.end():]
    if rest.startswith("("):  # A tuple shape.
        end = _matching(rest, 0)
        shape_text, rest = rest[:end + 1], rest[end + 1:]
    else:
        shape_match = re.match(r"\S+", rest)
        shape_text, rest = shape_match.group(0), rest[shape_match.end():]
    opcode_match = re.match(r"\s*([\w\-]+)\(", rest)
    if not opcode_match:
        return None
    open_at = opcode_match.end() - 1
    close_at = _matching(rest, open_at)
    operand_text = rest[open_at:close_at + 1]
    operands = re.findall(r"%([\w.\-]+)", operand_text)
    opcode = opcode_match.group(1)
    number = re.fullmatch(r"\((\d+)\)", operand_text) if opcode == "parameter" else None
    return Instruction(name=match.group(2), opcode=opcode, shapes=parse_shapes(shape_text),
                       operands=operands, attributes=rest[close_at + 1:],
                       is_root=bool(match.group(1)),
                       parameter_number=int(number.group(1)) if number else None)


def parse_module(text: str) -> Module:
    """The computations of a compiled module's text (`compiled.as_text()`)."""
    computations: dict[str, Computation] = {}
    entry = None
    current = None
    for line in text.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header:
                current = Computation(header.group(2), bool(header.group(1)), [])
            continue
        if line.strip() == "}":
            computations[current.name] = current
            if current.is_entry:
                entry = current
            current = None
            continue
        instruction = _parse_instruction(line)
        if instruction is not None:
            current.instructions.append(instruction)
    if entry is None:
        raise ValueError("no ENTRY computation in the module text")
    for computation in computations.values():
        shapes = {i.name: i.shapes for i in computation.instructions}
        for instruction in computation.instructions:
            instruction.operand_shapes = [shapes.get(name, []) for name in instruction.operands]
    return Module(computations, entry)
