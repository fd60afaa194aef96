"""Enumerate per-node sharding strategies on an N-D mesh.

This is the one adapter to PyTorch's private DTensor op-strategy registries
(``ShardingPropagator.op_strategy_funcs`` and ``op_single_dim_strategy_funcs``). Everything that
leaves this module is autopar's own data: a ``Strategy`` is a tuple of placements for each output
and each tensor input, one placement per mesh axis.

Rules, in order of precedence:

1. autopar's own rules (``OWN_RULES``): attention (``scaled_dot_product_attention``), which
   DTensor does not cover on CPU;
2. DTensor's single-dim rules, expanded over the mesh here (every combination of per-axis rules);
3. DTensor's full-mesh strategy functions, fed with every candidate placement of each input;
4. otherwise Replicate everywhere, with a warning naming the op.

A dim is never sharded unless the product of the axis sizes sharding it divides it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..placements import REPLICATE, Placement, partial, shard

Pl = tuple  # tuple[Placement, ...]: one placement per mesh axis


@dataclass(frozen=True)
class Strategy:
    """One way to run a node: where each output lives and where each tensor input must be."""

    outs: tuple  # tuple[Pl | None, ...], one per output (None for a non-tensor output)
    ins: tuple  # tuple[Pl, ...], one per tensor input, in flattened argument order
    source: str = "dtensor"  # which rule produced it: "dtensor", "autopar", "input", "fallback"


SKIP_OPS = {"aten._assert_tensor_metadata.default", "aten._assert_scalar.default", "aten.sym_constrain_range_for_size.default"}
VIEW_OPS = {"aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.permute.default",
            "aten.transpose.int", "aten.t.default", "aten.expand.default", "aten.unsqueeze.default",
            "aten.squeeze.dim", "aten.squeeze.dims", "aten.slice.Tensor", "aten.select.int", "aten.alias.default",
            "aten.split.Tensor", "aten.split_with_sizes.default", "aten.unbind.int", "aten.detach.default"}


# Ops that DTensor runs through custom handlers which cannot shard one dim over two axes
# (its convolution handler raises on [Shard(0), Shard(0)]), whatever its strategy says.
NO_NESTED_SHARDING = {"aten.convolution.default", "aten.convolution_backward.default"}


def _nested(pl) -> bool:
    dims = [p.dim for p in pl if p.kind == "S"]
    return len(dims) != len(set(dims))


def op_name(node: fx.Node) -> str:
    t = node.target
    return str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The fx nodes feeding tensors into ``node``, in flattened (args, kwargs) order."""
    leaves = pytree.tree_leaves((node.args, node.kwargs))
    return [a for a in leaves if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)]


def outputs_meta(node: fx.Node) -> tuple:
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return tuple(v if isinstance(v, torch.Tensor) else None for v in val)
    return (val if isinstance(val, torch.Tensor) else None,)


def divides(shape, pl: Pl, axis_sizes: tuple[int, ...]) -> bool:
    """True if every sharded dim of ``shape`` is divisible by the product of the axes sharding it."""
    per_dim: dict[int, int] = {}
    for p, n in zip(pl, axis_sizes):
        if p.kind == "S":
            if not (-len(shape) <= p.dim < len(shape)):
                return False
            d = p.dim % len(shape)
            per_dim[d] = per_dim.get(d, 1) * n
    return all(shape[d] % n == 0 for d, n in per_dim.items())


def tensor_candidates(shape, axis_sizes: tuple[int, ...]) -> list[Pl]:
    """Every placement of a leaf tensor (input or parameter): R or S(d) per axis, divisible only."""
    per_axis = [[REPLICATE] + [shard(d) for d in range(len(shape)) if n > 1 and shape[d] % n == 0] if n > 1 else [REPLICATE]
                for n in axis_sizes]
    return [pl for pl in itertools.product(*per_axis) if divides(shape, pl, axis_sizes)]


# ---------------------------------------------------------------------------------------------
# DTensor adapter: private APIs live below this line only.
# ---------------------------------------------------------------------------------------------

def _dt():
    from torch.distributed.tensor import DTensor

    return DTensor._op_dispatcher.sharding_propagator


_COST_MODULES = ("torch.distributed.tensor._ops.utils", "torch.distributed.tensor._collective_utils",
                 "torch.distributed.tensor._utils")


@contextlib.contextmanager
def _without_dtensor_costs():
    """DTensor's rules price every (input candidate, strategy) pair for their own use; autopar
    prices redistributions itself (annotate.CostContext), so those prices are skipped: on a 3-D
    mesh they are most of the rules' time. The strategies a rule returns are the same."""
    import sys

    mods = [m for m in (sys.modules.get(n) for n in _COST_MODULES) if m is not None and hasattr(m, "redistribute_cost")]
    saved = [m.redistribute_cost for m in mods]
    for m in mods:
        m.redistribute_cost = _zero_cost
    try:
        yield
    finally:
        for m, f in zip(mods, saved):
            m.redistribute_cost = f


def _zero_cost(src_spec, dst_spec) -> float:
    return 0.0


def redistribute_steps(axes: dict[str, int], src: Pl, dst: Pl, shape: tuple, itemsize: int) -> list[tuple]:
    """The steps DTensor takes to move a tensor from ``src`` to ``dst`` placements, in its order:
    ``[(axis index, from placement, to placement, logical shape on that axis), ...]``.

    The cost model prices these steps (as ``greedy_steps``, which restates DTensor's rule on
    autopar's placements and is checked against this), so predicted collectives are the ones that run.
    """
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
    from torch.distributed.tensor._redistribute import _gen_transform_infos

    mesh = abstract_device_mesh(axes)
    dtype = {1: torch.int8, 2: torch.bfloat16, 4: torch.float32, 8: torch.float64}.get(itemsize, torch.float32)
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    meta = TensorMeta(torch.Size(shape), stride, dtype)
    infos = _gen_transform_infos(DTensorSpec(mesh, tuple(map(to_dtensor_placement, src)), meta),
                                 DTensorSpec(mesh, tuple(map(to_dtensor_placement, dst)), meta))
    return [(i.mesh_dim, from_dtensor_placement(i.src_dst_placements[0]), from_dtensor_placement(i.src_dst_placements[1]),
             tuple(int(x) for x in i.logical_shape)) for i in infos]


def greedy_steps(axis_sizes: tuple, src: Pl, dst: Pl) -> tuple:
    """``redistribute_steps`` without shapes, ``((axis index, from, to), ...)``, by DTensor's greedy
    rule (the one it takes for placements in default shard order): when anything is sharded,
    inner to outer axes first, an axis whose target shards a tensor dim that the outer axes shard
    differently in source and target is replicated first (nested sharding); then outer to inner,
    every axis still differing moves to its target. tests/passes/test_costs.py checks it against
    DTensor on every placement pair of 1-, 2- and 3-D meshes."""
    if len(src) == 1:
        return ((0, src[0], dst[0]),) if src[0] != dst[0] else ()
    cur, out = list(src), []
    if math.prod(n for p, n in zip(src, axis_sizes) if p.is_shard) > 1:
        for d in reversed(range(len(cur))):
            target = dst[d]
            if target.is_shard:
                k = target.dim
                if [i for i in range(d) if cur[i] == shard(k)] != [i for i in range(d) if dst[i] == shard(k)]:
                    target = REPLICATE
            if cur[d] != target:
                out.append((d, cur[d], target))
                cur[d] = target
    for d in range(len(cur)):
        if cur[d] != dst[d]:
            out.append((d, cur[d], dst[d]))
            cur[d] = dst[d]
    return tuple(out)


_MESHES: dict[tuple, object] = {}


def abstract_device_mesh(axes: dict[str, int]):
    """A DeviceMesh with no process group, for building DTensor specs while planning."""
    key = tuple(axes.items())
    if key not in _MESHES:
        _MESHES[key] = _new_abstract_mesh(axes)
    return _MESHES[key]


def _new_abstract_mesh(axes: dict[str, int]):
    from torch.distributed.device_mesh import DeviceMesh

    shape = tuple(axes.values())
    return DeviceMesh("cpu", torch.arange(math.prod(shape)).view(shape), mesh_dim_names=tuple(axes),
                      _init_backend=False, _rank=0)


def to_dtensor_placement(p: Placement):
    from torch.distributed.tensor import Partial, Replicate, Shard

    if p.kind == "S":
        return Shard(p.dim)
    if p.kind == "P":
        return Partial(p.op)
    return Replicate()


def from_dtensor_placement(p) -> Placement | None:
    """DTensor placement -> autopar placement; None for kinds autopar does not plan with."""
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if isinstance(p, _StridedShard):
        return None
    if isinstance(p, Shard):
        return shard(p.dim)
    if isinstance(p, Replicate):
        return REPLICATE
    if isinstance(p, Partial):
        return partial(p.reduce_op) if p.reduce_op == "sum" else None
    return None


def _tmeta(t: torch.Tensor):
    from torch.distributed.tensor._dtensor_spec import TensorMeta

    return TensorMeta(t.shape, t.stride(), t.dtype)


class StrategyEnumerator:
    """Turns fx nodes into candidate ``Strategy`` lists on one abstract mesh."""

    def __init__(self, axes: dict[str, int]):
        self.axes = axes
        self.axis_sizes = tuple(axes.values())
        self.mesh = abstract_device_mesh(axes)
        self.warnings: list[str] = []
        self._warned: set[str] = set()

    def warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.warnings.append(msg)

    def _spec(self, pl: Pl, t: torch.Tensor):
        from torch.distributed.tensor._dtensor_spec import DTensorSpec

        return DTensorSpec(self.mesh, tuple(to_dtensor_placement(p) for p in pl), _tmeta(t))

    def _convert_pl(self, placements) -> Pl | None:
        out = tuple(from_dtensor_placement(p) for p in placements)
        return None if any(p is None for p in out) else out

    def _valid(self, s: Strategy, ins_meta, outs_meta) -> bool:
        for pl, t in itertools.chain(zip(s.ins, ins_meta), zip(s.outs, outs_meta)):
            if pl is None or t is None:
                continue
            if not divides(tuple(t.shape), pl, self.axis_sizes):
                return False
        return True

    def fallback(self, node: fx.Node, reason: str) -> list[Strategy]:
        name = op_name(node)
        self.warn_once(name, f"{name}: {reason}; it runs replicated (no sharding) on every rank")
        rep = (REPLICATE,) * len(self.axis_sizes)
        return [Strategy(tuple(rep if t is not None else None for t in outputs_meta(node)),
                         tuple(rep for _ in tensor_inputs(node)), source="fallback")]

    # -- the entry point ----------------------------------------------------------------------
    def for_node(self, node: fx.Node, input_candidates: list[list[Pl]]) -> list[Strategy]:
        """Strategies of ``node`` given the candidate placements of each of its tensor inputs."""
        name = op_name(node)
        ins = tensor_inputs(node)
        ins_meta = [a.meta["val"] for a in ins]
        outs_meta = outputs_meta(node)
        if not ins:  # factory ops (arange, full, ...): made replicated on every rank
            rep = (REPLICATE,) * len(self.axis_sizes)
            return [Strategy(tuple(rep if t is not None else None for t in outs_meta), (), source="factory")]
        own = OWN_RULES.get(name)
        try:
            if own is not None:
                rules = own(node, ins_meta, tuple(self.axes))
                found = self._expand_single_dim(rules, len(outs_meta), source="autopar")
            elif node.target in _dt().op_single_dim_strategy_funcs:
                found = self._single_dim(node, ins, outs_meta)
            elif node.target in _dt().op_strategy_funcs:
                found = self._full_mesh(node, ins, input_candidates)
            else:
                return self.fallback(node, "no sharding rule in DTensor's registry or autopar's")
        except Exception as exc:  # a private API changed or a rule rejected the inputs
            return self.fallback(node, f"its sharding rule failed ({type(exc).__name__}: {str(exc)[:120]})")
        found = [s for s in dict.fromkeys(found) if self._valid(s, ins_meta, outs_meta)]
        if own is _sdpa_rules and "cp" in self.axes:  # the ring expands K/V heads from the first: no K/V-replicated axis
            cp = tuple(self.axes).index("cp")
            found = [s for s in found if not (s.ins[0][cp].kind == "S" and s.ins[0][cp].dim == 2 and any(
                q.kind == "S" and q.dim == 1 and k.kind == "R" for q, k in zip(s.ins[0], s.ins[1])))]
        if own is _moe_rules:
            found = [s for s in found if len(moe_a2a_axes(s)) <= 1]
        if name in NO_NESTED_SHARDING:
            found = [s for s in found if not any(_nested(pl) for pl in (*s.ins, *s.outs) if pl)]
        if not found and all(t is None or t.dim() == 0 for t in (*outs_meta, *ins_meta)):
            rep = (REPLICATE,) * len(self.axis_sizes)  # scalars (a step counter): nothing to shard
            return [Strategy(tuple(rep if t is not None else None for t in outs_meta), tuple(rep for _ in ins), "dtensor")]
        return found or self.fallback(node, "no strategy shards it evenly on this mesh")

    # -- DTensor single-dim rules, expanded over every mesh axis ------------------------------
    def _single_dim(self, node, ins, outs_meta) -> list[Strategy]:
        from torch.distributed.tensor._ops.single_dim_strategy import _ShardingPlaceholder

        info = _dt().op_single_dim_strategy_funcs[node.target]
        args_meta, kwargs_meta = pytree.tree_map_only(
            fx.Node, lambda a: _tmeta(a.meta["val"]) if isinstance(a.meta.get("val"), torch.Tensor) else a.meta.get("val"),
            (node.args, node.kwargs))
        raw = info.func(node.target, args_meta, kwargs_meta)
        rules = []
        for rule in raw:
            conv = []
            for p in rule:
                if isinstance(p, _ShardingPlaceholder):
                    conv.append(shard(p.dim))
                elif p is None:
                    conv.append(None)
                else:
                    conv.append(from_dtensor_placement(p))
                    if conv[-1] is None:
                        break
            else:
                rules.append(tuple(conv))
        return self._expand_single_dim(rules, len(rules[0]) - len(ins) if rules else len(outs_meta), source="dtensor")

    def _expand_single_dim(self, rules, n_out: int, source: str) -> list[Strategy]:
        """Every combination of one per-axis rule per mesh axis (the all-R rule always included).

        ``rules`` is one list for every axis, or (autopar's own rules) a list of lists, one per axis.
        """
        per_axis_rules = rules if rules and isinstance(rules[0], list) else [rules] * len(self.axis_sizes)
        if not any(per_axis_rules):
            return []
        width = len(next(r for r in per_axis_rules if r)[0])
        rep_rule = tuple(REPLICATE for _ in range(width))
        per_axis = [list(dict.fromkeys([rep_rule] + [r for r in rs if len(r) == width])) if n > 1 else [rep_rule]
                    for rs, n in zip(per_axis_rules, self.axis_sizes)]
        out = []
        for combo in itertools.product(*per_axis):
            cols = list(zip(*combo))  # cols[k] = placements of operand k across axes
            pls = [None if any(p is None for p in col) else tuple(col) for col in cols]
            out.append(Strategy(tuple(pls[:n_out]), tuple(p or (REPLICATE,) * len(combo) for p in pls[n_out:]), source))
        return out

    # -- DTensor full-mesh strategy functions ---------------------------------------------------
    def _full_mesh(self, node, ins, input_candidates) -> list[Strategy]:
        from torch.distributed.tensor._op_schema import OpSchema, OpSpec, OpStrategy, TupleStrategy

        cands = dict(zip(ins, input_candidates))

        def wrap(a):
            if isinstance(a, fx.Node):
                val = a.meta.get("val")
                if isinstance(val, torch.Tensor):
                    return OpStrategy([OpSpec(self._spec(pl, val)) for pl in cands[a]])
                return val
            return a

        def wrap_arg(a):
            if isinstance(a, (list, tuple)) and a and all(isinstance(x, fx.Node) for x in a):
                return TupleStrategy(tuple(wrap(x) for x in a))  # a tensor list (cat, stack, ...)
            return pytree.tree_map_only(fx.Node, wrap, a)

        def rule():
            args = tuple(wrap_arg(a) for a in node.args)
            kwargs = {k: wrap_arg(v) for k, v in node.kwargs.items()}
            schema_info = _dt().op_to_schema_info.get(node.target)
            result = _dt().op_strategy_funcs[node.target](OpSchema(node.target, tuple(args), kwargs, schema_info=schema_info))
            if not isinstance(result, OpStrategy):
                raise TypeError(f"unsupported strategy type {type(result).__name__}")
            return result.strategies

        try:
            with _without_dtensor_costs():
                specs = rule()
        except Exception:
            # A rule that rejects one input placement (a view that would unflatten a dim sharded
            # unevenly) rejects the whole candidate list: ask again one placement at a time.
            if len(ins) != 1 or len(cands[ins[0]]) < 2:
                raise
            specs, every = [], cands[ins[0]]
            for pl in every:
                cands[ins[0]] = [pl]
                try:
                    with _without_dtensor_costs():
                        specs.extend(rule())
                except Exception:
                    continue
            if not specs:
                raise
        found = []
        n_in = len(ins)
        for spec in specs:
            outs = spec.output_specs if isinstance(spec.output_specs, tuple) else (spec.output_specs,)
            out_pls = tuple(None if o is None else self._convert_pl(o.placements) for o in outs)
            if any(o is not None and pl is None for o, pl in zip(outs, out_pls)):
                continue
            if spec.input_specs is None:
                in_pls = tuple(out_pls[0] for _ in range(n_in))
            else:
                in_pls = tuple(self._convert_pl(s.placements) for s in spec.input_specs[:n_in])
            if len(in_pls) != n_in or any(p is None for p in in_pls):
                continue
            found.append(Strategy(out_pls, in_pls, "dtensor"))
        return found


# ---------------------------------------------------------------------------------------------
# autopar's own rules, in DTensor's single-dim form: a list of per-axis rules, each
# [outputs..., inputs...]. Expanded over the mesh like DTensor's.
# ---------------------------------------------------------------------------------------------

def _sdpa_rules(node: fx.Node, ins_meta, axis_names: tuple) -> list[list[tuple]]:
    """Attention is independent per batch row and per head: shard q, k, v and out alike on
    dim 0 (batch) or dim 1 (heads). A mask follows unless it broadcasts along that dim.

    On a ``cp`` axis it is also independent per query row, given every key: ring attention
    (codegen/ring.py) shards q, k, v and out on the sequence dim (-2) and passes K/V blocks round
    the ring. Causal or unmasked attention only, without dropout: the ring skips and balances
    blocks by position. Heads sharding on ``cp`` is Ulysses: the solver pays the all-to-alls that
    move sequence-sharded q, k, v to head-sharded and back, on the edges.
    """
    q = ins_meta[0]
    rules = []
    for d in (0, 1):
        if d == 1 and q.dim() < 4:
            continue
        row = [shard(d), shard(d), shard(d), shard(d)]
        for extra in ins_meta[3:]:  # attn_mask
            row.append(shard(d) if extra.dim() == q.dim() and extra.shape[d] == q.shape[d] else REPLICATE)
        # Grouped-query attention (fewer kv heads) shards too: rank r holds q heads
        # [r*Hq/n, (r+1)*Hq/n) and exactly the kv heads they use, when n divides both counts
        # (checked by the divisibility filter).
        rules.append(tuple(row))
    if q.dim() == 4 and ins_meta[1].shape[1] < q.shape[1] and sdpa_arguments(node.args, node.kwargs)["enable_gqa"]:
        # GQA beyond the kv heads: shard the query heads and replicate K/V; each rank picks the kv
        # heads its query heads use (codegen/lower.py's "kv-replicated" attention)
        rules.append((shard(1), shard(1), REPLICATE, REPLICATE, *[REPLICATE for _ in ins_meta[3:]]))
    per_axis = [list(rules) for _ in axis_names]
    if "cp" in axis_names and ring_ok(node):
        per_axis[axis_names.index("cp")].append((shard(q.dim() - 2),) * 4)
    return per_axis


def ring_ok(node: fx.Node) -> bool:
    """Whether ring attention can run this sdpa call: no mask tensor, no dropout, 4-D q."""
    a = sdpa_arguments(node.args, node.kwargs)
    q = a["query"].meta["val"] if isinstance(a["query"], fx.Node) else None
    return a["attn_mask"] is None and not a["dropout_p"] and q is not None and q.dim() == 4


_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def sdpa_arguments(args: tuple, kwargs: dict) -> dict:
    """``aten.scaled_dot_product_attention`` arguments by name, defaults filled in."""
    out = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    out.update(zip(_SDPA_PARAMS, args))
    out.update(kwargs)
    return out


def _moe_rules(node: fx.Node, ins_meta, axis_names: tuple) -> list[list[tuple]]:
    """An ``autopar.moe`` layer (passes/moe.py): out = Σ_j f(x[t], w[t,j]; θ[idx[t,j]]).

    Tokens (x, idx, w and out alike) are independent rows; experts are independent along their
    leading dim. Per axis:

    * tokens S(0), experts S(0): expert parallelism, tokens go to their experts' owners by
      all-to-all and come back (codegen/moe.py), on ``ep`` and ``tp`` axes;
    * tokens S(0), experts R: data parallel (the expert gradients are partial sums);
    * tokens R, experts S(0): each rank runs its own experts on every token, out P(sum);
    * all R.

    At most one axis exchanges tokens (``moe_a2a_axes``).
    """
    n_exp = len(ins_meta) - 3
    tok = (shard(0),) * 4
    rules = []
    for name in axis_names:
        axis = [(*tok, *[REPLICATE] * n_exp), (partial("sum"), REPLICATE, REPLICATE, REPLICATE, *[shard(0)] * n_exp)]
        if name in ("ep", "tp"):
            axis.append((*tok, *[shard(0)] * n_exp))
        rules.append(axis)
    return rules


def moe_roles(s: Strategy) -> list[str | None]:
    """Per mesh axis, what an ``autopar.moe`` strategy does there (the rules above): "all-to-all"
    (tokens and experts sharded), "own-experts" (tokens replicated, experts sharded), "data"
    (tokens sharded, experts replicated) or None (both replicated)."""
    kinds = {("S", "S"): "all-to-all", ("R", "S"): "own-experts", ("S", "R"): "data"}
    return [kinds.get((x.kind, e.kind)) for x, e in zip(s.ins[0], s.ins[3])]


def moe_a2a_axes(s: Strategy) -> list[int]:
    """Mesh axes on which an ``autopar.moe`` strategy exchanges tokens."""
    return [a for a, r in enumerate(moe_roles(s)) if r == "all-to-all"]


OWN_RULES = {"aten.scaled_dot_product_attention.default": _sdpa_rules, "autopar.moe": _moe_rules}
