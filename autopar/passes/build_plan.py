"""Turn a solved ShardingProblem back into a Plan: pure data, with every cost explained."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from ..cost_models.compute import op_flops
from ..placements import local_shape
from .annotate import Annotated, attention_scheme, gathers, grad_placements, moe_row_share
from .moe import MOE_OP
from .strategies import VIEW_OPS, greedy_steps, moe_a2a_axes, moe_roles, op_name, outputs_meta, tensor_inputs


def moe_layout(s, axes) -> str:
    """``ep=all-to-all tp=own-experts dp=data`` for an ``autopar.moe`` strategy (strategies._moe_rules)."""
    return " ".join(f"{a}={r}" for a, r in zip(axes, moe_roles(s)) if r) or "replicated"


def moe_entry(layer, s, axes, params: dict) -> dict:
    """What the plan records of one MoE layer: the layout, who exchanges tokens, and dispatch."""
    a2a = [axes[a] for a in moe_a2a_axes(s)]
    return {"layer": layer.name, "experts": layer.experts, "top_k": layer.top_k,
            "expert_params": [params[p] for p in layer.params], "layout": moe_layout(s, axes),
            "exchange_axis": a2a[0] if a2a else None,
            "expert_axes": [a for a, e in zip(axes, s.ins[3]) if e.kind == "S"],
            "dispatch": "dropless", "capacity_factor": None, "placement": None}


def _pl_dict(axes, pl) -> dict | None:
    return None if pl is None else dict(_pl_items(tuple(axes), pl))


@functools.lru_cache(maxsize=4096)
def _pl_items(axes: tuple, pl: tuple) -> tuple:
    return tuple((a, str(p)) for a, p in zip(axes, pl))


def _coll(c, phase, tensor, node, src, dst, axes) -> dict:
    d = dataclasses.asdict(c)
    d.update(phase=phase, tensor=tensor, node=node, src=_pl_dict(axes, src), dst=_pl_dict(axes, dst))
    return d


def build_plan(an: Annotated, solution, hardware: str):
    """The Plan for ``solution.choice``, itemised with the same cost queries the solver was given."""
    from ..plan import Plan

    ctx, choice = an.ctx, solution.choice
    feeding: dict[int, list[int]] = {}  # decision node -> its producers
    touching: dict[int, list[int]] = {}  # decision node -> indices of the edges at it
    for k, e in enumerate(an.edges):
        feeding.setdefault(e.dst, []).append(e.src)
        touching.setdefault(e.src, []).append(k)
        touching.setdefault(e.dst, []).append(k)

    axes = list(an.axes)
    chosen = [an.strategies[v][c] for v, c in enumerate(choice)]

    nodes = []
    param_placements: dict[str, dict[str, str]] = {}
    input_placements = []
    for v, node in enumerate(an.nodes):
        s = chosen[v]
        outs = [_pl_dict(axes, o) for o in s.outs]
        val = node.meta.get("val")
        entry = {
            "name": node.name,
            "op": "placeholder" if node.op == "placeholder" else "output" if node.op == "output" else op_name(node),
            "kind": an.kind[v],
            "placements": outs[0] if len(outs) == 1 else outs if outs else None,
            "inputs": [_pl_dict(axes, i) for i in s.ins],
            "source": s.source,
            "compute_s": float(an.node_cost[v][choice[v]]),
        }
        if hasattr(val, "shape"):
            entry["shape"] = list(val.shape)
            entry["dtype"] = str(val.dtype).replace("torch.", "")
        nodes.append(entry)
        if an.kind[v] == "param":
            param_placements[an.tg.params[node.name]] = outs[0]
        elif an.kind[v] == "input":
            input_placements.append(outs[0])

    for alias, canonical in an.tg.aliases.items():
        param_placements[an.tg.params[alias]] = param_placements[an.tg.params[canonical]]

    def param_root(v: int) -> int | None:
        """The parameter a tensor is a pure view of (permute/view chains), if any: a gradient that
        must be reduced there is that parameter's gradient sync, wherever the model puts it."""
        while an.kind[v] == "op" and op_name(an.nodes[v]) in VIEW_OPS:
            if len(feeding.get(v, ())) != 1:
                return None
            v = feeding[v][0]
        return v if an.kind[v] == "param" else None

    collectives = []
    comm_fwd = comm_bwd = grad_sync = 0.0
    seen: set[tuple] = set()
    for e in an.edges:
        s_src, s_dst = chosen[e.src], chosen[e.dst]
        src, dst = s_src.outs[e.src_out], s_dst.ins[e.dst_in]
        tensor, consumer = an.nodes[e.src].name, an.nodes[e.dst].name
        if (e.src, e.src_out, dst) not in seen:  # consumers wanting the same placement share one
            seen.add((e.src, e.src_out, dst))
            for c in ctx.collectives(src, dst, e.shape, e.itemsize):
                collectives.append(_coll(c, "fwd", tensor, consumer, src, dst, axes))
                comm_fwd += c.time_s
        if e.grad:
            g, need = grad_placements(dst, s_dst.outs[0] if s_dst.outs else None, src)
            root = param_root(e.src)
            for c in ctx.collectives(g, need, e.shape, e.itemsize):
                # Gradients from several consumers (q, k and v of one input; tied embeddings)
                # are summed locally first and reduced once: one collective per (tensor, op, axis).
                owner = an.nodes[root].name if root is not None else tensor
                key = (owner, e.src_out, c.op, c.axis)
                if key in seen:
                    continue
                seen.add(key)
                if root is not None:
                    collectives.append(_coll(c, "grad_sync", owner, consumer, g, need, axes))
                    grad_sync += c.time_s
                else:
                    collectives.append(_coll(c, "bwd", tensor, consumer, g, need, axes))
                    comm_bwd += c.time_s

    into = {(e.dst, e.dst_in): e for e in an.edges}
    for v, saves in enumerate(an.saves or ()):  # a saved gather (or view of one) is gathered again in backward
        for what, k, _shape, _itemsize, _scale, e in saves:
            if what != "in":
                continue
            e, pl = an.edges[e], chosen[v].ins[k]
            while True:
                have = chosen[e.src].outs[e.src_out]
                if have != pl:
                    break
                if an.kind[e.src] != "op" or op_name(an.nodes[e.src]) not in VIEW_OPS or (e.src, 0) not in into:
                    break
                e, pl = into[e.src, 0], chosen[e.src].ins[0]
            if have != pl and gathers(ctx, have, pl, e.shape):
                for c in ctx.collectives(have, pl, e.shape, e.itemsize):
                    collectives.append(_coll(c, "bwd", an.nodes[e.src].name, an.nodes[v].name, have, pl, axes))
                    comm_bwd += c.time_s

    compute = float(sum(an.node_cost[v][c] for v, c in enumerate(choice)))
    mem, node_bytes = _memory(an, chosen, choice)
    peak = sum(mem.values())

    explanations = {}
    for v, node in enumerate(an.nodes):
        if an.kind[v] != "param" or len(an.strategies[v]) < 2:
            continue
        alts = _local_alternatives(an, v, choice, touching.get(v, ()))
        fqn = an.tg.params[node.name]
        best = alts[choice[v]]
        explanations[fqn] = {
            "chosen": "/".join(f"{a}={p}" for a, p in zip(axes, chosen[v].outs[0])),
            "alternatives": sorted(
                ({"placements": _pl_dict(axes, an.strategies[v][i].outs[0]), "cost_s": float(t), "delta_s": float(t - best)}
                 for i, t in enumerate(alts) if math.isfinite(t)), key=lambda d: d["cost_s"]),
            "reason": "local cost (the parameter's own update, its gradient sync and the redistributions "
                      "to its consumers) with every other choice held fixed",
        }

    for v, node in enumerate(an.nodes):
        scheme = attention_scheme(node, chosen[v], tuple(axes)) if an.kind[v] == "op" else None
        if scheme is None:
            continue
        nodes[v]["attention"] = scheme
        alts = _local_alternatives(an, v, choice, touching.get(v, ()))
        by_scheme: dict[str, float] = {}
        for i, t in enumerate(alts):
            k = attention_scheme(node, an.strategies[v][i], tuple(axes))
            if math.isfinite(t) and t < by_scheme.get(k, math.inf):
                by_scheme[k] = float(t)
        explanations[node.name] = {
            "chosen": scheme,
            "alternatives": sorted(({"attention": k, "cost_s": t, "delta_s": t - by_scheme.get(scheme, t)}
                                    for k, t in by_scheme.items()), key=lambda d: d["cost_s"]),
            "reason": "attention on the cp axis: the best strategy of each scheme (its compute, ring passes or "
                      "all-to-alls, and the redistributions to and from its neighbours) with every other choice held fixed",
        }

    for v, node in enumerate(an.nodes):
        if an.kind[v] != "op" or op_name(node) != MOE_OP:
            continue
        nodes[v]["moe"] = moe_entry(node.target, chosen[v], axes, an.tg.params)
        alts = _local_alternatives(an, v, choice, touching.get(v, ()))
        by_layout: dict[str, float] = {}
        for i, t in enumerate(alts):
            k = moe_layout(an.strategies[v][i], axes)
            if math.isfinite(t) and t < by_layout.get(k, math.inf):
                by_layout[k] = float(t)
        chosen_layout = moe_layout(chosen[v], axes)
        explanations[node.name] = {
            "chosen": chosen_layout,
            "alternatives": sorted(({"moe": k, "cost_s": t, "delta_s": t - by_layout.get(chosen_layout, t)}
                                    for k, t in by_layout.items()), key=lambda d: d["cost_s"]),
            "reason": f"MoE layer {node.target.name} ({node.target.experts} experts, top-{node.target.top_k}): the "
                      "best strategy of each layout (expert compute, all-to-alls, gradient syncs and the "
                      "redistributions to and from its neighbours) with every other choice held fixed",
        }

    for entry, b in zip(nodes, node_bytes):
        entry["memory_bytes"] = int(b)
    # wall-clock times are facts about this run, not the plan (Plan.timings): the same problem gives the same bytes
    times = {"solve_time_s": float(solution.solve_time_s), **{k: float(v) for k, v in solution.stats.items()
                                                             if k.endswith("time_s")}}
    plan = Plan(
        mesh=dict(an.axes), hardware=hardware, mode=an.mode, graph_hash=an.tg.graph_hash, model=an.tg.model_name,
        step_time_s=float(compute + comm_fwd + comm_bwd + grad_sync),
        peak_memory_bytes=int(peak), memory=mem,
        time_breakdown={"compute_s": compute, "comm_fwd_s": comm_fwd, "comm_bwd_s": comm_bwd, "grad_sync_s": grad_sync},
        param_placements=param_placements, input_placements=input_placements, nodes=nodes,
        collectives=collectives,
        solver={"name": solution.stats.get("solver", "cp-sat"), "status": solution.status,
                "objective_s": float(solution.objective),
                **{k: v for k, v in solution.stats.items() if isinstance(v, (int, float, str)) and k not in times}},
        warnings=list(an.warnings), explanations=explanations, optimizer=an.optimizer, model_flops=model_flops(an))
    plan.timings.update(times)
    return plan


def model_flops(an: Annotated) -> float:
    """The whole model's FLOPs per step on the traced graph's global shapes, the numerator of MFU:
    Σ op_flops over its ops (an MoE layer: φ·T·k, its body's FLOPs per row times its rows), times 3
    when training (backward ≈ 2 × forward, the usual MFU convention)."""
    total = 0.0
    for v, node in enumerate(an.nodes):
        name = op_name(node)
        if an.kind[v] != "op" or name in VIEW_OPS:
            continue
        ins = [a.meta["val"] for a in tensor_inputs(node)]
        if name == MOE_OP:
            total += node.target.flops_per_row * ins[0].shape[0] * node.target.top_k
        else:
            outs = [tuple(o.shape) for o in outputs_meta(node) if o is not None]
            total += op_flops(name, [tuple(t.shape) for t in ins], outs)
    return float(total * (3 if an.mode == "train" else 1))


def _memory(an: Annotated, chosen, choice) -> tuple[dict, list[float]]:
    """The memory breakdown per device (``cost_models/memory.py``; buffers count as parameters)
    for the chosen strategies, and each node's share of it.

    Unlike the solver's node-local m_v, activations are counted as the lowered program holds
    them: one storage per (tensor, placement). A saved read that a redistribution feeds is its own
    copy (shared by the consumers that want that placement, as ``lower`` shares it); a saved read
    of a view is the storage it views; a saved parameter read in its own placement is the
    parameter. On a backend without all-to-all (gloo) the last step S(d)->S(e) of a redistribution
    is an all-gather and a chunk, a view that keeps the gathered buffer when every dim before e
    has size 1 (``_gathered``). Transient T is the largest working set of one op, its inputs and
    outputs at once: in backward, the gradients it holds together (they have the same shapes).
    """
    sizes = an.ctx.axis_sizes
    into = {(e.dst, e.dst_in): e for e in an.edges}

    def nbytes(shape, itemsize, pl):
        return float(itemsize * math.prod(local_shape(tuple(shape), pl, sizes)))

    def out_meta(u, o):
        return outputs_meta(an.nodes[u])[o] if an.kind[u] == "op" else an.nodes[u].meta["val"]

    def storage(e, pl):  # (key, bytes) of the storage a read of edge e in placement pl lands in
        while True:
            u, o = e.src, e.src_out
            have = chosen[u].outs[o]
            if have != pl and gathers(an.ctx, have, pl, e.shape):
                pl = have  # a gathered value (or a view of one) is kept as its shard (runtime.Executor._pack)
                continue
            if have != pl:  # a redistribution's output
                return (u, o, pl), nbytes(e.shape, e.itemsize, pl) * _gathered(an.ctx, have, pl, e.shape)
            if an.kind[u] in ("param", "buffer"):
                return None, 0.0
            if an.kind[u] != "op" or op_name(an.nodes[u]) not in VIEW_OPS or (u, 0) not in into:
                val = out_meta(u, o)
                return (u, o, have), nbytes(val.shape, val.element_size(), have)
            e, pl = into[u, 0], chosen[u].ins[0]

    mem = dict.fromkeys(("parameters", "gradients", "optimizer", "activations", "transient"), 0.0)
    node_bytes, seen = [], set()
    for v, node in enumerate(an.nodes):
        s, b = chosen[v], 0.0
        if an.kind[v] in ("param", "buffer"):
            val = node.meta["val"]
            w = nbytes(val.shape, val.element_size(), s.outs[0])
            b = float(an.node_mem[v][choice[v]])
            mem["parameters"] += w
            if b > w:
                mem["gradients"] += w
                mem["optimizer"] += b - 2 * w
        for what, k, shape, itemsize, scale, e in an.saves[v] if an.saves else ():
            if what == "in":
                key, x = storage(an.edges[e], s.ins[k])
            elif what == "moe":  # the expert body's rows (annotate._saved_charges)
                key, x = (v, what), scale * nbytes(shape, itemsize, s.ins[k]) / moe_row_share(s, an.ctx.axis_sizes)
            else:  # "out" is the storage v's readers share; "extra" is v's own
                key = (v, k, s.outs[k]) if what == "out" else (v, what)
                x = (scale if what == "extra" else 1.0) * nbytes(shape, itemsize, s.outs[k])
            if key is not None and key not in seen:
                seen.add(key)
                mem["activations"] += x
                b += x
        if an.kind[v] == "op" and op_name(node) not in VIEW_OPS:
            ins = [(into[v, k].shape, into[v, k].itemsize, pl) for k, pl in enumerate(s.ins) if (v, k) in into]
            outs = [(t.shape, t.element_size(), pl) for t, pl in zip(outputs_meta(node), s.outs) if t is not None]
            mem["transient"] = max(mem["transient"], sum(nbytes(*x) for x in ins + outs))
        node_bytes.append(b)
    return {k: int(round(x)) for k, x in mem.items()}, node_bytes


def _local_alternatives(an: Annotated, v: int, choice: list[int], edges_at_v) -> np.ndarray:
    """Cost of each strategy of node v with every other node's choice held fixed."""
    total = an.node_cost[v].astype(float).copy()
    for k in edges_at_v:
        e, m = an.edges[k], an.edge_cost[k]
        if e.src == v:
            total += m[:, choice[e.dst]]
        elif e.dst == v:
            total += m[choice[e.src], :]
    return total


def _gathered(ctx, src, dst, shape) -> int:
    """Size of a redistribution's output storage over its local size (see ``_memory``)."""
    steps = greedy_steps(ctx.axis_sizes, src, dst) if ctx.a2a_as_all_gather else ()
    if steps and steps[-1][1].kind == steps[-1][2].kind == "S":
        a, e = steps[-1][0], steps[-1][2].dim % len(shape)
        if math.prod(local_shape(tuple(shape), dst, ctx.axis_sizes)[:e]) == 1:
            return ctx.axis_sizes[a]
    return 1
