"""Annotate the traced graph with candidate strategies and their costs, as a ShardingProblem.

Decision nodes are placeholders (parameters, buffers, constants, user inputs), ATen ops and the
output. ``getitem`` nodes are not decisions: they select one output of a multi-output op, so a
consumer of ``getitem(u, k)`` is wired straight to ``u``'s k-th output.

Costs, all in seconds per training (or inference) step, from one hardware preset:

* node v, strategy j: roofline time of the op on its local shards,
  ``c_v[j] = f · max(flops_local / peak, bytes_local / mem_bw)`` with ``f = 1 + bwd/fwd`` in
  training, the ratio of backward to forward FLOPs that the joint graph measured for v's source
  op (``passes/joint.py``; 3 when unknown), and 1 for inference; a trainable parameter also pays
  its optimizer's update (``memory.update_cost``), memory bound on its local shard. With an op
  profile of this device (``autopar profile``), a measured op uses its measured time, an
  unmeasured one its class's fitted base and efficiency, and every op, parameter and collective
  adds the runtime's measured overhead (the formula is in ``cost_models/profile.py``);
* edge u→v, pair (i, j): the forward redistribution from u's output placement to v's required
  input placement, plus in training the backward redistribution of the gradient that flows back
  along the edge. Per axis the gradient v sends back is ``R`` if v took the input as ``P``, ``P``
  if v took it as ``R`` but v's output is not ``R`` on that axis (a contraction against a sharded
  operand: Megatron's backward all-reduce, and data parallelism's gradient all-reduce), and the
  input placement otherwise; u needs it as ``S(d)`` if u's output was ``S(d)`` and as ``R``
  otherwise. When k consumers send gradients back to one tensor, they are summed locally and
  reduced once, so each edge pays 1/k of that backward collective. A forward redistribution is
  charged to every edge that needs it (an upper bound: consumers that want the same placement
  share one in the lowered program);
* memory m_v[j], bytes per device live at the training peak (``cost_models/memory.py``). A
  parameter: ``w + g + o`` (its shard, its gradient, the optimizer's state of the shard). An op:
  the activations autograd saves for it (``memory.saved_by``), each at the placement it is read::

      m_v[j] = Σ_{k ∈ S_in(v)} b(x_k, ins_j[k]) · ρ_k / n(r_k) + Σ_{k ∈ S_out(v)} b(y_k, outs_j[k]) / n(v,k)
               + ε_v · b(y_0, outs_j[0])

  with b(t, p) the bytes of t's local shard under placement p; r_k the tensor whose storage the
  input x_k views (through view ops), ρ_k = |r_k| / |x_k| (a saved split of a fused qkv keeps all
  of it), n(r) the number of saved reads of r across the graph (so a tensor several ops save
  counts once when they read it alike), ε_v the op's other saved bytes per output byte (sdpa's
  logsumexp). A saved read of a parameter or buffer costs 0: the solver assumes it is read in its
  own placement. The runtime keeps a saved value that a redistribution gathered (or a view of
  one) as its shard and gathers it again in backward (``runtime.Executor._pack``): such an edge
  pays its forward collective twice, and the plan's recount stores the shard. The plan's
  breakdown (``build_plan._memory``) recounts the chosen strategies exactly, one storage per
  (tensor, placement), redistributed copies of parameters included.
  In inference only parameters count.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx

from ..cost_models.comm import axis_links, collective_time, price_steps
from ..cost_models.compute import compute_time, op_bytes, op_flops
from ..errors import AutoparError
from ..cost_models.hardware import Hardware
from ..cost_models.memory import saved_by, state_bytes, update_cost
from ..cost_models.profile import op_call, op_class
from ..placements import REPLICATE, Placement, local_shape, shard
from ..solvers.intra_op import ShardingProblem
from .moe import MOE_OP
from .strategies import (OWN_RULES, SKIP_OPS, VIEW_OPS, Strategy, StrategyEnumerator, greedy_steps, moe_a2a_axes,
                         moe_roles, op_name, outputs_meta, tensor_candidates, tensor_inputs)
from .joint import source_of
from .trace import TracedGraph


@dataclass
class Edge:
    src: int  # decision-node index of the producer
    src_out: int  # which output of the producer
    dst: int  # decision-node index of the consumer
    dst_in: int  # which tensor input of the consumer
    shape: tuple
    itemsize: int
    grad: bool  # a gradient flows back along this edge (training only)


@dataclass
class Annotated:
    """Everything the solver and the plan writer need, indexed by decision node."""

    tg: TracedGraph
    axes: dict[str, int]
    mode: str
    nodes: list[fx.Node]
    kind: list[str]  # "param", "buffer", "input", "op", "output"
    strategies: list[list[Strategy]]
    edges: list[Edge]
    node_cost: list[np.ndarray]
    node_mem: list[np.ndarray]
    edge_cost: list[np.ndarray]
    ctx: "CostContext" = None  # the cost queries behind edge_cost, reused to itemise the chosen plan
    warnings: list[str] = field(default_factory=list)
    optimizer: str = "adamw"
    saves: list[list[tuple]] = field(default_factory=list)  # per node: what it saves (_saved_charges)

    def problem(self, memory_limit: float | None) -> ShardingProblem:
        return ShardingProblem(
            node_costs=self.node_cost, node_memory=self.node_mem,
            edges=[(e.src, e.dst) for e in self.edges], edge_costs=self.edge_cost,
            memory_limit=memory_limit, names=[n.name for n in self.nodes])

    def repeated_layers(self) -> list:
        """Classes of identical layers for ``solvers.intra_op.fold_copies``: the model's repeated
        blocks (passes/pipeline.py ``layer_index``) grouped by a structural hash, the sequence of
        (kind, op, shapes, strategies) of their decision nodes. Layers that differ (the first
        carries the embedding, the last the head) stay out; a model without blocks gives []."""
        from .pipeline import layer_index

        try:
            _, layer = layer_index(self.tg)
        except AutoparError:
            return []
        members: dict[int, list[int]] = {}
        for v, node in enumerate(self.nodes):
            if node.name in layer:
                members.setdefault(layer[node.name], []).append(v)
        by_signature: dict[tuple, list[list[int]]] = {}
        for k in sorted(members):
            vs = members[k]
            sig = tuple((self.kind[v], str(self.nodes[v].target) if self.nodes[v].op == "call_function" else "",
                         _shape_key(self.nodes[v]), tuple(self.strategies[v])) for v in vs)
            by_signature.setdefault(sig, []).append(vs)
        return [layers for layers in by_signature.values() if len(layers) > 1]


class CostContext:
    """Shared, cached cost queries for one mesh on one hardware preset.

    A redistribution is priced step by step (``cost_models.comm.price_steps``) in the order and
    with the intermediate placements DTensor executes it (``strategies.greedy_steps``).
    Backends without all-to-all (gloo) run it as an all-gather, and are priced so.
    """

    def __init__(self, axes: dict[str, int], hw: Hardware, profile=None, collect: bool = False):
        self.axes = axes
        # measured op times of this device (cost_models/profile.py), and the calls to time if collecting
        self.profile = profile
        self.collect = collect
        self.wanted: dict[str, dict] = {}
        self.names = tuple(axes)
        self.axis_sizes = tuple(axes.values())
        self.hw = hw
        self.links = axis_links(axes, hw)
        self.a2a_as_all_gather = bool(getattr(hw, "all_to_all_as_all_gather", False))
        # a preset calibrated per collective (autopar profile --collectives) prices each op on its own fit
        ops = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")
        # (local ranks measure the intra-node link only, so only intra-node axes use the fits)
        self._op_links = tuple({op: hw.link_for(op, link) for op in ops} if link == hw.intra_node else link
                               for link in (self.links[a] for a in axes))
        self._cache: dict = {}

    def collectives(self, src: tuple, dst: tuple, shape: tuple, itemsize: int) -> tuple:
        if src == dst:
            return ()
        key = (src, dst, shape, itemsize)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._price(src, dst, shape, itemsize)
        return hit

    def _price(self, src, dst, shape, itemsize):
        steps = greedy_steps(self.axis_sizes, src, dst)  # DTensor's own steps, in its order
        priced = price_steps(steps, src, shape, itemsize, tuple(self.axes.items()), self._op_links, self.a2a_as_all_gather)
        # what a step pays per collective beyond its link time (profiled: DTensor, waking the ranks)
        a, b = self.overhead("collective_s"), self.overhead("collective_s_per_byte")
        return tuple(dataclasses.replace(c, time_s=c.time_s + a + b * c.bytes) for c in priced) if a or b else priced

    def overhead(self, what: str) -> float:
        """The runtime's own seconds per op or parameter (``op_fwd_s``, ``op_train_s``, ``param_s``)."""
        return float(self.profile.overhead.get(what, 0.0)) if self.profile is not None else 0.0

    def time(self, src, dst, shape, itemsize) -> float:
        return sum(c.time_s for c in self.collectives(src, dst, shape, itemsize))


def _rule_key(node, cands) -> tuple | None:
    """What a node's strategies depend on: its op, its arguments (tensors by shape and dtype), its
    outputs' shapes and its inputs' candidate placements; None if an argument is not hashable."""
    def plain(a):
        if isinstance(a, fx.Node):
            v = a.meta.get("val")
            return ("T", tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else ("V", repr(v))
        if isinstance(a, (list, tuple)):
            return tuple(plain(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, plain(x)) for k, x in a.items()))
        return a

    key = (node.target, plain(node.args), plain(node.kwargs), _shape_key(node), tuple(tuple(c) for c in cands))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _shape_key(node) -> tuple:
    vals = node.meta.get("val")
    vals = vals if isinstance(vals, (tuple, list)) else (vals,)
    return tuple((tuple(t.shape), str(t.dtype)) if isinstance(t, torch.Tensor) else None for t in vals)


def _saved_through_views(saves, nodes, kind, edges) -> set[int]:
    """Edges whose value autograd saves, directly or through a chain of views of it."""
    into = {(e.dst, e.dst_in): i for i, e in enumerate(edges)}
    out, todo = set(), [e for cs in saves for what, *_, e in cs if what == "in"]
    while todo:
        i = todo.pop()
        if i in out:
            continue
        out.add(i)
        u = edges[i].src
        if kind[u] == "op" and op_name(nodes[u]) in VIEW_OPS and (u, 0) in into:
            todo.append(into[u, 0])
    return out


def gathers(ctx, src: tuple, dst: tuple, shape) -> bool:
    """True if redistributing ``shape`` from ``src`` to ``dst`` grows the local shard (an all-gather
    on some axis): a value autograd saves after such a move is kept as its shard and gathered again
    in backward (``runtime.Executor._pack``)."""
    return math.prod(local_shape(tuple(shape), dst, ctx.axis_sizes)) > math.prod(local_shape(tuple(shape), src, ctx.axis_sizes))


def grad_placements(dst: tuple, consumer_out: tuple | None, src: tuple) -> tuple[tuple, tuple]:
    """(placement of the gradient the consumer sends back, placement the producer needs it in)."""
    g, need = [], []
    for a, (d, s) in enumerate(zip(dst, src)):
        o = consumer_out[a] if consumer_out is not None else REPLICATE
        if d.kind == "P":
            g.append(REPLICATE)
        elif d.kind == "R" and o.kind != "R":
            g.append(Placement("P", op="sum"))
        else:
            g.append(d)
        need.append(s if s.kind == "S" else REPLICATE)
    return tuple(g), tuple(need)


def _is_float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype.is_floating_point


def annotate(tg: TracedGraph, axes: dict[str, int], hw: Hardware, mode: str, *,
             trainable: set[str] | None = None, joint: dict | None = None, profile=None,
             collect: bool = False, pins: dict | None = None, optimizer: str = "adamw",
             context_parallel: str = "auto", sequence_parallel: bool | None = None,
             expert_parallel: bool | None = None, memory_limit: float | None = None) -> Annotated:
    """Enumerate strategies for every decision node and cost every node and edge.

    ``memory_limit`` (bytes per device): raise ``InfeasibleError`` as soon as the nodes' smallest
    strategies exceed it, before pricing the edges (a mesh search skips such meshes quickly).

    ``pins`` ({pattern: placement}) fixes the placement of the parameters (by FQN) and graph
    nodes (by name) that match the fnmatch pattern (see ``_apply_pins``).
    ``profile`` (an OpProfile) supplies measured op times; ``collect`` records in ``ctx.wanted``
    every local op call the costs asked for, for the profiler to time.
    """
    enum = StrategyEnumerator(axes)
    ctx = CostContext(axes, hw, profile, collect)
    train = mode == "train"
    nodes: list[fx.Node] = []
    kind: list[str] = []
    strategies: list[list[Strategy]] = []
    index: dict[fx.Node, int] = {}
    resolve: dict[fx.Node, tuple[int, int]] = {}  # tensor-producing fx node -> (decision index, output)
    needs_grad: dict[fx.Node, bool] = {}
    edges: list[Edge] = []
    trainable = set(tg.params.values()) if trainable is None else trainable
    if memory_limit is not None:  # model state that no layout of this mesh can hold: said before any strategy
        from ..api import explain_infeasible
        from ..errors import InfeasibleError

        facts = {"mode": mode, "trainable": trainable, "optimizer": optimizer}
        why = explain_infeasible(tg, axes, hw, memory_limit, **facts)
        if why:
            raise InfeasibleError(why)

    def add(node, k, strats):
        index[node] = len(nodes)
        nodes.append(node)
        kind.append(k)
        strategies.append(strats)
        resolve[node] = (index[node], 0)

    expert_params = {p for layer in tg.moe for p in layer.params}
    rules: dict[tuple, list] = {}
    for node in tg.gm.graph.nodes:
        if node.op == "placeholder" and node.name in tg.aliases:
            continue  # a tied parameter: planned once, under the placeholder the graph uses
        if node.op == "placeholder":
            val = node.meta.get("val")
            k = "param" if node.name in tg.params else "buffer" if node.name in tg.buffers or node.name in tg.constants else "input"
            cands = tensor_candidates(tuple(val.shape), ctx.axis_sizes) if isinstance(val, torch.Tensor) else [()]
            for ax in ("dp", "cp", "ep"):
                if k == "param" and ax in axes and not (ax == "ep" and node.name in expert_params):
                    # "dp", "cp" and "ep" axes split the data (batch rows, sequence positions): parameters
                    # are replicated along them, except experts along "ep" (their leading dim).
                    # (Sharded parameters along dp, ZeRO-3, are not planned yet.)
                    cands = [pl for pl in cands if pl[list(axes).index(ax)].kind == "R"]
                elif k == "param" and ax in axes:
                    cands = [pl for pl in cands if pl[list(axes).index(ax)] in (REPLICATE, shard(0))]
            if k == "input" and "cp" in axes:
                cands = _sequence_sharded(node, cands, axes)
            add(node, k, [Strategy((pl,), (), "input") for pl in cands])
            needs_grad[node] = k == "param" and tg.params[node.name] in trainable and _is_float(val)
            continue
        if node.op == "call_function" and node.target is operator.getitem:
            src, _ = resolve[node.args[0]]
            resolve[node] = (src, node.args[1])
            needs_grad[node] = needs_grad.get(node.args[0], False) and _is_float(node.meta.get("val"))
            continue
        if node.op == "call_function" and op_name(node) in SKIP_OPS:
            continue
        ins = tensor_inputs(node) if node.op == "call_function" else [
            a for a in torch.utils._pytree.tree_leaves(node.args) if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)]
        if node.op == "output":
            rep = (REPLICATE,) * len(ctx.axis_sizes)
            add(node, "output", [Strategy((), tuple(rep for _ in ins), "output")])
        elif node.op == "call_function":
            cands = []
            for a in ins:
                p, o = resolve[a]
                cands.append(list(dict.fromkeys(s.outs[o] for s in strategies[p])))
            key = _rule_key(node, cands)  # repeated layers ask the same question: answer it once
            found = rules.get(key) if key is not None else None
            if found is None:
                found = enum.for_node(node, cands)
                if key is not None:
                    rules[key] = found
            add(node, "op", list(found))
            needs_grad[node] = any(needs_grad.get(a, False) for a in ins) and any(_is_float(t) for t in outputs_meta(node))
        else:
            raise NotImplementedError(f"unexpected fx node {node.op} {node.target}")
        v = index[node]
        for k_in, a in enumerate(ins):
            p, o = resolve[a]
            val = a.meta["val"]
            edges.append(Edge(p, o, v, k_in, tuple(val.shape), val.element_size(), train and needs_grad.get(a, False)))

    if pins:
        _apply_pins(pins, tg, axes, nodes, kind, strategies)
    _choose_attention(context_parallel, axes, nodes, strategies)
    if sequence_parallel not in (None, True, False):
        from ..errors import AutoparError

        raise AutoparError(f"sequence_parallel={sequence_parallel!r}: expected True (on), False (off) or None "
                           "(the solver's choice)")
    if sequence_parallel is not None:
        _sequence_parallel(bool(sequence_parallel), axes, nodes, kind, strategies)
    if expert_parallel is not None:
        _expert_parallel(expert_parallel, axes, nodes, kind, strategies)
    node_cost, node_mem = [], []
    joint = joint or {}
    op_memo: dict[tuple, np.ndarray] = {}  # a repeated layer's ops cost what its first copy's did
    for v, node in enumerate(nodes):
        src = joint.get(source_of(node)) if kind[v] == "op" else None
        bwd = src.backward_ratio if src is not None else None
        # without the joint graph: backward does twice the forward's work
        grads = needs_grad.get(node, False)
        mult = (1.0 + (2.0 if bwd is None else bwd)) if train and grads else 1.0
        if kind[v] == "op":
            mask = tuple(train and needs_grad.get(a, False) for a in tensor_inputs(node))
            key = _rule_key(node, ())
            key = key and (key, tuple(strategies[v]), train and grads, mask, mult)
            costs = op_memo.get(key) if key else None
            if costs is None:
                costs = np.array([_op_time(node, s, ctx, train and grads, mask, mult) for s in strategies[v]])
                if key:
                    op_memo[key] = costs
            node_cost.append(costs.copy())
        else:
            extra = ctx.overhead("param_s") if kind[v] == "param" and train and grads else 0.0
            node_cost.append(np.array([mult * _node_time(node, kind[v], s, ctx, train, grads, optimizer) + extra
                                       for s in strategies[v]]))
    grad_of = [bool(needs_grad.get(n, False)) for n in nodes]
    saves = _saved_charges(nodes, kind, edges, grad_of, train)
    node_mem = [np.array([_node_memory(node, kind[v], s, ctx, train, grad_of[v], saves[v], optimizer)
                          for s in strategies[v]], dtype=float) for v, node in enumerate(nodes)]
    if memory_limit is not None:  # a mesh nothing fits on is refused before its edges are priced
        from ..solvers.intra_op import check_memory_floor

        try:
            check_memory_floor(node_cost, node_mem, [n.name for n in nodes], memory_limit)
        except InfeasibleError as e:  # z3's sentence first, the contributors after it
            why = explain_infeasible(tg, axes, hw, memory_limit, least=e.need_bytes, **facts)
            raise InfeasibleError(f"{why}. {e}" if why else str(e), e.need_bytes) from None

    # A gradient that several consumers send back to one tensor is summed locally and reduced
    # once, so each of those edges pays an equal share of the backward collective.
    grad_fanout: dict[tuple[int, int], int] = {}
    for e in edges:
        if e.grad:
            grad_fanout[e.src, e.src_out] = grad_fanout.get((e.src, e.src_out), 0) + 1

    saved_in = _saved_through_views(saves, nodes, kind, edges)
    edge_cost = []
    matrices: dict[tuple, np.ndarray] = {}  # repeated layers have the same edges: price each once
    for k_e, e in enumerate(edges):
        consumer = strategies[e.dst]
        srcs = [s.outs[e.src_out] for s in strategies[e.src]]
        key = (tuple(srcs), tuple((cs.ins[e.dst_in], cs.outs[0] if cs.outs else None) for cs in consumer), e.shape,
               e.itemsize, e.grad and grad_fanout[e.src, e.src_out], k_e in saved_in)
        if key in matrices:
            edge_cost.append(matrices[key])
            continue
        m = matrices[key] = np.zeros((len(srcs), len(consumer)))
        for j, cs in enumerate(consumer):
            dst = cs.ins[e.dst_in]
            cout = cs.outs[0] if cs.outs else None
            for i, src in enumerate(srcs):
                if any(d.kind == "P" and s_.kind != "P" for s_, d in zip(src, dst)):
                    m[i, j] = np.inf  # DTensor cannot make a value partial; such strategies need a partial producer
                    continue
                t = ctx.time(src, dst, e.shape, e.itemsize)
                if k_e in saved_in and src != dst and gathers(ctx, src, dst, e.shape):
                    t *= 2  # the consumer saves the gathered value as its shard; backward gathers it again
                if e.grad:
                    g, need = grad_placements(dst, cout, src)
                    t += ctx.time(g, need, e.shape, e.itemsize) / grad_fanout[e.src, e.src_out]
                m[i, j] = t
        edge_cost.append(m)

    return Annotated(tg, axes, mode, nodes, kind, strategies, edges, node_cost, node_mem, edge_cost,
                     ctx=ctx, warnings=list(enum.warnings), optimizer=optimizer, saves=saves)


ATTENTION_SCHEMES = ("auto", "ring", "ulysses")


def attention_scheme(node, s: Strategy, names: tuple) -> str | None:
    """How strategy ``s`` runs attention on the ``cp`` axis: "ring" (sequence-sharded), "ulysses"
    (head-sharded: the sequence shards are moved by all-to-all), "batch" or "replicated"."""
    if "cp" not in names or op_name(node) not in OWN_RULES:
        return None
    q = s.ins[0][names.index("cp")]
    if q.kind != "S":
        return "replicated"
    return {0: "batch", 1: "ulysses"}.get(q.dim, "ring")


def _choose_attention(choice: str, axes: dict, nodes, strategies) -> None:
    """``context_parallel="ring"|"ulysses"``: keep only that scheme's strategies for every sdpa."""
    from ..errors import AutoparError

    if choice not in ATTENTION_SCHEMES:
        raise AutoparError(f"context_parallel={choice!r}: expected one of {sorted(ATTENTION_SCHEMES)}")
    if choice == "auto":
        return
    if "cp" not in axes:
        raise AutoparError(f"context_parallel={choice!r} needs a 'cp' mesh axis; the mesh is {axes}")
    names = tuple(axes)
    for v, node in enumerate(nodes):
        if op_name(node) not in OWN_RULES:
            continue
        keep = [s for s in strategies[v] if attention_scheme(node, s, names) == choice]
        if not keep:
            q, k = (a.meta["val"] for a in tensor_inputs(node)[:2])
            why = (f"Ulysses shards heads: cp={axes['cp']} must divide the query heads ({q.shape[1]}), and the "
                   f"key/value heads ({k.shape[1]}) unless the model uses grouped-query attention; use "
                   "context_parallel='ring'" if choice == "ulysses" else
                   "ring attention needs causal or unmasked attention without dropout; use context_parallel='ulysses'")
            raise AutoparError(f"{node.name}: no {choice} strategy: {why}")
        strategies[v] = keep


def _sequence_parallel(on: bool, axes: dict, nodes, kind, strategies) -> None:
    """Megatron sequence parallelism on ``tp`` (Korthikanti et al. 2022), on or off.

    The sequence length S is dim 1 of the first model input with two dims or more. An op output
    of three dims or more whose dim 1 is S carries the sequence. On: such outputs are never
    replicated or batch-sharded on tp, so the work between tensor-parallel regions (norms,
    residual adds, dropout) runs sequence-sharded, and the memory model credits their shards.
    Off: they are never sequence-sharded on tp.
    """
    from ..errors import AutoparError

    if "tp" not in axes:
        if on:
            raise AutoparError(f"sequence_parallel=True shards activations on the 'tp' axis; the mesh {axes} has none")
        return
    seq = next((n.meta["val"].shape[1] for n, k in zip(nodes, kind) if k == "input"
                and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() >= 2), None)
    tp = list(axes).index("tp")
    for v, node in enumerate(nodes):
        val = outputs_meta(node)[0] if kind[v] == "op" else None
        if val is None or val.dim() < 3 or val.shape[1] != seq:
            continue
        if on:
            keep = [s for s in strategies[v] if s.outs[0] is not None and s.outs[0][tp] not in (REPLICATE, shard(0))]
        else:
            keep = [s for s in strategies[v] if s.outs[0] is None or s.outs[0][tp] != shard(1)]
        strategies[v] = keep or strategies[v]


def _expert_parallel(on, axes: dict, nodes, kind, strategies) -> None:
    """``True``: every MoE layer exchanges tokens by all-to-all; ``False``: none does (experts
    split over tp with an all-reduce of the output, as tensor parallelism does, or replicated)."""
    from ..errors import AutoparError

    if on not in (True, False):
        raise AutoparError(f"expert_parallel={on!r}: expected True (all-to-all), False (none) or None (the solver's choice)")
    for v, node in enumerate(nodes):
        if kind[v] == "op" and op_name(node) == MOE_OP:
            keep = [s for s in strategies[v] if bool(moe_a2a_axes(s)) == on]
            if not keep:
                raise AutoparError(f"expert_parallel=True, but {node.name} cannot exchange tokens on mesh {dict(axes)}: "
                                   f"it needs an 'ep' (or 'tp') axis whose size divides its {node.target.experts} "
                                   "experts and its tokens")
            strategies[v] = keep


def _sequence_sharded(node, cands: list, axes: dict) -> list:
    """A ``cp`` axis shards every model input on its sequence dim (dim 1, batch first) when it has
    one; the solver then chooses how each op treats the shards (ring attention, Ulysses, gathering)."""
    cp = list(axes).index("cp")
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 2 or axes["cp"] == 1:  # cp=1 shards nothing
        return cands
    seq = [pl for pl in cands if pl[cp] == shard(1)]
    if not seq:
        from ..errors import AutoparError

        raise AutoparError(f"mesh axis cp={axes['cp']} shards the sequence, but input {node.name!r} has sequence "
                           f"length {val.shape[1]} (dim 1 of shape {tuple(val.shape)}), not divisible by {axes['cp']}; "
                           "pad the sequence or pick a cp size that divides it")
    return seq


def _apply_pins(pins: dict, tg: TracedGraph, axes: dict, nodes, kind, strategies) -> None:
    """Keep only the strategies whose output placement matches a pin.

    A pin maps an fnmatch pattern over parameter FQNs and graph node names to a placement: one
    string per mesh axis ("S(0)" on a 1-D mesh, "R,S(0)" on two axes) or a dict {axis:
    placement} that leaves the other axes free. The first matching pattern wins.
    """
    import fnmatch

    from ..errors import AutoparError
    from ..placements import parse

    if not isinstance(pins, dict):
        raise AutoparError(f"pins must be a dict of pattern to placement, e.g. {{'blocks.*.fc1.weight': 'S(0)'}}; "
                           f"got {type(pins).__name__}")
    want = {}
    for pattern, spec in pins.items():
        if not isinstance(pattern, str) or not isinstance(spec, (str, dict)):
            raise AutoparError(f"pin {pattern!r}: a pattern (str) maps to a placement string such as 'S(0)' or a "
                               f"dict {{axis: placement}}; got {spec!r}")
        try:
            if isinstance(spec, str):
                parts = _split_placements(spec)
                if len(parts) != len(axes):
                    raise ValueError(f"{len(parts)} placement(s) for a mesh of {len(axes)} axes {list(axes)}")
                spec = dict(zip(axes, parts))
            bad = set(spec) - set(axes)
            if bad:
                raise ValueError(f"unknown mesh axis {sorted(bad)}; the mesh has {list(axes)}")
            want[pattern] = {list(axes).index(a): parse(p) for a, p in spec.items()}
        except (ValueError, AttributeError) as e:
            raise AutoparError(f"pin {pattern!r}: {e}") from None
    used = set()
    for v, node in enumerate(nodes):
        if kind[v] not in ("param", "op", "input"):  # inputs by their graph names, e.g. {"ids": {"dp": "S(0)"}}
            continue
        names = [node.name] + ([tg.params[node.name]] if kind[v] == "param" else [])
        hit = next((p for p in want if any(fnmatch.fnmatchcase(n, p) for n in names)), None)
        if hit is None:
            continue
        used.add(hit)
        keep = [s for s in strategies[v] if s.outs and s.outs[0] is not None
                and all(s.outs[0][a] == pl for a, pl in want[hit].items())]
        if not keep:
            have = sorted({",".join(map(str, s.outs[0])) for s in strategies[v] if s.outs and s.outs[0] is not None})
            raise AutoparError(f"pin {hit!r} asks {names[-1]} for {pins[hit]!r}, which no strategy gives "
                               f"on mesh {axes} (a sharded dim must divide evenly); it can be: {'; '.join(have)}")
        strategies[v] = keep
    unused = [p for p in want if p not in used]
    if unused:
        raise AutoparError(f"pins {unused} match no parameter FQN or graph node name; parameters are named "
                           f"like {sorted(tg.params.values())[:3]}")


def _split_placements(text: str) -> list[str]:
    """"R,S(0)" -> ["R", "S(0)"] (commas inside parentheses do not split)."""
    out, depth, cur = [], 0, ""
    for ch in text.replace(" ", ""):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur] if cur else out


def local_shapes(metas, pls, axis_sizes):
    return [None if t is None else local_shape(tuple(t.shape), pl or (), axis_sizes) for t, pl in zip(metas, pls)]


def _node_time(node, kind, s: Strategy, ctx: CostContext, train: bool, needs_grad: bool,
               optimizer: str = "adamw") -> float:
    if kind == "param":
        if not train or not needs_grad:
            return 0.0
        val = node.meta["val"]
        n = math.prod(local_shape(tuple(val.shape), s.outs[0], ctx.axis_sizes))
        return compute_time(*update_cost(n, val.element_size(), optimizer), "float32", ctx.hw)  # memory bound
    return 0.0


def _op_time(node, s: Strategy, ctx: CostContext, train: bool, grad_mask: tuple, mult: float) -> float:
    """Seconds of one op on its local shards: profiled if measured, else the (fitted) roofline;
    plus the runtime's per-op overhead (module docstring of cost_models/profile.py)."""
    name = op_name(node)
    ovh = ctx.overhead("op_train_s" if train else "op_fwd_s")
    if name in VIEW_OPS:  # no work, but the runtime still dispatches it
        call = op_call(node, [], grad_mask, True) if ctx.profile is not None or ctx.collect else None
        if call is None:
            return ovh
        if ctx.collect:
            ctx.wanted[call[0]] = {"recipe": call[1], "class": op_class(name), "roofline_s": 0.0}
        t = ctx.profile.time(call[0], train) if ctx.profile is not None else None
        return ovh + (t or 0.0)
    ins = [a.meta["val"] for a in tensor_inputs(node)]
    outs = outputs_meta(node)
    in_shapes = local_shapes(ins, s.ins, ctx.axis_sizes)
    out_shapes = [o for o in local_shapes(outs, s.outs, ctx.axis_sizes) if o is not None]
    ref = next((t for t in outs if t is not None), ins[0] if ins else None)
    itemsize = ref.element_size() if ref is not None else 4
    dtype = str(ref.dtype) if ref is not None else "torch.float32"
    if name == MOE_OP:  # its matmuls run in the experts' dtype (the output may be promoted by fp32 routing weights)
        return _moe_time(node, s, ctx, in_shapes, ins[3].element_size(), str(ins[3].dtype), train, mult) + ovh
    ring = ring_axis(node, s, ctx.names)
    if ring is not None:  # ring attention: every rank meets every key block
        p = ctx.axis_sizes[ring]
        in_shapes = [in_shapes[0], *[(*sh[:-2], sh[-2] * p, sh[-1]) for sh in in_shapes[1:3]], *in_shapes[3:]]
    roof = compute_time(op_flops(name, in_shapes, out_shapes), op_bytes(name, in_shapes, out_shapes, itemsize),
                        dtype, ctx.hw)
    if ring is not None:
        return _ring_time(in_shapes, itemsize, roof, ring, ctx, train, mult) + ovh
    if ctx.profile is None and not ctx.collect:
        return mult * roof
    cls = op_class(name)
    call = op_call(node, in_shapes, grad_mask, s.source == "dtensor" and name not in OWN_RULES)
    if call is not None:
        key, recipe = call
        if ctx.collect:
            ctx.wanted[key] = {"recipe": recipe, "class": cls, "roofline_s": roof}
        t = ctx.profile.time(key, train) if ctx.profile is not None else None
        if t is not None:
            return t + ovh
    est = ctx.profile.estimate(cls, roof, mult) if ctx.profile is not None else None
    return (mult * roof if est is None else est) + ovh


def _moe_time(node, s: Strategy, ctx: CostContext, in_shapes, itemsize: int, dtype: str, train: bool,
              mult: float) -> float:
    r"""Seconds of one ``autopar.moe`` layer on its local tokens, forward plus backward when training.

    With T local tokens, k picks, hidden H and body FLOPs φ per row, a rank runs R = T·k/q rows,
    q the product of the axes where experts are sharded and tokens replicated (each rank runs its
    experts' share). Its experts are E/s of them, s the product of all expert-sharded axes, so it
    reads their weights once. Tokens exchanged on an axis of n ranks cost two all-to-alls of R·H
    bytes forward (dispatch and combine) and two backward, in the experts' dtype (b bytes)::

        T = mult·roofline(φ·R, weights/s + 4·R·H·b) + (2 + 2·train)·t_a2a(R·H·b, n)

    The load is assumed balanced across experts (``routing`` statistics refine the placement, not
    this price).
    """
    layer = node.target
    tokens, k, hidden = in_shapes[0][0], layer.top_k, layer.hidden
    rows = tokens * k / moe_row_share(s, ctx.axis_sizes)
    weights = sum(math.prod(sh) for sh in in_shapes[3:]) * itemsize
    t = mult * compute_time(layer.flops_per_row * rows, weights + 4 * rows * hidden * itemsize, dtype, ctx.hw)
    for a in moe_a2a_axes(s):
        link = ctx._op_links[a]
        link = link.get("all_to_all", link) if isinstance(link, dict) else link
        t += (4 if train else 2) * collective_time("all_to_all", rows * hidden * itemsize, ctx.axis_sizes[a], link)
    return t


def ring_axis(node, s: Strategy, names: tuple) -> int | None:
    """The ``cp`` axis index if ``s`` runs this sdpa as ring attention (q sequence-sharded on cp)."""
    return names.index("cp") if attention_scheme(node, s, names) == "ring" else None


def _ring_time(shapes, itemsize: int, compute_s: float, axis: int, ctx: CostContext, train: bool, mult: float) -> float:
    r"""Seconds of ring attention on P ranks (codegen/ring.py), forward plus backward when training.

    The forward passes the local K/V block P−1 times (``send_recv`` of b_kv bytes each), posted
    before each block's compute; the backward passes K/V again and their gradients (fp32, b_dkv
    bytes) P times, one step behind. A pass costs max(compute, communication), since the two
    overlap, plus the causal zig-zag exchange of one query half and one output half (and their
    gradients)::

        T = max(c_f, (P−1)·t(b_kv)) + 2·t(b_q/2)
          + [max(c_b, (P−1)·t(b_kv) + P·t(b_dkv)) + 2·t(b_q/2)]        (training)

    with c_f the block compute (the roofline over the local queries and all keys) and c_b =
    (mult − 1)·c_f.
    """
    p, link = ctx.axis_sizes[axis], ctx._op_links[axis]
    link = link.get("send_recv", link) if isinstance(link, dict) else link
    q, k, v = shapes[:3]
    kv_bytes = (math.prod(k) + math.prod(v)) / p * itemsize
    hop = lambda n: collective_time("send_recv", n, 2, link)  # noqa: E731
    relayout = 2 * hop(math.prod(q) * itemsize / 2)
    t = max(compute_s, (p - 1) * hop(kv_bytes)) + relayout
    if train and mult > 1:
        t += max((mult - 1) * compute_s, (p - 1) * hop(kv_bytes) + p * hop(kv_bytes * 4 / itemsize)) + relayout
    return t


def _node_memory(node, kind, s: Strategy, ctx: CostContext, train: bool, needs_grad: bool,
                 saves=(), optimizer: str = "adamw") -> float:
    """m_v[j]: model state for a placeholder, the activations it saves for an op (module docstring)."""
    if kind in ("param", "buffer"):
        val = node.meta["val"]
        n = math.prod(local_shape(tuple(val.shape), s.outs[0], ctx.axis_sizes))
        if kind == "param" and train and needs_grad:
            return 2.0 * n * val.element_size() + state_bytes(n, optimizer)  # weight, gradient, state
        return float(n * val.element_size())
    return float(sum(scale * itemsize * math.prod(local_shape(shape, (s.ins if w in ("in", "moe") else s.outs)[k], ctx.axis_sizes))
                     / (moe_row_share(s, ctx.axis_sizes) if w == "moe" else 1)
                     for w, k, shape, itemsize, scale, _ in saves))


def moe_row_share(s: Strategy, axis_sizes) -> int:
    """q: an ``autopar.moe`` strategy runs 1/q of its local tokens' rows (axes where tokens are
    replicated and experts sharded: each rank runs its own experts' share)."""
    return math.prod(n for n, r in zip(axis_sizes, moe_roles(s)) if r == "own-experts")


def _saved_charges(nodes, kind, edges, grads, train) -> list[list[tuple]]:
    """Per node, what autograd saves of it: ``(what, k, shape, itemsize, scale, edge)`` with what
    "in" (tensor input k, through ``edge``), "out" (output k), "extra" (an internal tensor, as a
    multiple of output k=0) or "moe" (an MoE body's rows, as a multiple of input 0 over the row share). ``scale`` is ρ/n(r) (module docstring), 0 for a read of model state."""
    into = {(e.dst, e.dst_in): i for i, e in enumerate(edges)}

    def root(u, o):  # the tensor whose storage (u, o) views
        while kind[u] == "op" and op_name(nodes[u]) in VIEW_OPS and (u, 0) in into:
            e = edges[into[u, 0]]
            u, o = e.src, e.src_out
        return u, o

    def numel(u, o):
        val = outputs_meta(nodes[u])[o] if kind[u] == "op" else nodes[u].meta["val"]
        return max(val.numel(), 1)

    charges: list[list] = [[] for _ in nodes]
    readers: dict[tuple, int] = {}
    for v, node in enumerate(nodes):
        if not (train and grads[v] and kind[v] == "op" and op_name(node) not in VIEW_OPS):
            continue
        saved = saved_by(node, [grads[edges[into[v, k]].src] for k in range(len(tensor_inputs(node)))])
        for k in saved.ins:
            e = edges[into[v, k]]
            r = root(e.src, e.src_out)
            rho = 0.0 if kind[r[0]] in ("param", "buffer") else numel(*r) / max(math.prod(e.shape), 1)
            charges[v].append(["in", k, e.shape, e.itemsize, rho, into[v, k], r])
        outs = outputs_meta(node)
        for k in saved.outs:
            charges[v].append(["out", k, tuple(outs[k].shape), outs[k].element_size(), 1.0, None, (v, k)])
        if saved.extra and outs[0] is not None:
            charges[v].append(["extra", 0, tuple(outs[0].shape), outs[0].element_size(), saved.extra, None, None])
        if op_name(node) == MOE_OP:  # the expert body's activations: saved_per_row per (token, pick) row it runs
            layer, x, w = node.target, tensor_inputs(node)[0].meta["val"], tensor_inputs(node)[3].meta["val"]
            charges[v].append(["moe", 0, tuple(x.shape), w.element_size(), layer.top_k * layer.saved_per_row / layer.hidden,
                               None, None])
        for c in charges[v]:
            readers[c[6]] = readers.get(c[6], 0) + 1
    return [[(w, k, sh, it, sc / (readers[r] if r is not None else 1), e) for w, k, sh, it, sc, e, r in cs]
            for cs in charges]
