"""Routing statistics of MoE models, and the expert placement a plan takes from them.

``profile_routing`` runs a calibration batch through the traced model on one process and
records, for every MoE layer (passes/moe.py), where each token's top-k picks went. ``place_experts``
turns those statistics into a per-layer expert placement (solvers/expert_placement.py) and writes
it into the plan; the runtime stores each layer's expert tensors in that order, so that plain
sharding of the expert dim gives each rank the experts the placement chose for it.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
import torch.fx as fx

from .errors import AutoparError
from .solvers.expert_placement import Placement, RoutingStats, contiguous, predict, solve_placement


class _Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.picks: list[torch.Tensor] = []

    def call_function(self, target, args, kwargs):
        from .passes.moe import MoeLayer

        if isinstance(target, MoeLayer):
            self.picks.append(args[1].detach().reshape(args[1].shape[0], -1).long())
        return super().call_function(target, args, kwargs)


def profile_routing(model: torch.nn.Module, example_inputs, *, example_kwargs: dict | None = None,
                    shards: int = 1) -> RoutingStats:
    """Routing statistics of ``model`` on a calibration batch: tokens per expert and layer, and
    the inter-layer transitions (solvers/expert_placement.py). ``shards`` also splits the counts
    over that many equal slices of the batch's tokens, in order (the ranks a data-sharded batch
    lands on), which predicts each rank's all-to-all traffic."""
    from .passes.trace import trace

    tg = trace(model, example_inputs, example_kwargs)
    if not tg.moe:
        why = "; ".join(w for w in tg.warnings if "MoE" in w)
        raise AutoparError(f"{type(model).__name__} has no MoE layer autopar can run expert-parallel"
                           + (f" ({why})" if why else " (no top-k routing over expert weights in its graph)"))
    if len({m.experts for m in tg.moe}) != 1:
        raise AutoparError(f"MoE layers with different expert counts {[m.experts for m in tg.moe]}: "
                           "routing statistics need one count")
    if not isinstance(shards, int) or shards < 1:
        raise AutoparError(f"shards must be a positive int, got {shards!r}")
    params, buffers = dict(model.named_parameters(remove_duplicate=False)), dict(model.named_buffers())
    flat = torch.utils._pytree.tree_leaves((tuple(example_inputs), example_kwargs or {}))
    args = tg.feed(params, buffers, iter(flat))
    rec = _Recorder(tg.gm)
    with torch.no_grad():
        rec.run(*args)
    E, k = tg.moe[0].experts, tg.moe[0].top_k
    T = rec.picks[0].shape[0]
    if T % shards:
        raise AutoparError(f"{T} tokens do not split into {shards} equal shards")
    onehot = [torch.nn.functional.one_hot(p, E).sum(1).numpy() for p in rec.picks]  # [T, E] picks per token
    counts = np.stack([h.sum(0) for h in onehot])
    trans = np.stack([a.T @ b for a, b in zip(onehot, onehot[1:])]) if len(onehot) > 1 else np.zeros((0, E, E))
    per_shard = np.stack([h.reshape(shards, T // shards, E).sum(1) for h in onehot])
    return RoutingStats(counts, trans, T, k, per_shard)


def _load(routing) -> RoutingStats:
    if isinstance(routing, RoutingStats):
        return routing
    if isinstance(routing, (str, os.PathLike)):
        return RoutingStats.load(routing)
    raise AutoparError(f"routing must be autopar.RoutingStats (from autopar.profile_routing) or the path of one "
                       f"saved with .save(path); got {type(routing).__name__}")


def place_experts(plan, routing, mesh_axes: dict, progress=lambda m: None, time_limit_s: float = 8.0) -> None:
    """Solve the expert placement for ``plan``'s MoE layers from ``routing`` and record it."""
    stats = _load(routing)
    entries = [n["moe"] for n in plan.nodes if n.get("moe")]
    if len(entries) != stats.layers or any(e["experts"] != stats.experts for e in entries):
        raise AutoparError(f"the routing statistics describe {stats.layers} layers of {stats.experts} experts, but the "
                           f"model has {len(entries)} MoE layers of {sorted({e['experts'] for e in entries})} experts")
    groups = {math.prod(mesh_axes[a] for a in e["expert_axes"]) for e in entries}
    if len(groups) != 1 or max(groups) == 1:
        plan.warnings.append(f"expert placement skipped: the MoE layers shard their experts over {sorted(groups)} "
                             "devices (placement needs one count, above 1)")
        return
    G = max(groups)
    t0 = time.perf_counter()
    placement = solve_placement(stats, G, time_limit_s=time_limit_s)
    solve_s = time.perf_counter() - t0
    ours, base = predict(stats, placement), predict(stats, contiguous(stats.layers, stats.experts, G))
    for layer, e in enumerate(entries):
        e["placement"] = placement.permutation(layer)
    plan.timings["expert_placement_s"] = solve_s  # wall clock: not part of the plan
    summary = {"devices": G,
               "cross_device_tokens": int(ours["cross_device_tokens"]),
               "contiguous_cross_device_tokens": int(base["cross_device_tokens"]),
               "max_device_load": int(ours["max_device_load"]), "contiguous_max_device_load": int(base["max_device_load"])}
    plan.solver["expert_placement"] = summary
    progress(f"expert placement on {G} devices in {solve_s:.1f} s: cross-device token pairs "
             f"{summary['cross_device_tokens']} (contiguous {summary['contiguous_cross_device_tokens']}), "
             f"max device load {summary['max_device_load']} (contiguous {summary['contiguous_max_device_load']})")


def set_dispatch(plan, capacity_factor) -> None:
    """Record dropless dispatch (``None``) or a capacity factor on every MoE layer of ``plan``."""
    if capacity_factor is not None and (isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float))
                                        or not capacity_factor > 0 or not math.isfinite(capacity_factor)):
        raise AutoparError(f"capacity_factor must be None (dropless) or a positive number, got {capacity_factor!r}")
    for n in plan.nodes:
        if n.get("moe"):
            n["moe"]["dispatch"] = "dropless" if capacity_factor is None else "capacity"
            n["moe"]["capacity_factor"] = None if capacity_factor is None else float(capacity_factor)
    if capacity_factor is not None and any(n.get("moe") for n in plan.nodes):
        plan.warnings.append(f"MoE dispatch drops tokens: each rank sends each expert at most "
                             f"{capacity_factor:g}·tokens·k/experts assignments; the rest contribute zero")


def predicted_send_rows(stats: RoutingStats, entry: dict, layer: int, n: int) -> list[int]:
    """Rows each of the ``n`` ranks of an all-to-all group sends to other ranks at ``layer`` with
    the plan's placement (``entry``), from ``shard_counts`` with one shard per rank."""
    if stats.shard_counts is None or stats.shard_counts.shape[1] != n:
        raise AutoparError(f"predicting all-to-all traffic needs routing statistics profiled with shards={n}")
    perm = entry.get("placement") or list(range(stats.experts))
    owner = np.empty(stats.experts, dtype=np.int64)
    owner[np.asarray(perm)] = np.arange(stats.experts) // (stats.experts // n)
    return [int(sum(c for e, c in enumerate(stats.shard_counts[layer, r]) if owner[e] != r)) for r in range(n)]


__all__ = ["profile_routing", "place_experts", "set_dispatch", "predicted_send_rows", "RoutingStats", "Placement"]
