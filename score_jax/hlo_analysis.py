"""What a compiled XLA program holds and does, read from its optimised HLO.

Two questions `--mode=aot` answers for a program compiled for a slice:
  * where its memory goes: the largest buffers of XLA's buffer assignment
    (shape, dtype, and what made them: the named scope of the model code,
    e.g. attention, logits, kv_cache, or the argument it holds);
  * what one run of it executes per device (`analyze`): its ops in
    schedule order, each with its matmul FLOPs and HBM bytes, or the
    collective (kind, bytes, replica-group size) or Pallas kernel (cost
    estimate) it is, and its while loops with their trip counts, which
    projection.py turns into time. XLA's own `cost_analysis()` counts a
    while loop's body once, which undercounts a scanned model by its number
    of layers and micro-batches. A loop's trip count is XLA's
    known_trip_count, or read from its condition (`i < N`, the form
    `lax.scan` takes) and the body's increment of `i`, or, for a loop under
    one of DYNAMIC_SCOPES, left to the workload; any other loop is an
    error, since counting it once would silently cut its cost.

The input is the text XLA prints (`compiled.as_text()`) and the buffer
assignment it dumps (`xla_dump_to`); both formats are XLA's debug output,
so anything unparsed is skipped rather than trusted.
"""

import dataclasses
import functools
import re
from typing import Optional

import numpy as np

_DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
  "s4": 0.5,
  "u4": 0.5,
  "bf16": 2,
  "f16": 2,
  "s16": 2,
  "u16": 2,
  "f32": 4,
  "s32": 4,
  "u32": 4,
  "f64": 8,
  "s64": 8,
  "u64": 8,
  "c64": 8,
  "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\](\{[^}]*\})?")
_NAME = re.compile(r"%([\w.\-]+)")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
# Instructions that move no data of their own.
_FREE = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "while",
  "call",
  "conditional",
  "after-all",
  "partition-id",
  "replica-id",
  "opt-barrier",
}
# Instructions that read only their output's worth of their first operand
# (a gather reads the rows it gathers).
_SLICING = ("slice", "dynamic-slice", "gather")
# The model code's named scopes, innermost first when several match.
SCOPES = (
  "log_probs",
  "logits",
  "kv_cache",
  "attention",
  "mlp",
  "embed",
  "prefill",
  "decode",
  "optimizer",
)


def array_bytes(shape: str, hbm_only: bool = False) -> int:
  """Bytes of an HLO shape string (a tuple's elements added up); with
  `hbm_only`, of the arrays in the default memory space (a layout's S(n)
  puts an array in another: on-chip memory the TPU compiler stages
  buffers in, whose traffic is not HBM's).

  Args:
    shape: the shape as XLA prints it, e.g. `(f32[8,128]{1,0}, s32[])`;
      arrays of a dtype it does not know count 0.
    hbm_only: whether to leave out the arrays of other memory spaces.

  Returns:
    The bytes, rounded down (4-bit types take half a byte).
  """
  total = 0
  for dtype, dims, layout in _ARRAY.findall(shape):
    if hbm_only and re.search(r"S\([1-9]", layout):
      continue
    count = 1
    for d in filter(None, dims.split(",")):
      count *= int(d)
    total += count * _DTYPE_BYTES.get(dtype, 0)
  return int(total)


def _dims(shape: str) -> list[int]:
  match = _ARRAY.search(shape)
  return (
    [int(d) for d in filter(None, match.group(2).split(","))] if match else []
  )


def _tuple_elements(shape: str) -> list[str]:
  """The top-level elements of a tuple shape `(a, (b, c), d)`."""
  elements, depth, start = [], 0, 1
  for i, c in enumerate(shape):
    depth += {"(": 1, "{": 1, "[": 1, ")": -1, "}": -1, "]": -1}.get(c, 0)
    if (c == "," and depth == 1) or (c == ")" and depth == 0):
      elements.append(shape[start:i].strip())
      start = i + 1
  return elements


def _elements(shape: str) -> int:
  count = 1
  for d in _dims(shape):
    count *= d
  return count


def _hbm(shape: str) -> int:
  return array_bytes(shape, hbm_only=True)


def _balanced(text: str, start: int) -> int:
  """The index just past the bracket group opening at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, "{": 1, ")": -1, "}": -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  return len(text)


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  args: str  # the text between the parentheses (a constant's value)
  attributes: str

  def attribute(self, key: str) -> Optional[str]:
    """The value of attribute `key` (a name or a {...} group, as
    printed), or None where the instruction has none."""
    match = re.search(rf"\b{key}=(\{{[^}}]*\}}|%?[\w.\-]+)", self.attributes)
    return match.group(1) if match else None

  @property
  def custom_call_target(self) -> str:
    """The custom call's target ("" where it states none)."""
    match = re.search(r'custom_call_target="([^"]*)"', self.attributes)
    return match.group(1) if match else ""

  @property
  def op_name(self) -> str:
    """The op_name of its metadata, the JAX scopes that made it ("" where
    it states none)."""
    match = re.search(r'op_name="([^"]*)"', self.attributes)
    return match.group(1) if match else ""


def _parse_instruction(line: str) -> Optional[Instruction]:
  match = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*", line)
  if not match:
    return None
  rest = line[match.end() :]
  end = _balanced(rest, 0) if rest.startswith("(") else rest.find(" ")
  shape, rest = rest[:end], rest[end:].lstrip()
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  close = _balanced(rest, op.end() - 1)
  args = rest[op.end() : close - 1]
  return Instruction(
    match.group(1), shape, op.group(1), _NAME.findall(args), args, rest[close:]
  )


def parse_module(text: str) -> tuple[dict, Optional[str]]:
  """{computation: [instructions]} and the entry computation's name."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
    elif current is not None and line.strip() != "}":
      instruction = _parse_instruction(line)
      if instruction:
        computations[current].append(instruction)
  return computations, entry


def _counted_trips(computations: dict, loop: Instruction) -> Optional[int]:
  """N / k for a loop whose condition is `i < N` with a constant N
  (directly or in a fusion, possibly and-ed with more) and whose body adds a
  constant k to i; None for any other form."""
  body = loop.attribute("body").lstrip("%")
  cond = {
    i.name: i
    for i in computations.get(loop.attribute("condition").lstrip("%"), [])
  }
  for inst in cond.values():
    callee = (inst.attribute("calls") or "").lstrip("%")
    fused = {i.name: i for i in computations.get(callee, [])}
    params = {name: n for n, name in _parameters(list(fused.values())).items()}

    def resolve(name, inst=inst, fused=fused, params=params):
      """A compare's operand in the condition: through a fused parameter
      to the fusion's operand; a fused constant stays itself."""
      if name in params and params[name] < len(inst.operands):
        return cond.get(inst.operands[params[name]])
      return fused.get(name) or cond.get(name)

    compares = (
      [inst]
      if inst.opcode == "compare"
      else list(fused.values())
      if inst.opcode == "fusion"
      else []
    )
    for compare in compares:
      if compare.opcode != "compare" or "direction=LT" not in (
        compare.attributes
      ):
        continue
      operands = [resolve(n) for n in compare.operands]
      counter = next(
        (
          o
          for o in operands
          if o is not None and o.opcode == "get-tuple-element"
        ),
        None,
      )
      limit = next(
        (
          o
          for o in operands
          if o is not None
          and o.opcode == "constant"
          and re.fullmatch(r"-?\d+", o.args.strip())
        ),
        None,
      )
      if counter is not None and limit is not None:
        return -(
          -int(limit.args)
          // _increment(computations.get(body, []), counter.attribute("index"))
        )
  return None


def _increment(body: list, index: Optional[str]) -> int:
  """The constant the loop body adds to tuple element `index`, else 1."""
  by_name = {i.name: i for i in body}
  root = body[-1] if body else None
  if root is None or root.opcode != "tuple" or index is None:
    return 1
  update = by_name.get(root.operands[int(index)])
  if update is None or update.opcode != "add":
    return 1
  for name in update.operands:
    operand = by_name.get(name)
    if (
      operand is not None
      and operand.opcode == "constant"
      and re.fullmatch(r"\d+", operand.args.strip())
    ):
      return max(int(operand.args), 1)
  return 1


def _matmul_flops(inst: Instruction, shapes: dict) -> float:
  out = 1
  for d in _dims(inst.shape):
    out *= d
  if inst.opcode == "dot":
    lhs = _dims(shapes.get(inst.operands[0], ""))
    dims = inst.attribute("lhs_contracting_dims") or "{}"
    contracted = 1
    for d in re.findall(r"\d+", dims):
      contracted *= lhs[int(d)] if int(d) < len(lhs) else 1
    return 2.0 * out * contracted
  if inst.opcode == "convolution":
    return _convolution_flops(inst, shapes)
  return 0.0


def _convolution_flops(inst: Instruction, shapes: dict) -> float:
  """A convolution's FLOPs as XLA's HloCostAnalysis counts them: per
  spatial dimension, the (output, kernel) position pairs that land on a
  real input element (a TPU writes batched matmuls as convolutions whose
  spatial windows pick one element through strides and base dilation)."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.attributes)
  if not labels or len(inst.operands) < 2:
    return 0.0
  lhs_l, rhs_l, out_l = labels.groups()
  lhs, rhs = (_dims(shapes.get(o, "")) for o in inst.operands[:2])
  out = _dims(inst.shape)
  if (len(lhs), len(rhs), len(out)) != (len(lhs_l), len(rhs_l), len(out_l)):
    return 0.0
  window_text = re.search(r"window=\{([^}]*)\}", inst.attributes)
  window = dict(
    re.findall(
      r"(\w+)=([\dx_\-]+)", window_text.group(1) if window_text else ""
    )
  )
  spatial = sorted(c for c in lhs_l if c.isdigit())

  def per_dim(key, default):
    values = window.get(key)
    return (
      [default] * len(spatial)
      if values is None
      else [v for v in values.split("x")]
    )

  strides, pads = per_dim("stride", "1"), per_dim("pad", "0_0")
  base, dilation = per_dim("lhs_dilate", "1"), per_dim("rhs_dilate", "1")
  positions = 1
  for n, d in enumerate(spatial):
    size_in, size_out = lhs[lhs_l.index(d)], out[out_l.index(d)]
    size_k = rhs[rhs_l.index(d)]
    positions *= _valid_positions(
      size_in,
      size_out,
      size_k,
      int(strides[n]),
      int(pads[n].split("_")[0]),
      int(base[n]),
      int(dilation[n]),
    )
  groups = lambda key: int(inst.attribute(key) or 1)
  return (
    2.0
    * (lhs[lhs_l.index("f")] // groups("feature_group_count"))
    * (out[out_l.index("f")])
    * (lhs[lhs_l.index("b")] // groups("batch_group_count"))
    * positions
  )


@functools.lru_cache(maxsize=None)
def _valid_positions(
  size_in: int,
  size_out: int,
  size_k: int,
  stride: int,
  pad_low: int,
  base: int,
  dilation: int,
) -> int:
  """(output, kernel) index pairs of one spatial dimension whose input
  index is a real element of the base-dilated, padded input."""
  kernel = np.arange(size_k)[:, None]
  output = np.arange(size_out)[None, :]
  index = output * stride - pad_low + kernel * dilation
  real = (index % base == 0) & (index >= 0) & (index // base < size_in)
  return int(real.sum())


def _bytes_moved(inst: Instruction, computations: dict, shapes: dict) -> int:
  """Bytes an instruction reads and writes, counting what in-place and
  sliced accesses touch: a dynamic-update-slice writes its update into its
  operand's buffer, a (dynamic-)slice reads its slice (a scanned layer
  reads its own weights, not the stack). Inside a fusion this holds for
  the fused parameters' uses and the fused root, through nested fusions."""
  operand_bytes = [_hbm(shapes.get(o, "")) for o in inst.operands]
  if inst.opcode == "dynamic-update-slice":
    return 2 * operand_bytes[1] if len(operand_bytes) > 1 else 0
  if inst.opcode in _SLICING:
    return 2 * _hbm(inst.shape)
  # An async op's start holds (operands, results): what it reads and
  # writes (an async slice reads only its result's worth); its done moves
  # nothing more.
  if inst.opcode in ("slice-start", "dynamic-slice-start"):
    result = _tuple_elements(inst.shape)[1]
    return array_bytes(result) + _hbm(result)
  if inst.opcode.endswith("-start"):
    return _hbm(inst.shape)
  if inst.opcode.endswith("-done"):
    return 0
  if inst.opcode != "fusion" or not inst.attribute("calls"):
    return _hbm(inst.shape) + sum(operand_bytes)
  callee = inst.attribute("calls").lstrip("%")
  written, in_place = _writes(computations, callee, shapes)
  params = _parameters(computations.get(callee, []))
  return written + sum(
    _reads(computations, callee, params[n], full) if n in params else full
    for n, full in enumerate(operand_bytes)
    if n not in in_place
  )


def _parameters(instructions: list) -> dict:
  """{parameter number: its name} of a computation."""
  return {
    int(i.args.strip() or 0): i.name
    for i in instructions
    if i.opcode == "parameter"
  }


def _reads(computations: dict, computation: str, param: str, full: int) -> int:
  """Bytes of fused parameter `param` (of `full` bytes) its uses read."""
  total = 0
  instructions = computations.get(computation, [])
  shape = next((i.shape for i in instructions if i.name == param), "")
  for use in instructions:
    if param not in use.operands:
      continue
    if use.opcode in _SLICING and use.operands[0] == param:
      # The slice's elements, at the parameter's width (a fused convert
      # can give the slice another dtype).
      total += full * _elements(use.shape) // max(_elements(shape), 1)
    elif use.opcode == "fusion" and use.attribute("calls"):
      inner = use.attribute("calls").lstrip("%")
      params = _parameters(computations.get(inner, []))
      index = use.operands.index(param)
      total += (
        _reads(computations, inner, params[index], full)
        if index in params
        else full
      )
    else:
      return full
  return min(total, full)


def _writes(
  computations: dict, computation: str, shapes: dict
) -> tuple[int, set]:
  """Bytes a fused computation's root writes, and the numbers of the
  parameters it updates in place (the buffers dynamic-update-slices
  write into)."""
  instructions = computations.get(computation, [])
  if not instructions:
    return 0, set()
  by_name = {i.name: i for i in instructions}
  params = {name: n for n, name in _parameters(instructions).items()}
  root = instructions[-1]
  outputs = (
    [by_name.get(o) for o in root.operands]
    if root.opcode == "tuple"
    else [root]
  )
  written, in_place = 0, set()
  for out in outputs:
    if out is None:
      continue
    if out.opcode == "dynamic-update-slice":
      written += _hbm(shapes.get(out.operands[1], ""))
      if out.operands[0] in params:
        in_place.add(params[out.operands[0]])
    elif out.opcode == "fusion" and out.attribute("calls"):
      inner_written, inner_in_place = _writes(
        computations, out.attribute("calls").lstrip("%"), shapes
      )
      written += inner_written
      in_place |= {
        params[out.operands[n]]
        for n in inner_in_place
        if n < len(out.operands) and out.operands[n] in params
      }
    else:
      written += _hbm(out.shape)
  return written, in_place


# -- The program as executed: ops in schedule order, loops with trip counts --

# Named scopes whose while loops run a number of times the workload decides:
# the rollout's sampling loops (until the micro-batch's longest row stops,
# at most config.rollout.max_attempt_len) and the loop over the micro-batches
# a train step actually uses (at most config.num_micro_batches).
DYNAMIC_SCOPES = ("decode", "micro_batches")
COLLECTIVES = (
  "all-gather",
  "reduce-scatter",
  "all-reduce",
  "all-to-all",
  "collective-permute",
)
# A Pallas TPU kernel is a custom call with this target.
KERNEL_TARGET = "tpu_custom_call"
# Custom calls libtpu inserts itself (buffer, layout and async-collective
# plumbing, and the start of a scatter it offloads on v5p): costed like any
# instruction, by the bytes of their shapes.
COMPILER_CUSTOM_CALLS = (
  "AllocateBuffer",
  "AssumeGatherIndicesInBound",
  "ConcatBitcast",
  "GatherScatterIndicesBitpacked",
  "AsyncCollectiveStart",
  "AsyncCollectiveDone",
  "ZeroCrop",
  "PrepareAsyncCallStart",
  "PrepareAsyncCallDone",
)


class UnknownLoop(ValueError):
  """A while loop whose trip count is neither static nor dynamic by design."""


class UnknownCustomCall(ValueError):
  """A custom call that is neither a Pallas kernel nor libtpu's own."""


@dataclasses.dataclass(frozen=True)
class Collective:
  """A collective over groups of `group_size` devices; `bytes`: what each
  device puts in (its operands)."""

  kind: str  # one of COLLECTIVES
  bytes: int
  group_size: int


@dataclasses.dataclass(frozen=True)
class CostEstimate:
  """A kernel's cost on one device, as pl.CostEstimate states it."""

  flops: float
  bytes: float
  transcendentals: float = 0.0


@dataclasses.dataclass(frozen=True)
class Kernel:
  """A Pallas kernel call: its name (pallas_call's `name`), the shapes of
  its operands and result, and its compiled cost estimate (None: the
  kernel gave none)."""

  name: str
  operand_shapes: tuple[str, ...]
  result_shape: str
  estimate: Optional[CostEstimate]


@dataclasses.dataclass(frozen=True)
class Op:
  """One executed instruction of a device's program: its matmul FLOPs and
  HBM bytes, and the collective or kernel it is, if any (a fusion may hold
  a collective and the matmul it feeds). An async collective or copy is one Op
  that `starts` it, and the Op(s) that wait for it name it in `waits_for`;
  what runs between the two may hide it."""

  name: str
  op_name: str
  flops: float = 0.0
  bytes: float = 0.0
  collective: Optional[Collective] = None
  kernel: Optional[Kernel] = None
  starts: bool = False
  waits_for: tuple[str, ...] = ()  # ("*",): whatever is in flight


@dataclasses.dataclass(frozen=True)
class Loop:
  """A while loop: `body` (its condition's ops and its body's, in order)
  runs `trips` times when that is static; a loop under one of
  DYNAMIC_SCOPES (`scope`) runs as often as the workload says, at most
  `bound` where its condition states one."""

  name: str
  op_name: str
  trips: Optional[int]
  scope: Optional[str]
  bound: Optional[int]
  body: tuple  # of Op and Loop


def dynamic_scope(op_name: str) -> Optional[str]:
  """The dynamic scope (DYNAMIC_SCOPES) that a while loop's op_name puts it
  directly under, else None. A loop nested deeper in such a scope's loop
  (`.../decode/while/body/.../while`) is not directly under it."""
  parts = op_name.split("/")
  for k in range(len(parts) - 2, -1, -1):
    if parts[k] in DYNAMIC_SCOPES:
      return None if "while" in parts[k + 1 : -1] else parts[k]
  return None


def _group_size(inst: Instruction, num_devices: int) -> int:
  """Devices in each replica group of a collective, from any of the forms
  XLA prints: `{{0,1},{2,3}}`, the iota `[G,S]<=[N]`, the mesh-axes
  `mesh['a'=4,'b'=4] {'b'}`, or none (every device)."""
  text = inst.attributes
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", text)
  if mesh:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
    return int(
      np.prod([int(sizes[a]) for a in re.findall(r"'(\w+)'", mesh.group(2))])
    )
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", text)
  if iota:
    return int(iota.group(2))
  listed = re.search(r"replica_groups=\{\{([^}]*)\}", text)
  if listed:
    return len(listed.group(1).split(","))
  if "source_target_pairs" in text:
    return 2
  return num_devices


def _collective(
  inst: Instruction, shapes: dict, num_devices: int
) -> Collective:
  kind = next(k for k in COLLECTIVES if inst.opcode.startswith(k))
  return Collective(
    kind,
    sum(array_bytes(shapes.get(o, "")) for o in inst.operands),
    _group_size(inst, num_devices),
  )


def _kernel(inst: Instruction, shapes: dict) -> Kernel:
  parts = inst.op_name.split("/")
  name = (
    parts[-2]
    if len(parts) > 1 and parts[-1] == "pallas_call"
    else re.sub(r"\.\d+$", "", inst.name)
  )
  estimate = re.search(
    r'"cost_estimate":\{"flops":"(\d+)","transcendentals":'
    r'"(\d+)","bytes_accessed":"(\d+)"',
    inst.attributes,
  )
  return Kernel(
    name,
    tuple(shapes.get(o, "") for o in inst.operands),
    inst.shape,
    None
    if estimate is None
    else CostEstimate(
      float(estimate.group(1)),
      float(estimate.group(3)),
      float(estimate.group(2)),
    ),
  )


def analyze(text: str, num_devices: int) -> tuple:
  """The program printed in `text` as the steps one device executes.

  Args:
    text: the optimised HLO of one device's SPMD program
      (`compiled.as_text()`).
    num_devices: the devices it runs over (a collective without replica
      groups spans them all).

  Returns:
    A tuple of Op and Loop in schedule order; a call's or conditional's
    steps inline (every branch of a conditional: an upper bound).

  Raises:
    UnknownLoop: a while loop whose trip count is neither static (XLA's
      known_trip_count, or a condition `i < N` on a counter the body steps
      by a constant) nor under one of DYNAMIC_SCOPES.
    UnknownCustomCall: a custom call that is neither a Pallas kernel nor
      one of libtpu's own.
  """
  computations, entry = parse_module(text)
  shapes = {i.name: i.shape for insts in computations.values() for i in insts}
  made_by = {i.name: i for insts in computations.values() for i in insts}

  def fused_flops(name: str) -> float:
    return sum(
      _matmul_flops(i, shapes)
      + (
        fused_flops(i.attribute("calls").lstrip("%"))
        if i.opcode == "fusion" and i.attribute("calls")
        else 0.0
      )
      for i in computations.get(name, [])
    )

  def starts_of(inst: Instruction) -> tuple:
    """The async starts an instruction waits for, through the tuple
    plumbing between them."""
    found, stack = [], list(inst.operands)
    for _ in range(16):
      if not stack:
        break
      source = made_by.get(stack.pop())
      if source is None:
        continue
      if (
        source.opcode.endswith("-start")
        or _root_target(computations, source) == "AsyncCollectiveStart"
      ):
        found.append(source.name)
      elif source.opcode in ("get-tuple-element", "bitcast", "tuple"):
        stack.extend(source.operands)
    return tuple(found) or ("*",)

  def visit(name: str) -> list:
    steps: list[Op | Loop] = []
    for inst in computations.get(name, []):
      if inst.opcode == "while":
        steps.append(_loop(computations, inst, visit))
      elif inst.opcode in ("call", "conditional"):
        # A conditional counts every branch: an upper bound.
        callees = (
          inst.attribute("to_apply")
          or inst.attribute("branch_computations")
          or ""
        )
        for callee in _NAME.findall(callees):
          steps.extend(visit(callee))
      elif inst.opcode in _FREE:
        continue
      elif (
        inst.opcode.endswith("-done")
        or _root_target(computations, inst) == "AsyncCollectiveDone"
      ):
        steps.append(Op(inst.name, inst.op_name, waits_for=starts_of(inst)))
      else:
        steps.append(op(inst))
    return steps

  def op(inst: Instruction) -> Op:
    starts = (
      inst.opcode.endswith("-start")
      or _root_target(computations, inst) == "AsyncCollectiveStart"
    )
    if inst.opcode.startswith(COLLECTIVES):
      return Op(
        inst.name,
        inst.op_name,
        starts=starts,
        collective=_collective(inst, shapes, num_devices),
      )
    if inst.opcode == "fusion" and inst.attribute("calls"):
      callee = inst.attribute("calls").lstrip("%")
      inner = [
        i
        for i in computations.get(callee, [])
        if i.opcode.startswith(COLLECTIVES)
      ]
      if inner:
        # A collective fused with its async plumbing, or with the matmul
        # that consumes it (an FSDP weight gather feeding its dot).
        return Op(
          inst.name,
          inst.op_name,
          starts=starts,
          collective=_collective(inner[0], shapes, num_devices),
          flops=fused_flops(callee),
          bytes=0 if starts else _bytes_moved(inst, computations, shapes),
        )
    if inst.opcode == "custom-call":
      target = inst.custom_call_target
      if target == KERNEL_TARGET:
        return Op(inst.name, inst.op_name, kernel=_kernel(inst, shapes))
      if target not in COMPILER_CUSTOM_CALLS:
        raise UnknownCustomCall(
          f"custom call {inst.name} ({inst.op_name or 'no op_name'}) has "
          f"target {target}, which hlo_analysis cannot cost; add it to "
          "COMPILER_CUSTOM_CALLS if libtpu inserts it, or write it as a "
          "Pallas kernel."
        )
    flops = _matmul_flops(inst, shapes)
    if inst.opcode == "fusion" and inst.attribute("calls"):
      flops += fused_flops(inst.attribute("calls").lstrip("%"))
    return Op(
      inst.name,
      inst.op_name,
      flops=flops,
      bytes=_bytes_moved(inst, computations, shapes),
      starts=starts,
    )

  return tuple(visit(entry))


def _root_target(computations: dict, inst: Instruction) -> Optional[str]:
  """The custom-call target at the root of a fusion's computation."""
  if inst.opcode != "fusion" or not inst.attribute("calls"):
    return None
  body = computations.get(inst.attribute("calls").lstrip("%"), [])
  if not body or body[-1].opcode != "custom-call":
    return None
  return body[-1].custom_call_target


def _loop(computations: dict, inst: Instruction, visit) -> Loop:
  """A while instruction as a Loop (see analyze for the trip counts)."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', inst.attributes)
  bound = _counted_trips(computations, inst)
  scope = None if known else dynamic_scope(inst.op_name)
  trips = int(known.group(1)) if known else None if scope else bound
  if trips is None and scope is None:
    raise UnknownLoop(
      f"while loop {inst.name} ({inst.op_name or 'no op_name'}): its trip "
      "count is neither static nor known to the workload; give it a "
      "static one (lax.scan, fori_loop) or, if the workload decides it, "
      f"run it under jax.named_scope, one of {DYNAMIC_SCOPES}."
    )
  condition = visit(inst.attribute("condition").lstrip("%"))
  body = visit(inst.attribute("body").lstrip("%"))
  return Loop(
    inst.name, inst.op_name, trips, scope, bound, tuple(condition + body)
  )


@dataclasses.dataclass(frozen=True)
class Buffer:
  bytes: int  # of one buffer
  shape: str
  kind: str  # argument, output or temporary
  label: str  # what made it
  count: int = 1  # buffers of this shape, kind and maker


def largest_buffers(
  buffer_assignment: str,
  module_text: str,
  count: int = 10,
  argument_labels: Optional[dict] = None,
) -> list[Buffer]:
  """The `count` largest kinds of value in HBM in XLA's buffer assignment
  (values of one shape, kind and maker grouped), labelled by the named
  scope that made them (see SCOPES; "(backward)" where the gradient's
  transpose did) or, for arguments, by `argument_labels`.

  Args:
    buffer_assignment: the buffer assignment XLA dumps (`xla_dump_to`'s
      `*after_optimizations-buffer-assignment.txt`).
    module_text: the program's optimised HLO, to find what made each value.
    count: how many kinds to return.
    argument_labels: {parameter number: name} of the arguments (None, or a
      number it lacks: `argument N`).

  Returns:
    Up to `count` Buffers, the largest buffer first (of one size, the most
    buffers first); constants and on-chip buffers left out.
  """
  computations, _ = parse_module(module_text)
  made_by = {i.name: i for insts in computations.values() for i in insts}
  groups, seen = {}, set()
  kind = "temporary"
  parameter: Optional[re.Match] = None
  for line in buffer_assignment.splitlines():
    header = re.match(r"allocation \d+: size \d+,(.*)$", line)
    if header:
      attrs = header.group(1)
      parameter = re.search(r"parameter (\d+)", attrs)
      kind = (
        "argument"
        if parameter
        else "output"
        if "live-out" in attrs
        else "constant"
        if "constant" in attrs
        else "temporary"
      )
      if re.search(r"color [1-9]", attrs):
        kind = "on-chip"  # VMEM or SMEM, not HBM
      continue
    value = re.match(
      r"\s*value: <\d+ ([\w.\-]+)(?:\{[\d,]*\})?"
      r"(?: \(phi\))? @\d+> \(size=(\d+),offset=\d+\): (.*)$",
      line,
    )
    if not value or kind in ("constant", "on-chip"):
      continue
    name, size = value.group(1), int(value.group(2))
    if name in seen:  # A value may sit in more than one allocation.
      continue
    seen.add(name)
    if kind == "argument":
      if getattr(made_by.get(name), "opcode", "parameter") != "parameter":
        continue  # A result written over its donated argument's memory.
      label = (argument_labels or {}).get(
        int(parameter.group(1)), f"argument {parameter.group(1)}"
      )
    else:
      label = describe(_source(made_by, made_by.get(name)))
    key = (size, re.sub(r"\{[^}]*\}", "", value.group(3)), kind, label)
    groups[key] = groups.get(key, 0) + 1
  buffers = [Buffer(*key, count=n) for key, n in groups.items()]
  buffers.sort(key=lambda b: (-b.bytes, -b.count))
  return buffers[:count]


def _source(made_by: dict, inst: Optional[Instruction]):
  """The instruction that computed what `inst` copies, for the copies XLA
  adds between memory spaces (they carry no metadata of their own)."""
  for _ in range(8):
    if (
      inst is None
      or inst.op_name
      or not inst.operands
      or inst.opcode
      not in ("copy", "copy-start", "copy-done", "bitcast", "get-tuple-element")
    ):
      return inst
    inst = made_by.get(inst.operands[0])
  return inst


def describe(inst: Optional[Instruction]) -> str:
  """A buffer's maker: the innermost of our named scopes in its op_name
  (and whether the backward pass made it) and the op, else the op alone."""
  if inst is None:
    return "(unknown)"
  parts = inst.op_name.split("/") if inst.op_name else []
  op = parts[-1] if parts else inst.opcode
  scope = next((p for p in reversed(parts) if p in SCOPES), None)
  backward = " (backward)" if "transpose(" in inst.op_name else ""
  return f"{scope}{backward}: {op}" if scope else f"{op}{backward}"
