"""Annotate the traced graph with candidate strategies and their costs, as a ShardingProblem.

Decision nodes are placeholders (parameters, buffers, constants, user inputs), ATen ops and the
output. ``getitem`` nodes are not decisions: they select one output of a multi-output op, so a
consumer of ``getitem(u, k)`` is wired straight to ``u``'s k-th output.

Costs, all in seconds per training (or inference) step, from one hardware preset:

* node v, strategy j: roofline time of the op on its local shards,
  ``c_v[j] = f · max(flops_local / peak, bytes_local / mem_bw)`` with ``f = 1 + bwd/fwd`` in
  training, the ratio of backward to forward FLOPs that the joint graph measured for v's source
  op (``passes/joint.py``; 3 when unknown), and 1 for inference; a trainable parameter also pays
  its AdamW update, which is memory bound on its local shard;
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
* memory m_v[j]: bytes per device that stay live at the training peak (the start of the
  backward pass): parameters with their gradient and two AdamW moments, plus the activations
  the joint graph saves for backward (each op's output, scaled by the share of its source op's
  outputs that backward reads). In inference only parameters count in the constraint.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx

from ..cost_models.comm import axis_links, price_steps
from ..cost_models.compute import compute_time, op_bytes, op_flops
from ..cost_models.hardware import Hardware
from ..placements import REPLICATE, Placement, local_shape
from ..solvers.intra_op import ShardingProblem
from .strategies import (SKIP_OPS, VIEW_OPS, Strategy, StrategyEnumerator, op_name, outputs_meta,
                         redistribute_steps, tensor_candidates, tensor_inputs)
from .joint import source_of
from .trace import TracedGraph

ADAMW_BYTES_PER_ELEMENT = 7  # AdamW touches p, g, m, v (read) and p, m, v (write): 7 tensors


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

    def problem(self, memory_limit: float | None) -> ShardingProblem:
        return ShardingProblem(
            node_costs=self.node_cost, node_memory=self.node_mem,
            edges=[(e.src, e.dst) for e in self.edges], edge_costs=self.edge_cost,
            memory_limit=memory_limit, names=[n.name for n in self.nodes])


class CostContext:
    """Shared, cached cost queries for one mesh on one hardware preset.

    A redistribution is priced step by step (``cost_models.comm.price_steps``) in the order and
    with the intermediate placements DTensor executes it (``strategies.redistribute_steps``).
    Backends without all-to-all (gloo) run it as an all-gather, and are priced so.
    """

    def __init__(self, axes: dict[str, int], hw: Hardware):
        self.axes = axes
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
        steps = tuple((dim, a, b) for dim, a, b, _ in redistribute_steps(self.axes, src, dst, shape, itemsize))
        return price_steps(steps, src, shape, itemsize, tuple(self.axes.items()), self._op_links, self.a2a_as_all_gather)

    def time(self, src, dst, shape, itemsize) -> float:
        return sum(c.time_s for c in self.collectives(src, dst, shape, itemsize))


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
             trainable: set[str] | None = None, joint: dict | None = None) -> Annotated:
    """Enumerate strategies for every decision node and cost every node and edge."""
    enum = StrategyEnumerator(axes)
    ctx = CostContext(axes, hw)
    train = mode == "train"
    nodes: list[fx.Node] = []
    kind: list[str] = []
    strategies: list[list[Strategy]] = []
    index: dict[fx.Node, int] = {}
    resolve: dict[fx.Node, tuple[int, int]] = {}  # tensor-producing fx node -> (decision index, output)
    needs_grad: dict[fx.Node, bool] = {}
    edges: list[Edge] = []
    trainable = set(tg.params.values()) if trainable is None else trainable

    def add(node, k, strats):
        index[node] = len(nodes)
        nodes.append(node)
        kind.append(k)
        strategies.append(strats)
        resolve[node] = (index[node], 0)

    for node in tg.gm.graph.nodes:
        if node.op == "placeholder" and node.name in tg.aliases:
            continue  # a tied parameter: planned once, under the placeholder the graph uses
        if node.op == "placeholder":
            val = node.meta.get("val")
            k = "param" if node.name in tg.params else "buffer" if node.name in tg.buffers or node.name in tg.constants else "input"
            cands = tensor_candidates(tuple(val.shape), ctx.axis_sizes) if isinstance(val, torch.Tensor) else [()]
            if k == "param" and "dp" in axes:
                # A "dp" axis is data parallel: parameters are replicated along it and the solver
                # shards activations. (Sharded parameters along dp, ZeRO-3, are not planned yet.)
                dp = list(axes).index("dp")
                cands = [pl for pl in cands if pl[dp].kind == "R"]
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
            add(node, "op", enum.for_node(node, cands))
            needs_grad[node] = any(needs_grad.get(a, False) for a in ins) and any(_is_float(t) for t in outputs_meta(node))
        else:
            raise NotImplementedError(f"unexpected fx node {node.op} {node.target}")
        v = index[node]
        for k_in, a in enumerate(ins):
            p, o = resolve[a]
            val = a.meta["val"]
            edges.append(Edge(p, o, v, k_in, tuple(val.shape), val.element_size(), train and needs_grad.get(a, False)))

    node_cost, node_mem = [], []
    joint = joint or {}
    for v, node in enumerate(nodes):
        src = joint.get(source_of(node)) if kind[v] == "op" else None
        bwd = src.backward_ratio if src is not None else None
        kept = src.saved_fraction if src is not None else None
        # without the joint graph: backward does twice the forward's work and keeps every output
        mult = (1.0 + (2.0 if bwd is None else bwd)) if train and needs_grad.get(node, False) else 1.0
        node_cost.append(np.array([mult * _node_time(node, kind[v], s, ctx, train, needs_grad.get(node, False))
                                   for s in strategies[v]]))
        node_mem.append(np.array([_node_memory(node, kind[v], s, ctx, train, needs_grad.get(node, False))
                                  * (1.0 if kept is None or kind[v] != "op" else kept) for s in strategies[v]], dtype=float))

    # A gradient that several consumers send back to one tensor is summed locally and reduced
    # once, so each of those edges pays an equal share of the backward collective.
    grad_fanout: dict[tuple[int, int], int] = {}
    for e in edges:
        if e.grad:
            grad_fanout[e.src, e.src_out] = grad_fanout.get((e.src, e.src_out), 0) + 1

    edge_cost = []
    for e in edges:
        consumer = strategies[e.dst]
        srcs = [s.outs[e.src_out] for s in strategies[e.src]]
        m = np.zeros((len(srcs), len(consumer)))
        for j, cs in enumerate(consumer):
            dst = cs.ins[e.dst_in]
            cout = cs.outs[0] if cs.outs else None
            for i, src in enumerate(srcs):
                if any(d.kind == "P" and s_.kind != "P" for s_, d in zip(src, dst)):
                    m[i, j] = np.inf  # DTensor cannot make a value partial; such strategies need a partial producer
                    continue
                t = ctx.time(src, dst, e.shape, e.itemsize)
                if e.grad:
                    g, need = grad_placements(dst, cout, src)
                    t += ctx.time(g, need, e.shape, e.itemsize) / grad_fanout[e.src, e.src_out]
                m[i, j] = t
        edge_cost.append(m)

    return Annotated(tg, axes, mode, nodes, kind, strategies, edges, node_cost, node_mem, edge_cost,
                     ctx=ctx, warnings=list(enum.warnings))


def local_shapes(metas, pls, axis_sizes):
    return [None if t is None else local_shape(tuple(t.shape), pl or (), axis_sizes) for t, pl in zip(metas, pls)]


def _node_time(node, kind, s: Strategy, ctx: CostContext, train: bool, needs_grad: bool) -> float:
    if kind == "param":
        if not train or not needs_grad:
            return 0.0
        val = node.meta["val"]
        n = math.prod(local_shape(tuple(val.shape), s.outs[0], ctx.axis_sizes))
        return compute_time(10.0 * n, ADAMW_BYTES_PER_ELEMENT * 4.0 * n, "float32", ctx.hw)
    if kind != "op":
        return 0.0
    name = op_name(node)
    if name in VIEW_OPS:
        return 0.0
    ins = [a.meta["val"] for a in tensor_inputs(node)]
    outs = outputs_meta(node)
    in_shapes = local_shapes(ins, s.ins, ctx.axis_sizes)
    out_shapes = local_shapes(outs, s.outs, ctx.axis_sizes)
    ref = next((t for t in outs if t is not None), ins[0] if ins else None)
    itemsize = ref.element_size() if ref is not None else 4
    dtype = str(ref.dtype) if ref is not None else "torch.float32"
    return compute_time(op_flops(name, in_shapes, [o for o in out_shapes if o is not None]),
                        op_bytes(name, in_shapes, [o for o in out_shapes if o is not None], itemsize), dtype, ctx.hw)


def _node_memory(node, kind, s: Strategy, ctx: CostContext, train: bool, needs_grad: bool) -> float:
    if kind in ("param", "buffer"):
        val = node.meta["val"]
        b = math.prod(local_shape(tuple(val.shape), s.outs[0], ctx.axis_sizes)) * val.element_size()
        if kind == "param" and train and needs_grad:
            return b * 2 + 2 * b * (4 / val.element_size())  # weight + grad + two fp32 AdamW moments
        return b
    if kind == "op" and train and needs_grad and op_name(node) not in VIEW_OPS:
        return float(sum(math.prod(sh) * t.element_size()
                         for t, sh in zip(outputs_meta(node), local_shapes(outputs_meta(node), s.outs, ctx.axis_sizes))
                         if t is not None))
    return 0.0
