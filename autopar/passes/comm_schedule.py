"""Schedule the backward's gradient all-reduces of a built plan: buckets, issue order, start times.

``schedule_comm(plan, hw)`` builds the arrays of ``solvers/comm_schedule.py`` from the plan, solves
them and writes ``plan.comm_schedule`` (the executor, codegen/runtime.py, runs it)::

    {"version": 1,
     "buckets": [{"axis", "params": [FQN, ...] (ready order), "bytes", "start_s", "end_s"}, ...],  # issue order
     "predicted": {"backward_s", "makespan_s", "synchronous_s", "ddp_s", "exposed_s"},
     "solver": {"name": "dp" | "cp-sat", "status"},
     "timeline": {"compute": [[name, start_s, end_s], ...], "comm": {axis: [[bucket, start_s, end_s], ...]}}}

Times run from the start of the backward pass. What is scheduled: each parameter gradient whose
sync (``phase == "grad_sync"``) is one all-reduce on one mesh axis and is not compressed; any
other sync (several axes, a reduce-scatter, a compressed one) stays in the runtime's
accumulate-grad hook and counts as exposed.

The arrays:

* the backward runs the plan's nodes in reverse, one compute stream. Node v's backward takes
  ``compute_s`` (forward + backward in a training plan) times ρ_v/(1 + ρ_v), ρ_v the backward/forward
  FLOP ratio the joint graph measured for v's source op (passes/joint.py), else 2/3 of it; a
  backward collective (``phase == "bwd"``) blocks the stream after its node's backward;
* a gradient is ready (r_i) when the backward of the first node in forward order that reads the
  parameter ends (the last backward to add to it; tied parameters are one placeholder), T when
  the whole backward ends;
* bytes b_i and axis from the gradient's all-reduce; each axis prices a bucket of S bytes with
  ``cost_models.comm.collective_time("all_reduce", S, n, link)`` on its link (``axis_links``; a
  preset's calibrated all-reduce fit on intra-node axes, as passes/annotate.CostContext), plus the
  runtime's profiled per-collective overhead that the plan's collectives carry;
* axes on the same link level (both inside a node, say) share one stream;
* bucket buffers in flight are capped by the device memory the plan leaves free (capacity or
  ``memory_limit_bytes`` minus the plan's peak), when that is less than all the gradients.
"""

from __future__ import annotations

import math

from ..cost_models.comm import axis_links, collective_time
from ..cost_models.hardware import SegmentedLink
from ..solvers.comm_schedule import BucketProblem, ddp_schedule, solve, synchronous_s

VERSION = 1
BACKWARD_SHARE = 2 / 3  # of a node's training cost, when the joint graph has no ratio for it


def schedule_comm(plan, hw, *, tg=None, memory_limit_bytes: float | None = None, time_limit_s: float = 5.0,
                  progress=None) -> dict | None:
    """Write ``plan.comm_schedule`` (and ``time_breakdown["grad_sync_exposed_s"]``); return it, or
    None when the plan has no gradient all-reduce to schedule. ``tg``: the traced graph the plan was
    made from (who reads each parameter, the joint graph's backward ratios); without it each
    gradient is ready at the node its sync is recorded at."""
    say = progress or (lambda m: None)
    plan.comm_schedule = None
    if plan.mode != "train" or "pp" in plan.mesh:
        return None
    fqn_of = dict(tg.params) if tg is not None else {"p_" + f.replace(".", "_"): f for f in plan.param_placements}
    compressed = {f for f, g in ((plan.compression or {}).get("grads") or {}).items()
                  if g.get("method", "none") != "none"}
    syncs: dict[str, list[dict]] = {}
    for c in plan.collectives:
        if c.get("phase") == "grad_sync":
            syncs.setdefault(c["tensor"], []).append(c)
    grads = {t: cs[0] for t, cs in syncs.items()
             if len(cs) == 1 and cs[0]["op"] == "all_reduce" and t in fqn_of and fqn_of[t] not in compressed}
    rest_s = sum(c["time_s"] for t, cs in syncs.items() if t not in grads for c in cs)
    if not grads:
        return None

    ops, ends = _backward(plan, tg)
    T = ends[ops[0]] if ops else 0.0  # the backward ends with the first forward node's
    reader = _first_readers(plan, tg, ops, grads)
    names = list(grads)
    ready = [ends.get(reader[t], 0.0) for t in names]

    axes = sorted({grads[t]["axis"] for t in names}, key=list(plan.mesh).index)
    links = axis_links(plan.mesh, hw)
    link = {a: hw.link_for("all_reduce", links[a]) if links[a] == hw.intra_node else links[a] for a in axes}
    extra = _overhead(plan, [grads[t] for t in names], link)
    alpha, beta, segmented = [], [], False
    for a in axes:
        n, top = plan.mesh[a], max(1, sum(grads[t]["bytes"] for t in names if grads[t]["axis"] == a))
        t0 = collective_time("all_reduce", 0, n, link[a])
        alpha.append(t0 + extra[0])
        beta.append((collective_time("all_reduce", top, n, link[a]) - t0) / top + extra[1])
        segmented |= isinstance(link[a], SegmentedLink)

    def exact(k: int, nbytes: float) -> float:  # a segmented link's regimes, which the affine fit averages
        return collective_time("all_reduce", nbytes, plan.mesh[axes[k]], link[axes[k]]) + extra[0] + extra[1] * nbytes
    time_fn = exact if segmented else None
    keys: dict = {}
    stream = [keys.setdefault(repr(links[a]), len(keys)) for a in axes]
    nbytes = [int(grads[t]["bytes"]) for t in names]
    cap = _memory_cap(plan, hw, memory_limit_bytes, nbytes)
    problem = BucketProblem(ready, nbytes, [axes.index(grads[t]["axis"]) for t in names], alpha, beta, T,
                            stream=stream, memory_cap_bytes=cap, time_fn=time_fn, overlap=hw.comm_compute_overlap)
    try:
        sched = solve(problem, time_limit_s=time_limit_s)
    except ValueError as exc:  # the memory cap admits no schedule (or none was found in time)
        plan.warnings.append(f"comm schedule: {exc}; scheduled without the cap on bucket buffers")
        problem = BucketProblem(ready, nbytes, problem.axis, alpha, beta, T, stream=stream, time_fn=time_fn,
                                overlap=hw.comm_compute_overlap)
        sched = solve(problem, time_limit_s=time_limit_s)
    ddp = ddp_schedule(problem)
    doc = {
        "version": VERSION,
        "buckets": [{"axis": axes[b.axis], "params": [fqn_of[names[i]] for i in b.grads], "bytes": int(b.nbytes),
                     "start_s": b.start_s, "end_s": b.end_s} for b in sched.buckets],
        "predicted": {"backward_s": T, "makespan_s": sched.makespan_s, "synchronous_s": synchronous_s(problem),
                      "ddp_s": ddp.makespan_s, "exposed_s": sched.exposed_s},
        "solver": {"name": sched.solver, "status": sched.status},
        "timeline": {"compute": _segments(ops, ends, {reader[t] for t in names}),
                     "comm": {a: [[k, b.start_s, b.end_s] for k, b in enumerate(sched.buckets) if axes[b.axis] == a]
                              for a in axes}},
    }
    plan.comm_schedule = doc
    plan.time_breakdown["grad_sync_exposed_s"] = sched.exposed_s + rest_s
    sizes = [b.nbytes for b in sched.buckets]
    say(f"comm schedule ({sched.solver}, {sched.status}): {len(grads)} gradient all-reduces in {len(sizes)} buckets "
        f"(mean {sum(sizes) / len(sizes) / 2**20:.3g} MiB); backward {T * 1e3:.4g} ms, exposed "
        f"{sched.exposed_s * 1e3:.4g} ms (synchronous {(doc['predicted']['synchronous_s'] - T) * 1e3:.4g} ms, "
        f"DDP 25 MiB {ddp.exposed_s * 1e3:.4g} ms)")
    return doc


def _backward(plan, tg) -> tuple[list[str], dict[str, float]]:
    """The nodes the backward runs (forward order) and when each one's backward ends."""
    ops = [n for n in plan.nodes if n.get("kind", "op") not in ("param", "buffer")]
    share = {}
    if tg is not None and getattr(tg, "joint", None):
        from .joint import source_of

        for node in tg.gm.graph.nodes:
            src = tg.joint.get(source_of(node))
            ratio = src.backward_ratio if src is not None else None
            if ratio is not None:
                share[node.name] = ratio / (1 + ratio)
    blocking: dict[str, float] = {}
    loose = 0.0
    names = {n["name"] for n in ops}
    for c in plan.collectives:
        if c.get("phase") == "bwd":
            if c.get("node") in names:
                blocking[c["node"]] = blocking.get(c["node"], 0.0) + c["time_s"]
            else:
                loose += c["time_s"]
    t, ends = 0.0, {}
    for n in reversed(ops):
        t += float(n.get("compute_s", 0.0)) * share.get(n["name"], BACKWARD_SHARE) + blocking.get(n["name"], 0.0)
        ends[n["name"]] = t
    if ops:
        ends[ops[0]["name"]] += loose  # backward collectives at no known node: before the backward ends
    return [n["name"] for n in ops], ends


def _first_readers(plan, tg, ops: list[str], grads: dict) -> dict[str, str]:
    """Parameter placeholder -> the earliest node (forward order) that reads it: its backward
    completes the gradient."""
    pos = {name: k for k, name in enumerate(ops)}
    if tg is None:
        return {t: c["node"] if c.get("node") in pos else ops[0] for t, c in grads.items()}
    by_name = {n.name: n for n in tg.gm.graph.nodes}
    memo: dict[str, int] = {}

    def first(node) -> int:  # earliest position among node's readers that the plan times (through untimed ones)
        if node.name not in memo:
            memo[node.name] = len(ops)
            best = len(ops)
            for u in node.users:
                best = min(best, pos[u.name] if u.name in pos else first(u))
            memo[node.name] = best
        return memo[node.name]

    out = {}
    for t, c in grads.items():
        k = first(by_name[t]) if t in by_name else len(ops)
        out[t] = ops[k] if k < len(ops) else (c["node"] if c.get("node") in pos else ops[0])
    return out


def _overhead(plan, colls: list[dict], link: dict) -> tuple[float, float]:
    """(seconds per collective, per byte) the plan's collective times carry beyond the link's
    (a profiled runtime overhead, passes/annotate.CostContext), fitted through the smallest and
    largest gradient; (0, 0) on a plain preset."""
    delta = sorted((c["bytes"], c["time_s"] - collective_time(c["op"], c["bytes"], plan.mesh[a], link[a]))
                   for c in colls for a in [c["axis"]])
    (b0, d0), (b1, d1) = delta[0], delta[-1]
    if max(abs(d0), abs(d1)) <= 1e-15:
        return 0.0, 0.0
    per_byte = (d1 - d0) / (b1 - b0) if b1 > b0 else 0.0
    return max(0.0, d0 - per_byte * b0), max(0.0, per_byte)


def _memory_cap(plan, hw, limit, nbytes: list[int]) -> float | None:
    """The bytes of bucket buffers that may be in flight: what the plan leaves free on the device;
    None when every gradient fits at once (or not even the largest does: then no cap is kept)."""
    capacity = limit if limit is not None else getattr(hw, "memory_capacity_bytes", math.inf)
    free = capacity - plan.peak_memory_bytes
    if not math.isfinite(free) or free >= sum(nbytes):
        return None
    if free < max(nbytes):
        plan.warnings.append(f"comm schedule: the plan leaves {max(free, 0):.4g} B of device memory free, less than "
                             f"the largest gradient ({max(nbytes)} B); bucket buffers are not capped")
        return None
    return float(free)


def _segments(ops: list[str], ends: dict[str, float], readers: set[str]) -> list[list]:
    """The compute lane: the backward cut where gradients become ready, each piece named after
    the node whose backward ends it (the last piece ends with the backward's final node)."""
    out, t = [], 0.0
    marks = [n for n in reversed(ops) if n in readers or n == ops[0]]  # backward order
    for name in marks:
        e = ends[name]
        if e > t or not out:
            out.append([name, t, e])
            t = e
    return out
