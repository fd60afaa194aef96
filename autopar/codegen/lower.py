"""Lower a plan onto the traced graph: one program that every rank runs on its own shards.

The lowered program is an fx graph over DTensors. Every data movement the plan chose is an
explicit node:

* ``from_full(x, placements)``: a full input (or buffer) becomes this rank's shard; slicing only;
* ``redistribute(x, placements)``: a collective (all-reduce, all-gather, reduce-scatter,
  all-to-all), with the predicted collectives in ``node.meta["autopar.collectives"]``;
* ``local_call(op, placements, ...)``: ops that autopar shards with its own rules (attention)
  or runs replicated (ops without a rule, factory ops) run on local tensors;
* ``to_full(x)``: an output leaves the program as a full, replicated tensor.

Every other ATen op runs through DTensor on inputs already in the placements its strategy
requires, so DTensor computes locally and inserts nothing; ``check`` nodes verify after each op
that the output placement is the planned one, and record a fix-up if it is not.

Backward needs no separate program: autograd transposes every node (the backward of an
all-gather is a reduce-scatter, of ``to_full`` a local slice), and parameter gradients are
brought to their parameter's placement by ``runtime.sync_gradients`` (data parallelism's
all-reduce, or ZeRO's reduce-scatter).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..passes.moe import MOE_OP
from ..passes.strategies import SKIP_OPS, OWN_RULES, op_name, tensor_inputs
from ..placements import parse
from ..passes.trace import TracedGraph

META_COLL = "autopar.collectives"
META_ORIGIN = "autopar.origin"  # the traced node a lowered node was made for (a move: its consumer)
META_PLACED = "autopar.placed"  # the planned placements of a lowered tensor value, as strings


# Marker targets: the executor (runtime.Executor) gives them meaning with the live mesh.
def from_full(x, placements):
    raise RuntimeError("autopar lowered graphs run under autopar.codegen.runtime.Executor")


def redistribute(x, placements):
    raise RuntimeError("autopar lowered graphs run under autopar.codegen.runtime.Executor")


def local_call(op, placements, args, kwargs):
    raise RuntimeError("autopar lowered graphs run under autopar.codegen.runtime.Executor")


def check(x, placements, name):
    raise RuntimeError("autopar lowered graphs run under autopar.codegen.runtime.Executor")


def to_full(x):
    raise RuntimeError("autopar lowered graphs run under autopar.codegen.runtime.Executor")


MARKERS = (from_full, redistribute, local_call, check, to_full)


def _pl(d: dict, axes) -> tuple:
    return tuple(parse(d[a]) for a in axes)


def lower(tg: TracedGraph, plan, collectives_of, *, module: bool = True):
    """Build the lowered program from ``tg`` and the plan's per-node placements (``module=False``:
    its fx.Graph only, not compiled to Python, for reading it).

    ``collectives_of(src, dst, shape, itemsize)`` returns the predicted collectives of one
    redistribution (the same pure planner the cost model used).
    """
    axes = list(plan.mesh)
    by_name = {n["name"]: n for n in plan.nodes}
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placed: dict[fx.Node, tuple] = {}  # new node -> its planned placements (single tensor)

    def out_pls(name, idx=0):
        p = by_name[name]["placements"]
        p = p[idx] if isinstance(p, list) else p
        return None if p is None else _pl(p, axes)

    moves: dict[tuple, fx.Node] = {}  # (tensor, placements) -> its redistribution, shared by consumers

    def move(new_in: fx.Node, src_meta_node: fx.Node, want: tuple) -> fx.Node:
        have = placed.get(new_in)
        if have is None or have == want:
            return new_in
        if (new_in, want) in moves:
            return moves[new_in, want]
        val = src_meta_node.meta["val"]
        r = g.call_function(redistribute, (new_in, tuple(map(str, want))))
        r.meta[META_COLL] = [dataclasses.asdict(c) for c in collectives_of(have, want, tuple(val.shape), val.element_size())]
        r.meta["val"] = val
        placed[r] = want
        moves[new_in, want] = r
        return r

    def tag(origin: str) -> None:
        for n in reversed(g.nodes):
            if META_ORIGIN in n.meta:
                break
            n.meta[META_ORIGIN] = origin

    prev = None
    for node in tg.gm.graph.nodes:
        if prev is not None:
            tag(prev)
        prev = node.name
        if node.op == "placeholder":
            p = g.placeholder(node.name)
            p.meta["val"] = node.meta.get("val")
            want = out_pls(tg.aliases.get(node.name, node.name))
            if node.name in tg.params:
                env[node] = p
            else:
                env[node] = g.call_function(from_full, (p, tuple(map(str, want))))
                env[node].meta["val"] = node.meta.get("val")
            placed[env[node]] = want
            continue
        if node.op == "call_function" and node.target is operator.getitem:
            src = env[node.args[0]]
            new = g.call_function(operator.getitem, (src, node.args[1]))
            new.meta["val"] = node.meta.get("val")
            producer = node.args[0]
            while producer.op == "call_function" and producer.target is operator.getitem:
                producer = producer.args[0]
            pl = out_pls(producer.name, node.args[1]) if isinstance(by_name[producer.name]["placements"], list) else out_pls(producer.name)
            if pl is not None:
                placed[new] = pl
            env[node] = new
            continue
        if node.op == "call_function" and op_name(node) in SKIP_OPS:
            continue
        entry = by_name[node.name]
        wants = [_pl(d, axes) for d in entry["inputs"]]
        ins = tensor_inputs(node) if node.op == "call_function" else [
            a for a in pytree.tree_leaves(node.args) if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)]
        moved = {}
        for k, a in enumerate(ins):
            moved.setdefault(a, []).append(move(env[a], a, wants[k]))
        counters = {a: 0 for a in moved}

        def sub(a):
            if isinstance(a, fx.Node):
                if a in moved:
                    r = moved[a][counters[a]]
                    counters[a] = min(counters[a] + 1, len(moved[a]) - 1)
                    return r
                return env[a]
            return a

        args, kwargs = pytree.tree_map_only(fx.Node, sub, (node.args, node.kwargs))
        if node.op == "output":
            outs = pytree.tree_map_only(fx.Node, lambda a: g.call_function(to_full, (a,)), args[0])
            g.output(outs)
            continue
        pls = entry["placements"]
        pls_str = [None if p is None else tuple(p[a] for a in axes) for p in (pls if isinstance(pls, list) else [pls])]
        if entry.get("source") in ("autopar", "fallback", "factory") or op_name(node) in OWN_RULES:
            op = (MOE, node.target, entry.get("moe") or {}) if op_name(node) == MOE_OP else \
                _local_op(node, pls_str[0], axes, entry["inputs"])
            new = g.call_function(local_call, (op, tuple(pls_str), tuple(args), kwargs))
        else:
            # view -> reshape: identical values in a functional graph, but a shard whose strides
            # differ from the traced tensor's (size-1 local dims, kernels run on shards) may not
            # be viewable; reshape copies only then.
            target = torch.ops.aten.reshape.default if node.target is torch.ops.aten.view.default else node.target
            new = g.call_function(target, tuple(args), kwargs)
            new.meta["val"] = node.meta.get("val")
            new = g.call_function(check, (new, tuple(pls_str), node.name))
        new.meta["val"] = node.meta.get("val")
        if not isinstance(pls, list):
            placed[new] = out_pls(node.name)
        env[node] = new
    tag(prev)
    for n, pls in placed.items():
        if pls is not None:
            n.meta[META_PLACED] = tuple(map(str, pls))
    return fx.GraphModule(torch.nn.Module(), g) if module else g


RING_ATTENTION = "autopar.ring_attention"  # a local_call op by name: the executor binds it to codegen/ring.py


KV_REPLICATED = "autopar.sdpa_kv_replicated"  # GQA with query heads sharded past the kv heads


MOE = "autopar.moe"  # (MOE, layer, the plan's moe entry): codegen/moe.py dispatches its tokens


FUSED = "autopar.fused"  # (FUSED, fusion.FusedOp): one generated kernel for a group of ops (codegen/fusion.py)


def _local_op(node: fx.Node, out_pl, axes: list, ins: list):
    """What a ``local_call`` runs: the node's own op; ring attention for sdpa whose output is
    sequence-sharded on ``cp``; or, for GQA sdpa whose query heads are sharded on an axis where
    K/V are replicated, ``(KV_REPLICATED, q placements, k placements)`` (strategies._sdpa_rules)."""
    if op_name(node) != "aten.scaled_dot_product_attention.default" or out_pl is None:
        return node.target
    if "cp" in axes:
        p = parse(out_pl[axes.index("cp")])
        if p.kind == "S" and p.dim == node.meta["val"].dim() - 2:
            return RING_ATTENTION
    q_pl, k_pl = (tuple(ins[i][a] for a in axes) for i in (0, 1))
    if any(parse(q).kind == "S" and parse(k).kind == "R" for q, k in zip(q_pl, k_pl)):
        return (KV_REPLICATED, q_pl, k_pl)
    return node.target


def count_collectives(gm: fx.GraphModule) -> dict[tuple[str, str], int]:
    """(op, axis) -> number of forward collectives in a lowered program."""
    counts: dict[tuple[str, str], int] = {}
    for n in gm.graph.nodes:
        for c in n.meta.get(META_COLL, ()):
            key = (c["op"], c["axis"])
            counts[key] = counts.get(key, 0) + 1
    return counts
