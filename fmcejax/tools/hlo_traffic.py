"""HBM traffic of a compiled program, kernel by kernel, read from its optimized HLO text.

Each kernel the program launches (a fusion, a convolution or GEMM custom call, a copy, a
collective) reads its operands from memory and writes its results once: the sum over kernels is
the program's memory traffic to first order. Two reasons to count it ourselves: the CUDA compiler
reports no bytes at all, and the TPU compiler's `bytes accessed` also counts on-chip (VMEM)
traffic, so neither is HBM bytes. Here a buffer in a non-default memory space (`S(1)`, VMEM on
TPU) is not HBM traffic, and a TPU buffer counts with its tile padding (`T(8,128)`: a 64-channel
minor dimension occupies 128 lanes), as the chip moves it. An estimate: it ignores caches and
operands a kernel reads twice.
"""

from __future__ import annotations

import dataclasses
import math
import re

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1}
_BYTES |= {"bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4}
_BYTES |= {"f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"([a-z]\w*)\[([\d,]*)\](?:\{([^}]*)\})?")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_CALLED = re.compile(
  r"\b(?:body|condition|to_apply|true_computation|false_computation)=%([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_KIND = re.compile(r"\bkind=(\w+)")
_CUSTOM_TARGET = re.compile(r'custom_call_target="([^"]*)"')

# No kernel of their own: plumbing, or control flow whose called computations are walked instead.
_NO_KERNEL = {
  "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
  "call", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain",
}  # fmt: skip
_CONTROL = {"while", "conditional", "call"}
_SLICING = {"slice", "dynamic-slice", "gather"}


@dataclasses.dataclass(frozen=True)
class Kernel:
  name: str
  opcode: str  # fusion kind (kLoop, kOutput, ...), custom-call target, or the HLO opcode
  bytes: float  # HBM bytes read and written (in a loop: per iteration)
  op_name: str  # the JAX source the kernel came from (its metadata), "" if none
  in_loop: bool = False  # inside a while loop's body (a scan of train steps: once per step)


def array_bytes(dtype: str, dims: str, layout: str | None) -> float:
  """Bytes of one array in HBM, with TPU tile padding; 0 in another memory space."""
  if layout and re.search(r"S\([1-9]\d*\)", layout):
    return 0.0
  shape = [int(d) for d in dims.split(",") if d]
  if layout and ":" in layout and shape:
    order, tiling = layout.split(":", 1)
    minor_to_major = [int(d) for d in order.split(",") if d]
    tile = re.search(r"T\(([\d,]+)\)", tiling)
    if tile and len(minor_to_major) == len(shape):
      padded = [shape[d] for d in reversed(minor_to_major)]  # major to minor
      sizes = [int(t) for t in tile.group(1).split(",")]
      for i, t in zip(range(len(padded) - len(sizes), len(padded)), sizes, strict=True):
        if i >= 0:
          padded[i] = -(-padded[i] // t) * t
      shape = padded
  return math.prod(shape) * _BYTES.get(dtype, 4)


def shape_bytes(shape: str, skip_scratch: bool = False) -> float:
  """Bytes of an HLO shape (an array, or a tuple of them); `skip_scratch` drops u8 tuple
  elements (a cuDNN or cuBLAS call's workspace)."""
  arrays = _ARRAY.findall(shape)
  if skip_scratch and shape.startswith("("):
    arrays = [a for a in arrays if a[0] != "u8"]
  return sum(array_bytes(*a) for a in arrays)


def logical_bytes(shape: str) -> float:
  """Bytes of an HLO shape as its element counts say: no tile padding, in any memory space."""
  return sum(array_bytes(dtype, dims, None) for dtype, dims, _ in _ARRAY.findall(shape))


def _moved(shape: str) -> str:
  """The array a copy-start ((dst, src, ctx)) or slice-start (((src), dst, ctx)) moves: the
  second-last array of its tuple, as if in HBM (a slice moves its size, not its source's)."""
  return re.sub(r"S\(\d+\)", "", [m.group(0) for m in _ARRAY.finditer(shape)][-2])


def _split_definition(rest: str) -> tuple[str, str, str, str]:
  """'SHAPE opcode(operands), attrs' -> (shape, opcode, operands, attrs)."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        break
    shape, rest = rest[: i + 1], rest[i + 1 :].lstrip()
  else:
    shape, rest = rest.split(" ", 1)
  opcode, rest = rest.split("(", 1)
  depth = 1
  for i, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      break
  return shape, opcode.strip(), rest[:i], rest[i + 1 :]


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  comps: dict[str, list[str]] = {}
  entry, current = "", None
  for line in hlo.splitlines():
    m = _HEADER.match(line)
    if m:
      current = m.group(2)
      comps[current] = []
      entry = current if m.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current is not None and _INSTRUCTION.match(line):
      comps[current].append(line)
  return comps, entry


def _parsed(lines: list[str]) -> list[tuple[str, str, str, list[str], str]]:
  """(name, shape, opcode, operand names, attributes) of each instruction; a parameter's
  attributes are its number."""
  out = []
  for line in lines:
    m = _INSTRUCTION.match(line)
    shape, opcode, operands, attrs = _split_definition(line[m.end() :])
    if opcode == "parameter":  # its number, in place of attributes
      attrs = operands
    out.append((m.group(1), shape, opcode, re.findall(r"%([\w.\-]+)", operands), attrs))
  return out


def _sliced_params(fused: list[tuple[str, str, str, list[str], str]]) -> dict[int, str]:
  """{parameter number: what is read of it} for each parameter of a fused computation that is
  only sliced or gathered from (e.g. a batch gathered from a dataset held in HBM): the shape of
  its one slicing user's result."""
  out = {}
  for name, _, opcode, _, attrs in fused:
    if opcode != "parameter":
      continue
    users = [(op, shape, args) for _, shape, op, args, _ in fused if name in args]
    if len(users) == 1 and users[0][0] in _SLICING and users[0][2][0] == name:
      out[int(attrs)] = users[0][1]
  return out


def kernels(hlo: str) -> list[Kernel]:
  """Every kernel the optimized module `hlo` launches per call, with its HBM bytes. A loop's body
  counts once: per iteration (a `lax.scan` of train steps: per step)."""
  comps, entry = _computations(hlo)
  parsed = {name: _parsed(lines) for name, lines in comps.items()}
  out: list[Kernel] = []

  def walk(name: str, in_loop: bool) -> None:
    shapes: dict[str, str] = {}
    for inst, shape, opcode, operands, attrs in parsed.get(name, []):
      shapes[inst] = shape
      if opcode in _CONTROL:
        called = _CALLED.findall(attrs)
        for branches in _BRANCHES.findall(attrs):
          called += re.findall(r"%([\w.\-]+)", branches)
        for c in called:
          walk(c, in_loop or opcode == "while")
        continue
      if opcode in _NO_KERNEL:
        continue
      sources = [shapes.get(o, "") for o in operands]
      if opcode in ("copy-start", "slice-start"):  # reads what it moves, from HBM
        reads = shape_bytes(_moved(shape)) if sources and shape_bytes(sources[0]) else 0.0
      elif opcode.endswith("-done"):  # an async pair: operands at its start, result at its end
        reads = 0.0
      else:
        sliced = {}
        if opcode in _SLICING:
          sliced = {0: shape}
        elif opcode == "fusion" and (c := re.search(r"\bcalls=%([\w.\-]+)", attrs)):
          sliced = _sliced_params(parsed.get(c.group(1), []))
        reads = sum(
          shape_bytes(sliced[i]) if i in sliced and shape_bytes(src) else shape_bytes(src)
          for i, src in enumerate(sources)
        )
      writes = 0.0 if opcode.endswith("-start") else shape_bytes(shape, opcode == "custom-call")
      label = opcode
      if opcode == "fusion" and (k := _KIND.search(attrs)):
        label = k.group(1)
      elif opcode == "custom-call" and (t := _CUSTOM_TARGET.search(attrs)):
        label = t.group(1)
      op_name = _OP_NAME.search(attrs)
      out.append(Kernel(inst, label, reads + writes, op_name.group(1) if op_name else "", in_loop))

  walk(entry, False)
  return out


def heaviest(ks: list[Kernel], n: int = 10) -> list[Kernel]:
  """The `n` kernels of `ks` that move the most bytes."""
  return sorted(ks, key=lambda k: -k.bytes)[:n]


def per_iteration(ks: list[Kernel], iterations: int = 1) -> float:
  """Bytes per iteration of a program that runs its loop `iterations` times per call: the loop's
  kernels, plus the rest shared over the iterations."""
  return sum(k.bytes if k.in_loop else k.bytes / iterations for k in ks)
