"""Fuse chains of pointwise and last-dim row ops of a lowered graph into generated Triton kernels.

Every fused group works on one domain: its values seen as a row-major ``[R, C]`` matrix, C the
group's last dim and R = numel / C. Each value is one of four kinds, which fixes how a kernel
program (one row r) reads it:

* ``full``   numel R*C, last dim C (made ``.contiguous()``): offset r*C + c;
* ``col``    a last-dim vector ([C] or [1, .., 1, C], e.g. a bias): offset c;
* ``row``    [..., 1] with the full leading dims (a keepdim row reduction): offset r;
* ``scalar`` numel 1: offset 0.

Rules (``find_groups``), which keep a kernel on local shards equal to the ops it replaces:

1. A member is an ATen op that runs through DTensor (op node + its ``check``): a pointwise op, a
   view/reshape that keeps the last dim (row-major order is unchanged), a cast or clone, or a row
   op over the last dim only (``native_layer_norm`` with only output 0 used, softmax, keepdim
   mean/sum/amax). ``local_call`` and the other markers never join.
2. Every member's output is ``full`` or ``row``; every external input is classifiable as one of
   the four kinds, with placements that match the output's (so each rank's shards line up); no
   value has a ``P(..)`` placement; a row op's input is not sharded on its last dim, and C <= 16384.
3. A node joins a group only if none of its external inputs depends on the group (checked on the
   graph, then once more on the graph with groups contracted): fused, the graph stays acyclic.
4. A group needs two compute ops (views, casts and clones don't count) or one row op.

Groups grow greedily in graph order: a node joins its producers' groups merged into one, else the
latest producer's group, else starts a group; values read outside become extra outputs. Where the
kernel cannot run (no Triton, a CPU tensor without the interpreter) the same op list runs in torch.

Kernel form (``kernel_source``): one ``@triton.jit`` function per group signature, generated as
text, cached by the sha256 of that text under ``$AUTOPAR_CACHE_DIR/kernels/<hash>.py`` (triton.jit
reads its source from a file). Program r computes row r in fp32 and stores each output in its own
dtype; masks cover C that is not a power of two. Pointwise groups loop over column blocks (their
per-row values are computed once, before the loop); groups with a row op hold the whole row in
one block. R and C are arguments, so one kernel serves every rank's shard shape.

Backward recomputes the group with eager torch from the saved inputs (``torch.autograd.grad`` on
the same op list the kernel was generated from). Inductor's partitioner makes the same choice for
pointwise ops: recomputing is cheaper than reading saved intermediates, and only the inputs are kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import importlib.util
import math
import operator
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import AutoparError
from ..passes.strategies import op_name, to_dtensor_placement
from ..placements import Placement, parse
from . import lower as L
from .triton_support import KERNEL_DTYPES, interpreted, kernel_runs, triton

MAX_ROW = 16384  # a row op keeps the whole row in one block
POINTWISE_BLOCK = 1024


class Ref(NamedTuple):
    """Operand i of a program: its inputs first, then each instruction's result."""
    i: int


class Input(NamedTuple):
    kind: str  # "full" | "col" | "row" | "scalar"
    is_bool: bool  # a where condition (or a cast's source): loaded as a predicate
    zero_dim: bool  # a 0-dim tensor: its eager type promotion differs from a [1] tensor's


@dataclasses.dataclass(frozen=True)
class Program:
    """A group in the [R, C] domain; ``kernel_source`` and ``_eager`` both read it."""
    pattern: str  # "pointwise" | "row"
    inputs: tuple[Input, ...]
    instrs: tuple[tuple, ...]  # (op, args, kind): args hold Refs and constants
    outputs: tuple[int, ...]  # operand index of each output, full outputs first
    out_kinds: tuple[str, ...]


# op -> (its torch form, for the eager path and backward; its Triton expression, None: _instr)
_OPS = {
    "add": (lambda x, y, alpha: torch.add(x, y, alpha=alpha), "{0} + {2} * {1}"),
    "sub": (lambda x, y, alpha: torch.sub(x, y, alpha=alpha), "{0} - {2} * {1}"), "mul": (torch.mul, "{0} * {1}"),
    "div": (torch.div, "{0} / {1}"), "neg": (torch.neg, "-{0}"), "exp": (torch.exp, "tl.exp({0})"),
    "log": (torch.log, "tl.log({0})"), "tanh": (torch.tanh, "2.0 * tl.sigmoid(2.0 * {0}) - 1.0"),
    "sigmoid": (torch.sigmoid, "tl.sigmoid({0})"), "relu": (torch.relu, "tl.where({0} > 0.0, {0}, 0.0)"),
    "silu": (F.silu, "{0} * tl.sigmoid({0})"), "rsqrt": (torch.rsqrt, "tl.rsqrt({0})"),
    "sqrt": (torch.sqrt, "tl.sqrt({0})"), "reciprocal": (torch.reciprocal, "1.0 / {0}"),
    "abs": (torch.abs, "tl.abs({0})"), "erf": (torch.erf, "tl.erf({0})"),
    "gelu": (F.gelu, "0.5 * {0} * (1.0 + tl.erf({0} * 0.7071067811865476))"),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"),
                  "{0} * tl.sigmoid(1.5957691216057308 * ({0} + 0.044715 * {0} * {0} * {0}))"),
    "where": (torch.where, "tl.where({0}, {1}, {2})"), "copy": (lambda x: x, "{0}"),
    "maximum": (torch.maximum, "tl.maximum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)"),
    "minimum": (torch.minimum, "tl.minimum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)"),
    "pow": (torch.pow, None), "cast": (lambda x, dtype: x if dtype is None else x.to(dtype), None),
    "layer_norm": (lambda x, w, b, eps: F.layer_norm(x, x.shape[-1:], w, b, eps), None),
    "softmax": (lambda x, dtype: torch.softmax(x, -1, dtype=dtype), None),
    "mean": (lambda x: x.mean(-1, keepdim=True), None), "sum": (lambda x: x.sum(-1, keepdim=True), None),
    "amax": (lambda x: x.amax(-1, keepdim=True), None),
}
_UNARY = ("neg", "exp", "log", "tanh", "sigmoid", "relu", "silu", "rsqrt", "sqrt", "reciprocal", "abs", "erf")
_VIEWS = ("aten.reshape.default", "aten.view.default", "aten._unsafe_view.default")


def _last_dim_only(x: torch.Tensor, dims) -> bool:
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    return len(dims) == 1 and dims[0] % x.dim() == x.dim() - 1


def _canon(n: fx.Node) -> tuple[str, tuple] | None:
    """(role, (op, *operands)) of one ATen node in the domain, or None if it is not fusible; role
    is "compute", "view", "cast" (casts and clones) or "row"."""
    name = op_name(n)
    base, overload = (name.split(".") + ["", ""])[1:3]
    a, kw = n.args, n.kwargs
    x = a[0].meta.get("val") if a and isinstance(a[0], fx.Node) else None
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    if base in _UNARY and overload == "default" and not kw:
        return "compute", (base, a[0])
    if base in ("add", "sub", "mul", "div") and overload in ("Tensor", "Scalar") and set(kw) <= {"alpha"}:
        return "compute", (base, a[0], a[1], kw.get("alpha", 1)) if base in ("add", "sub") else (base, a[0], a[1])
    if name in ("aten.maximum.default", "aten.minimum.default", "aten.where.self"):
        return "compute", (base, *a)
    if name == "aten.gelu.default":
        return "compute", ("gelu_tanh" if kw.get("approximate", "none") == "tanh" else "gelu", a[0])
    if name == "aten.pow.Tensor_Scalar" and isinstance(a[1], (int, float)) and _pow_expr("x", a[1]):
        return "compute", ("pow", a[0], a[1])
    if name in _VIEWS or name == "aten.clone.default":
        return "view" if name in _VIEWS else "cast", ("copy", a[0])
    if name in ("aten._to_copy.default", "aten.to.dtype"):
        dtype = a[1] if name == "aten.to.dtype" else kw.get("dtype")
        extra = [v for k, v in kw.items() if k not in ("dtype", "non_blocking", "copy", "memory_format")]
        ok = all(v in (None, False, torch.strided, x.device) for v in extra) and dtype in (None, *KERNEL_DTYPES)
        return ("cast", ("cast", a[0], dtype)) if ok else None
    if name == "aten.native_layer_norm.default" and list(a[1]) == [x.shape[-1]]:
        return "row", ("layer_norm", a[0], a[2], a[3], float(a[4]))
    if name in ("aten._softmax.default", "aten.softmax.int") and _last_dim_only(x, a[1]):
        dtype = (torch.float32 if a[2] else None) if base == "_softmax" else (a[2] if len(a) > 2 else kw.get("dtype"))
        return "row", ("softmax", a[0], dtype)
    if name in ("aten.mean.dim", "aten.sum.dim_IntList", "aten.amax.default") and len(a) > 1 and \
            _last_dim_only(x, a[1]) and (a[2] if len(a) > 2 else kw.get("keepdim")) and kw.get("dtype") is None:
        return "row", (base, a[0])
    return None


def _value(n: fx.Node) -> fx.Node | None:
    """The node that consumers of ATen node ``n`` read (its check, or output 0 of a layer norm)."""
    if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload) or len(n.users) != 1:
        return None
    (c,) = n.users
    if c.target is not L.check:
        return None
    if n.target is not torch.ops.aten.native_layer_norm.default:
        return c
    first = [u for u in c.users if u.target is operator.getitem and u.args[1] == 0]
    rest = [u for u in c.users if u not in first]
    return first[0] if len(first) == 1 and not any(u.users for u in rest) else None


def _placed(node: fx.Node, ndim: int):
    """The planned placements with S dims made non-negative; None if unknown or partial."""
    pls = [parse(s) for s in node.meta.get(L.META_PLACED) or ("P(sum)",)]
    if any(q.kind == "P" for q in pls):
        return None
    return tuple(Placement("S", q.dim % ndim) if q.kind == "S" else q for q in pls)


def _external_kind(v, ipl, out, opl, role, N: int, C: int) -> str | None:
    """The kind of an input from outside the group (placements that line up shard by shard), or None."""
    R, nd, last, R_ = N // C, out.dim(), v.shape[-1] if v.dim() else 1, Placement("R")
    if role == "view":  # the view's own sharding rule maps its input's shards
        return "full" if v.numel() == N and last == C else "row" if v.numel() == R and last == 1 else None
    lead = tuple(out.shape[:-1])
    if v.dim() == nd and tuple(v.shape) == (*lead, C) and ipl == opl:
        return "full"
    if v.numel() == C == last and v.dim() <= nd and all(
            q == (Placement("S", v.dim() - 1) if p == Placement("S", nd - 1) else R_) for q, p in zip(ipl, opl)):
        return "col"
    if v.dim() == nd and tuple(v.shape) == (*lead, 1) and all(
            q == (p if p.kind == "S" and p.dim < nd - 1 else R_) for q, p in zip(ipl, opl)):
        return "row"
    return "scalar" if v.numel() == 1 and all(q == R_ for q in ipl) else None


class Member(NamedTuple):
    node: fx.Node  # the ATen op
    value: fx.Node  # what its consumers read
    role: str
    step: tuple  # (op, *operands), operands fx.Nodes or constants


@dataclasses.dataclass(eq=False)
class Group:
    """Fused members (graph order) and the domain [N // C, C] they share."""
    N: int
    C: int
    members: list = dataclasses.field(default_factory=list)
    values: dict = dataclasses.field(default_factory=dict)  # value node -> "full" | "row"
    inputs: dict = dataclasses.field(default_factory=dict)  # external input node -> Input
    nodes: set = dataclasses.field(default_factory=set)  # every graph node the group replaces
    outputs: list = dataclasses.field(default_factory=list)  # value nodes read outside the group
    program: Program | None = None

    @property
    def origins(self) -> list[str]:
        return [m.node.meta.get(L.META_ORIGIN, m.node.name) for m in self.members]

    def admit(self, m: Member):
        """(kind of m's output, its new external inputs) if ``m`` can join, else None."""
        N, C, (op, *operands) = self.N, self.C, m.step
        out = m.value.meta.get("val")
        if not isinstance(out, torch.Tensor) or out.dtype not in KERNEL_DTYPES or out.dim() == 0:
            return None
        kind = "full" if out.numel() == N and out.shape[-1] == C else \
            "row" if out.numel() == N // C and out.shape[-1] == 1 else None
        opl = _placed(m.value, out.dim())
        if kind is None or opl is None or m.role == "row" and kind != ("full" if op in ("layer_norm", "softmax") else "row"):
            return None
        kinds, new = [], {}
        for i, t in enumerate(x for x in operands if isinstance(x, fx.Node)):
            v = t.meta.get("val")
            ipl = _placed(t, max(v.dim(), 1)) if isinstance(v, torch.Tensor) else None
            boolean = ipl is not None and v.dtype == torch.bool and (op == "cast" or (op, i) == ("where", 0))
            if ipl is None or not (v.dtype in KERNEL_DTYPES or boolean):
                return None
            k = self.values.get(t) or _external_kind(v, ipl, out, opl, m.role, N, C)
            if k is None or (t in self.inputs and self.inputs[t].kind != k):
                return None
            if t not in self.values:
                new[t] = Input(k, boolean, v.dim() == 0)
            if m.role == "row" and i == 0 and (k != "full" or Placement("S", v.dim() - 1) in ipl):
                return None  # a row op reads whole rows: its input's last dim must not be sharded
            kinds.append(k)
        if m.role == "view" and kinds != [kind] or m.role == "row" and (C > MAX_ROW or set(kinds[1:]) - {"col"}):
            return None
        if kind == "row" and m.role != "row" and {"full", "col"} & set(kinds):
            return None
        return kind, new

    def add(self, m: Member, kind: str, new: dict) -> None:
        self.members.append(m)
        self.values[m.value] = kind
        self.inputs.update(new)
        (check,) = m.node.users
        self.nodes |= {m.node, check, m.value} | (set(check.users) if m.value is not check else set())

    def merged(self, other: Group, pos: dict) -> Group | None:
        """One group with the members of both, if they share a domain and no cycle forms."""
        if (self.N, self.C) != (other.N, other.C):
            return None
        for a, b in ((self, other), (other, self)):
            if any(a.values[t] != b.inputs[t].kind for t in b.inputs if t in a.values) or \
                    any(_depends(t, a, pos) for t in b.inputs if t not in a.values):
                return None
        values = {**self.values, **other.values}
        return Group(self.N, self.C, sorted(self.members + other.members, key=lambda m: pos[m.node]), values,
                     {t: i for t, i in {**self.inputs, **other.inputs}.items() if t not in values},
                     self.nodes | other.nodes)

    def finish(self) -> None:
        """Outputs (full ones first) and the program."""
        ref = {t: Ref(i) for i, t in enumerate(self.inputs)}
        instrs = []
        for m in self.members:
            op, *args = m.step
            instrs.append((op, tuple(ref[a] if isinstance(a, fx.Node) else a for a in args), self.values[m.value]))
            ref[m.value] = Ref(len(self.inputs) + len(instrs) - 1)
        used = [v for v in self.values if any(u not in self.nodes for u in v.users)]
        self.outputs = sorted(used, key=lambda v: self.values[v] != "full")
        self.program = Program("row" if any(m.role == "row" for m in self.members) else "pointwise",
                               tuple(self.inputs.values()), tuple(instrs), tuple(ref[v].i for v in self.outputs),
                               tuple(self.values[v] for v in self.outputs))


def _depends(x: fx.Node, g: Group, pos: dict) -> bool:
    """Whether ``x`` reads (transitively) a node of ``g``."""
    stack, seen, lo = [x], set(), pos[g.members[0].node]
    while stack:
        y = stack.pop()
        if y in g.nodes:
            return True
        if y not in seen and pos[y] >= lo:
            seen.add(y)
            stack.extend(y.all_input_nodes)
    return False


def find_groups(lowered: fx.GraphModule | fx.Graph) -> list[Group]:
    """The fusible groups of a lowered graph (module docstring), in graph order; pure analysis."""
    nodes = list((lowered.graph if isinstance(lowered, fx.GraphModule) else lowered).nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    owner: dict[fx.Node, Group] = {}
    groups: list[Group] = []
    for n in nodes:
        value = _value(n)
        canon = _canon(n) if value is not None else None
        if canon is None:
            continue
        m = Member(n, value, *canon)
        # all producer groups merged into one first, then the latest producer's group (a residual
        # add joins its branch, not the stream), then a new group
        producers = sorted({owner[t] for t in n.all_input_nodes if t in owner}, key=lambda g: -pos[g.members[-1].node])
        both = producers[0] if producers else None
        for other in producers[1:]:
            both = both.merged(other, pos) or both
        seed = (n.args[0] if m.role == "row" else value).meta.get("val")
        for g in [*([both] if both not in producers else []), *producers, None]:
            if g is None:
                if not isinstance(seed, torch.Tensor) or seed.dim() == 0 or seed.shape[-1] < 2:
                    break
                g = Group(seed.numel(), seed.shape[-1])
            got = g.admit(m)
            if got is None or (g.members and any(_depends(t, g, pos) for t in got[1])):
                continue
            g.add(m, *got)
            groups = [h for h in groups if h.members[0] not in g.members] + [g]
            owner.update((v, g) for v in g.values)
            break
    worth = [g for g in groups if sum(m.role == "compute" for m in g.members) >= 2 or any(m.role == "row" for m in g.members)]
    groups = _acyclic(sorted(worth, key=lambda g: pos[g.members[0].node]), nodes)
    for g in groups:
        g.finish()
    return groups


def _acyclic(groups: list[Group], nodes: list) -> list[Group]:
    """Drop groups until the graph with each group contracted to one node has no cycle."""
    while True:
        rep = {x: g for g in groups for x in g.nodes}
        keys = list(dict.fromkeys(rep.get(x, x) for x in nodes))
        preds = {k: set() for k in keys}
        for x in nodes:
            preds[rep.get(x, x)] |= {rep.get(y, y) for y in x.all_input_nodes} - {rep.get(x, x)}
        done = set(_topo(keys, preds))
        if all(g in done for g in groups):
            return groups
        groups.remove([g for g in groups if g not in done][-1])


def _topo(items: list, preds: dict) -> list:
    """``items`` with each after its ``preds``, otherwise in their order; shorter if there is a cycle."""
    pos, left, succs = {x: i for i, x in enumerate(items)}, {x: len(preds[x]) for x in items}, {x: [] for x in items}
    for x in items:
        for p in preds[x]:
            succs[p].append(x)
    ready, order = [pos[x] for x in items if not left[x]], []
    heapq.heapify(ready)
    while ready:
        order.append(items[heapq.heappop(ready)])
        for x in succs[order[-1]]:
            left[x] -= 1
            if not left[x]:
                heapq.heappush(ready, pos[x])
    return order


def _const(x) -> str:
    if x is None or isinstance(x, (bool, torch.dtype)):
        return repr(x)
    return repr(float(x)) if math.isfinite(x) else f'float("{x}")'


def _pow_expr(x: str, e) -> str | None:
    if not math.isfinite(e):
        return None
    if float(e) == int(e) and abs(int(e)) <= 8:
        e = int(e)
        prod = " * ".join([x] * abs(e)) or "1.0"
        return prod if e >= 0 else f"1.0 / ({prod})"
    if e in (0.5, -0.5):
        return f"tl.sqrt({x})" if e > 0 else f"tl.rsqrt({x})"
    return f"tl.exp({_const(e)} * tl.log({x}))" if not float(e).is_integer() else None


def _instr(k: int, op: str, args: tuple) -> list[str]:
    """Lines computing ``v{k}`` in the kernel."""
    a = [f"v{x.i}" if isinstance(x, Ref) else _const(x) for x in args]
    v, x = f"v{k}", a[0]
    masked = f"tl.where(mask, {x}, 0.0)"
    if op == "layer_norm":
        lines = [f"m{k} = tl.sum({masked}, axis=0) / C", f"d{k} = tl.where(mask, {x} - m{k}, 0.0)",
                 f"{v} = d{k} * tl.rsqrt(tl.sum(d{k} * d{k}, axis=0) / C + {a[3]})"]
        return lines + [f"{v} = {v} * {a[1]}"] * (a[1] != "None") + [f"{v} = {v} + {a[2]}"] * (a[2] != "None")
    if op == "softmax":
        return [f"e{k} = tl.where(mask, tl.exp({x} - tl.max(tl.where(mask, {x}, -float('inf')), axis=0)), 0.0)",
                f"{v} = e{k} / tl.sum(e{k}, axis=0)"]
    if op in ("mean", "sum"):
        return [f"{v} = tl.sum({masked}, axis=0)" + " / C" * (op == "mean")]
    if op == "amax":
        return [f"{v} = tl.max(tl.where(mask, {x}, -float('inf')), axis=0)"]
    if op == "pow":
        return [f"{v} = {_pow_expr(x, args[1])}"]
    if op == "cast" and args[1] == torch.bfloat16:  # round to nearest even by hand: the interpreter truncates
        return [f"{v} = {x}.to(tl.float32)", f"b{k} = {v}.to(tl.uint32, bitcast=True)",
                f"b{k} = ((b{k} + 32767 + ((b{k} >> 16) & 1)) >> 16) << 16",
                f"{v} = tl.where({v} != {v}, {v}, b{k}.to(tl.float32, bitcast=True))"]
    if op == "cast":
        return [f"{v} = {x}.to(tl.float32)" + (".to(tl.float16).to(tl.float32)" if args[1] == torch.float16 else "")]
    template = _OPS[op][1]
    if op in ("add", "sub") and args[2] == 1:
        template = template.replace("{2} * ", "")
    return [f"{v} = " + template.format(*a)]


def kernel_source(prog: Program) -> str:
    """The generated module text of ``prog``'s kernel (module docstring: kernel form)."""
    n_in = len(prog.inputs)
    offset = {"full": " + base + col", "col": " + col", "row": " + row", "scalar": ""}
    ins, outs = [f"in{i}" for i in range(n_in)], [f"out{k}" for k in range(len(prog.outputs))]
    head, body = [], []  # head: once per row; body: per column block (the whole row for row ops)
    per_block = lambda kind: prog.pattern == "row" or kind in ("full", "col")  # noqa: E731
    for i, inp in enumerate(prog.inputs):
        mask = ", mask=mask, other=0" if inp.kind in ("full", "col") else ""
        load = f"tl.load(in{i}{offset[inp.kind]}{mask})" + (" != 0" if inp.is_bool else ".to(tl.float32)")
        (body if per_block(inp.kind) else head).append(f"v{i} = {load}")
    for k, (op, args, kind) in enumerate(prog.instrs):
        (body if per_block(kind) else head).extend(_instr(n_in + k, op, args))
    for k, (i, kind) in enumerate(zip(prog.outputs, prog.out_kinds)):
        mask = ", mask=mask" if kind == "full" else ""
        store = f"tl.store(out{k}{offset[kind]}, v{i}.to(out{k}.dtype.element_ty){mask})"
        (body if per_block(kind) else head).append(store)
    lines = ["# Generated by autopar/codegen/fusion.py: one program per row of the [R, C] domain.",
             "import triton", "import triton.language as tl", "", "",
             "@triton.jit", f"def fused_kernel({', '.join(ins + outs)}, R, C, BLOCK: tl.constexpr):",
             "    row = tl.program_id(0).to(tl.int64)", "    base = row * C"]
    if prog.pattern == "row":
        lines += ["    col = tl.arange(0, BLOCK)", "    mask = col < C"] + [f"    {s}" for s in head + body]
    else:
        lines += [f"    {s}" for s in head] + ["    for start in range(0, C, BLOCK):",
                                                "        col = start + tl.arange(0, BLOCK)",
                                                "        mask = col < C"] + [f"        {s}" for s in body]
    return "\n".join(lines) + "\n"


_KERNELS: dict[str, object] = {}  # sha256 of the source -> the loaded triton.jit function


def _load(source: str, digest: str):
    if digest not in _KERNELS:
        root = Path(os.environ.get("AUTOPAR_CACHE_DIR") or Path.home() / ".cache" / "autopar").expanduser()
        path = root / "kernels" / f"{digest}.py"
        if not path.exists() or path.read_text() != source:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(source)
            os.replace(tmp, path)  # atomic: ranks that share the cache may write at once
        spec = importlib.util.spec_from_file_location(f"autopar_kernel_{digest[:16]}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _KERNELS[digest] = module.fused_kernel
    return _KERNELS[digest]


@dataclasses.dataclass(frozen=True, eq=False)
class FusedOp:
    """What a fused ``local_call`` runs: the kernel, and the group's outputs (global shapes, dtypes
    and planned placements, from which each rank's local shapes follow)."""
    program: Program
    source: str
    digest: str
    C: int
    out_shapes: tuple
    out_dtypes: tuple
    out_placements: tuple

    def __repr__(self) -> str:  # a valid name in the lowered graph's printed code
        return f"fused_{self.digest[:8]}"


def _local_shapes(op: FusedOp, mesh) -> list[tuple]:
    if mesh is None:
        return [tuple(s) for s in op.out_shapes]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return [tuple(compute_local_shape_and_global_offset(s, mesh, [to_dtensor_placement(parse(p)) for p in pls])[0])
            for s, pls in zip(op.out_shapes, op.out_placements)]


def _domain(op: FusedOp, shapes, args) -> tuple[int, int]:
    """Local [R, C] from the local output shapes; raises if an input's size does not fit its kind."""
    full = [s for s, k in zip(shapes, op.program.out_kinds) if k == "full"]
    C = full[0][-1] if full else op.C  # without a full output the group has a row op: C is not sharded
    R = (math.prod(full[0]) // C if C else 0) if full else math.prod(shapes[0])
    want = {"full": R * C, "col": C, "row": R, "scalar": 1}
    for i, (x, inp) in enumerate(zip(args, op.program.inputs)):
        if x.numel() != want[inp.kind]:
            raise AutoparError(f"{op!r}: input {i} ({inp.kind}) has {x.numel()} elements on this rank, expected "
                               f"{want[inp.kind]} for the [R, C] = [{R}, {C}] domain; run with fusion=False")
    return R, C


def uses_kernel(op: FusedOp, args) -> bool:
    """True when the Triton kernel runs for these local tensors (else the eager ops run)."""
    devices = {x.device for x in args}
    return triton is not None and len(devices) == 1 and all(
        kernel_runs(x) or (x.dtype == torch.bool and (x.is_cuda or interpreted())) for x in args) and \
        all(d in KERNEL_DTYPES for d in op.out_dtypes)


def _eager(op: FusedOp, shapes, args, R: int, C: int) -> list[torch.Tensor]:
    """The group's ops with torch, on the domain's views of the inputs."""
    view = {"full": (R, C), "col": (C,), "row": (R, 1)}
    vals = [x.reshape(view.get(i.kind) or (() if i.zero_dim else (1,))) for x, i in zip(args, op.program.inputs)]
    for name, a, _ in op.program.instrs:
        vals.append(_OPS[name][0](*[vals[x.i] if isinstance(x, Ref) else x for x in a]))
    return [vals[i].reshape(s) for i, s in zip(op.program.outputs, shapes)]


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, shapes, *args):
        ctx.op, ctx.shapes = op, shapes
        ctx.save_for_backward(*args)  # only the inputs: backward recomputes (module docstring)
        R, C = _domain(op, shapes, args)
        if not uses_kernel(op, args) or (op.program.pattern == "row" and C > MAX_ROW):
            seen, outs = {x.untyped_storage().data_ptr() for x in args}, []
            for o in _eager(op, shapes, args, R, C):  # no output may alias an input or another output
                outs.append(o.clone() if o.untyped_storage().data_ptr() in seen else o)
                seen.add(o.untyped_storage().data_ptr())
            return tuple(outs)
        ins = [x.contiguous() for x in args]
        outs = tuple(torch.empty(s, dtype=d, device=ins[0].device) for s, d in zip(shapes, op.out_dtypes))
        if R * C > 0:
            block = triton.next_power_of_2(C)
            block = block if op.program.pattern == "row" else min(block, POINTWISE_BLOCK)
            _load(op.source, op.digest)[(R,)](*ins, *outs, R, C, BLOCK=block, num_warps=4 if block <= 2048 else 8)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        leaves = [x.detach().requires_grad_(need) for x, need in zip(ctx.saved_tensors, ctx.needs_input_grad[2:])]
        wanted = [x for x in leaves if x.requires_grad]
        R, C = _domain(ctx.op, ctx.shapes, leaves)
        with torch.enable_grad():
            outs = _eager(ctx.op, ctx.shapes, leaves, R, C)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                   if pairs and wanted else [None] * len(wanted))
        return (None, None, *[next(got) if x.requires_grad else None for x in leaves])


def run_fused(op: FusedOp, mesh, args):
    """Run a fused group on this rank's local tensors (``mesh`` None: the global shapes)."""
    outs = _Fused.apply(op, _local_shapes(op, mesh), *args)
    return outs if len(outs) > 1 else outs[0]


def choose_backend(device_type: str) -> tuple[str, str]:
    """(backend, reason): "triton", "triton-interpreter" or "torch" (the unfused ops run)."""
    if triton is None:
        return "torch", "triton is not installed: the unfused torch ops run"
    if device_type == "cuda":
        return "triton", "CUDA device with triton: fused groups run as generated Triton kernels"
    if device_type == "cpu" and interpreted():
        return "triton-interpreter", "TRITON_INTERPRET=1: the generated kernels run in Triton's CPU interpreter"
    return "torch", f"no CUDA device ({device_type}): the unfused torch ops run"


def fuse(gm: fx.GraphModule | fx.Graph, backend: str, reason: str = "") -> dict:
    """Find the groups; unless ``backend`` is "torch", replace each by one fused ``local_call``
    (in place; that needs the GraphModule, to recompile it). Returns the plan's JSON record of the
    kernels, deduplicated by source hash."""
    if backend != "torch" and not isinstance(gm, fx.GraphModule):
        raise TypeError("fuse replaces groups in a GraphModule (and recompiles it); a bare Graph is only analysed")
    kernels: dict[str, dict] = {}
    moved: dict[fx.Node, fx.Node] = {}  # an earlier group's output -> the node that now holds it
    for g in find_groups(gm):
        source = kernel_source(g.program)
        digest = hashlib.sha256(source.encode()).hexdigest()
        entry = kernels.setdefault(digest, {"name": f"fused_{digest[:8]}", "hash": digest, "pattern": g.program.pattern,
                                            "ops": [op_name(m.node) for m in g.members], "groups": []})
        entry["groups"].append(g.origins)
        if backend != "torch":
            vals = [v.meta["val"] for v in g.outputs]
            op = FusedOp(g.program, source, digest, g.C, tuple(tuple(v.shape) for v in vals),
                         tuple(v.dtype for v in vals), tuple(v.meta[L.META_PLACED] for v in g.outputs))
            moved |= _replace(gm.graph, g, [moved.get(t, t) for t in g.inputs], op)
    if backend != "torch" and kernels:
        _toposort(gm.graph)
        gm.graph.lint()
        gm.recompile()
    return {"backend": backend, "reason": reason or f"backend {backend!r}", "kernels": list(kernels.values())}


def _replace(graph: fx.Graph, g: Group, inputs: list, op: FusedOp) -> dict:
    """Put one fused ``local_call`` (and a getitem per output if several) in ``g``'s place."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    with graph.inserting_after(max(g.nodes, key=order.__getitem__)):
        new = graph.call_function(L.local_call, ((L.FUSED, op), op.out_placements, tuple(inputs), {}))
    new.meta.update({"val": tuple(v.meta["val"] for v in g.outputs), L.META_ORIGIN: g.origins[-1]})
    holders = [new]
    for k in range(len(g.outputs) if len(g.outputs) > 1 else 0):
        with graph.inserting_after(holders[-1]):
            holders.append(graph.call_function(operator.getitem, (new, k)))
    for h, v in zip(holders[len(holders) > 1:], g.outputs):
        h.meta.update({m: v.meta[m] for m in ("val", L.META_PLACED, L.META_ORIGIN) if m in v.meta})
        v.replace_all_uses_with(h)
    for x in sorted(g.nodes, key=order.__getitem__, reverse=True):
        graph.erase_node(x)
    return dict(zip(g.outputs, holders[len(holders) > 1:]))


def _toposort(graph: fx.Graph) -> None:
    """Put each node after its inputs, otherwise keeping the order (a fused node sits after its
    group's last member: readers of earlier members' values move after it)."""
    nodes = list(graph.nodes)
    order = _topo(nodes, {n: set(n.all_input_nodes) for n in nodes})
    if len(order) != len(nodes):
        raise AutoparError("fusion made the lowered graph cyclic; compile with fusion=False")
    for a, b in zip(order, order[1:]):
        if a.next is not b:
            a.append(b)
