"""Calibrated communication: measure collectives on the live process group and fit α-β links.

* :func:`measure_collectives` times each collective over a range of sizes on the default process
  group (every rank calls it; gloo on CPU, NCCL on the rank's GPU).
* :func:`fit_alpha_beta` fits ``t = k_a·α + k_b·S/bw`` with the ring factors ``k_a``, ``k_b`` of
  :func:`autopar.cost_models.comm.collective_time` (minimax relative error, a linear program), so
  the fitted :class:`Link` plugs straight into it; :func:`fit_segments` fits one such line per
  size regime (a :class:`SegmentedLink`) where one line cannot follow the backend.
* :func:`calibrated_preset` turns the fits into a hardware preset document (``"collectives"``
  holds the per-collective links; :meth:`Hardware.link_for` reads them back).
* :func:`launch_local` runs :func:`measure_collectives` on N local gloo ranks it spawns itself
  (what ``autopar profile --collectives`` does).

Bytes follow :func:`collective_time`'s conventions: all_reduce the buffer, all_gather the gathered
output, reduce_scatter the unscattered input, all_to_all one rank's buffer, send_recv the message.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import time
from datetime import datetime, timezone

import numpy as np

from autopar.cost_models.comm import collective_time
from autopar.cost_models.hardware import SCHEMA, Hardware, Link, SegmentedLink

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")
# 1 KiB .. 128 MiB by powers of 2: past a 32 MiB L3 cache by three sizes, so the regime beyond it can be fitted
DEFAULT_SIZES = tuple(1024 * 2**i for i in range(18))
_ITEMSIZE = 4  # float32 buffers
LATENCY_ONLY_BW = 1e15  # B/s of a size regime whose times do not grow (fit_segments)


class CollectiveTimes(dict):
    """``{op: {nbytes: seconds}}`` as returned by :func:`measure_collectives`.

    ``missing`` maps an op the backend could not run (e.g. no all-to-all in some gloo builds) to
    the error it raised; such an op maps to an empty dict. ``world`` and ``backend`` say where the
    numbers come from.
    """

    def __init__(self, *args, missing=None, world: int = 0, backend: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.missing = dict(missing or {})
        self.world = world
        self.backend = backend


# ---- measuring ---------------------------------------------------------------------------------


def _device(backend: str):
    import torch

    if "nccl" in backend.lower():
        local = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(local) if local is not None else torch.cuda.current_device())
    return torch.device("cpu")


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _make_call(op: str, nbytes: int, world: int, rank: int, device, group, bufs: dict):
    """Return (actual nbytes as collective_time counts them, a no-arg function running one call).

    Every op of one size shares the two buffers ``bufs[numel]``, so all of them can stay allocated."""
    import torch
    import torch.distributed as dist

    numel = max(world, nbytes // _ITEMSIZE // world * world)  # divisible by the world size
    actual = numel * _ITEMSIZE
    if numel not in bufs:
        bufs[numel] = (torch.ones(numel, device=device), torch.empty(numel, device=device))
    inp, out = bufs[numel]
    if op == "all_reduce":
        return actual, lambda: dist.all_reduce(inp, group=group)
    if op == "all_gather":
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return actual, lambda: gather(out, inp[: numel // world], group=group)
    if op == "reduce_scatter":
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return actual, lambda: scatter(out[: numel // world], inp, group=group)
    if op == "all_to_all":
        return actual, lambda: dist.all_to_all_single(out, inp, group=group)
    if op == "send_recv":
        # Disjoint pairs (0 -> 1, 2 -> 3, ...) each pass one message; an odd last rank idles.
        peer = rank ^ 1
        if peer >= world:
            return actual, lambda: None
        if rank % 2 == 0:
            return actual, lambda: dist.send(inp, dst=peer, group=group)
        return actual, lambda: dist.recv(inp, src=peer, group=group)
    raise ValueError(f"unknown collective {op!r}; expected one of {list(OPS)}")


def _busy_work(gap_s: float, device):
    """A function that computes (matmuls) for about ``gap_s`` seconds on ``device``."""
    import torch

    a, b = torch.randn(256, 256, device=device), torch.randn(256, 256, device=device)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.02:
        a @ b
        n += 1
    reps = max(1, round(gap_s / ((time.perf_counter() - t0) / n)))

    def work():
        for _ in range(reps):
            a @ b
        _sync(device)

    return work


def measure_collectives(sizes=None, ops=OPS, repeats: int = 3, group=None, warmup: int = 3,
                        rounds: int = 10, burst_s: float = 0.01, gap_s: float = 0.0) -> CollectiveTimes:
    """Time collectives on the live process group; every rank must call this with the same arguments.

    Every (op, size) gets ``warmup`` (at least 2) untimed calls and a burst length K (about
    ``burst_s`` of back-to-back calls at the fastest warm-up call's pace; the ranks agree on the
    largest). Then ``rounds`` rounds each visit every op and size in turn (interleaved, so a spell
    of load on the host spoils one round of many sizes rather than every round of a few), timing
    ``repeats`` bursts each (one where a call outlasts ``burst_s``: its relative noise is small),
    after a barrier, as burst time / K (a burst amortises the skew with which ranks leave the
    barrier). Each rank keeps, per op and size, its fastest burst: other
    work on a busy host only ever adds time, and on a 2-core host shared with other jobs the
    median of 30-call bursts varies by ±20% between runs, the fastest by a few %. These are
    max-reduced across ranks (a collective lasts until its slowest rank is done), so every rank
    returns the same numbers.

    ``gap_s > 0`` measures collectives as a training step issues them instead: each timed call
    comes alone, after about ``gap_s`` of matmuls on every rank, and each size keeps the median
    of its calls. On a loaded or virtualised host a collective that follows compute is much
    slower than one in a burst (its communication threads have gone to sleep, ranks drift), and
    this is the number a step pays. Sizes default to 1 KiB .. 128 MiB by powers of 2; a size is
    rounded down to a whole number of float32 elements per rank. An op the backend cannot run is
    recorded in ``result.missing`` (and maps to ``{}``) instead of raising.
    """
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("measure_collectives needs an initialized default process group")
    if repeats < 1 or rounds < 1:
        raise ValueError(f"repeats and rounds must be >= 1, got {repeats} and {rounds}")
    if any(op not in OPS for op in ops):
        raise ValueError(f"unknown collective in {list(ops)}; expected some of {list(OPS)}")
    sizes = sorted(int(s) for s in (DEFAULT_SIZES if sizes is None else sizes))
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    backend = str(dist.get_backend(group))
    device = _device(backend)
    result = CollectiveTimes(world=world, backend=backend)
    f64, bufs, entries = dict(dtype=torch.float64, device=device), {}, []  # entries: (op, nbytes, call, K)
    for op in ops:
        calls, error = [], None
        try:
            for size in sizes:
                nbytes, call = _make_call(op, size, world, rank, device, group, bufs)
                fastest = math.inf
                for _ in range(max(warmup, 2)):
                    dist.barrier(group=group)
                    t0 = time.perf_counter()
                    call()
                    _sync(device)
                    fastest = min(fastest, time.perf_counter() - t0)
                calls.append((op, nbytes, call, min(1000, math.ceil(burst_s / max(fastest, 1e-7)))))
        except Exception as e:  # noqa: BLE001 - the backend lacks the op (it raises on every rank)
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
        # Agree on whether the op worked anywhere before mixing its numbers.
        flag = torch.tensor([1.0 if error else 0.0], **f64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        result[op] = {}
        if flag.item():
            result.missing[op] = error or "failed on another rank"
            dist.barrier(group=group)
        else:
            entries += calls
    bursts = torch.tensor([k for *_, k in entries], **f64)
    dist.all_reduce(bursts, op=dist.ReduceOp.MAX, group=group)
    raw = torch.full((len(entries), rounds * repeats), math.inf, dtype=torch.float64)
    work = _busy_work(gap_s, device) if gap_s > 0 else None
    for r in range(rounds):
        for i, ((_, _, call, _), k) in enumerate(zip(entries, bursts.int().tolist())):
            for j in range(repeats if k > 1 or work else 1):
                if work is not None:  # one call after compute, as in a step
                    work()
                    t0 = time.perf_counter()
                    call()
                    _sync(device)
                    raw[i, r * repeats + j] = time.perf_counter() - t0
                    continue
                dist.barrier(group=group)
                t0 = time.perf_counter()
                for _ in range(k):
                    call()
                _sync(device)
                raw[i, r * repeats + j] = (time.perf_counter() - t0) / k
    best = (raw.median(dim=1).values if work is not None else raw.min(dim=1).values).to(device)
    dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
    for (op, nbytes, _, _), t in zip(entries, best.cpu().tolist()):
        result[op][nbytes] = t
    return result


# ---- fitting -----------------------------------------------------------------------------------


def ring_factors(op: str, n: int) -> tuple[float, float]:
    """(k_a, k_b) with collective_time(op, S, n, Link(bw, α)) == k_a·α + k_b·S/bw."""
    k_a = collective_time(op, 0.0, n, Link(1.0, 1.0))
    k_b = collective_time(op, 1.0, n, Link(1.0, 0.0))
    return k_a, k_b


def _points(op: str, times: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    if n < 2:
        raise ValueError(f"need at least 2 ranks to fit {op}, got {n}")
    points = sorted((float(s), float(t)) for s, t in times.items())
    if len(points) < 2 or len({s for s, _ in points}) < 2:
        raise ValueError(f"need times for at least two sizes to fit {op}, got {len(points)}")
    if any(t <= 0 or not math.isfinite(t) for _, t in points):
        raise ValueError(f"{op}: times must be positive and finite, got {[t for _, t in points]}")
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def _minimax(k_a: float, k_b: float, s: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """(α, g = 1/bw) with the smallest largest relative error, as the linear program

        minimise e  over α >= 0, g >= 0, e
        subject to  −e·t_i <= k_a·α + k_b·S_i·g − t_i <= e·t_i   for every measured (S_i, t_i),

    solved by GLOP with each row divided by t_i and α = A·min(t)/k_a, g = G·max(t)/(k_b·max(S)),
    so the unknowns A, G are O(1) and the simplex tolerances hold.
    """
    from ortools.linear_solver import pywraplp

    solver = pywraplp.Solver.CreateSolver("GLOP")
    inf = solver.infinity()
    a, g, e = solver.NumVar(0, inf, "A"), solver.NumVar(0, inf, "G"), solver.NumVar(0, inf, "e")
    for si, ti in zip(s, t):
        row = (t.min() / ti) * a + (si / s.max() * t.max() / ti) * g
        solver.Add(row - e <= 1)
        solver.Add(row + e >= 1)
    solver.Minimize(e)
    if solver.Solve() != pywraplp.Solver.OPTIMAL:
        raise ValueError(f"the minimax fit found no optimum for times {t.tolist()}")
    big_g = g.solution_value() if g.solution_value() > 1e-9 else 0.0  # below the solver's tolerance: flat
    return a.solution_value() * t.min() / k_a, big_g * t.max() / (k_b * s.max())


def _max_err(op: str, n: int, link, s: np.ndarray, t: np.ndarray) -> float:
    return max(abs(collective_time(op, si, n, link) - ti) / ti for si, ti in zip(s, t))


def fit_alpha_beta(op: str, times: dict, n: int) -> tuple[float, float, float]:
    """Fit ``t = k_a(op, n)·α + k_b(op, n)·S/bw`` to ``{nbytes: seconds}``; return (α, bw, max rel error).

    The fit minimises the largest relative error over the sizes (:func:`_minimax`, an LP), so a
    1 KiB call counts as much as a 64 MiB one. Raises ValueError if there are fewer than two
    sizes, n < 2, or the times do not grow with size (no bandwidth can be fitted).
    """
    s, t = _points(op, times, n)
    alpha, g = _minimax(*ring_factors(op, n), s, t)
    if not g > 0:
        raise ValueError(f"{op}: measured times do not grow with size; measure larger sizes to fit a bandwidth")
    return alpha, 1.0 / g, _max_err(op, n, Link(1.0 / g, alpha), s, t)


def fit_segments(op: str, times: dict, n: int, max_segments: int = 3, tol: float = 0.1,
                 min_points: int = 3) -> tuple[SegmentedLink, float]:
    """Fit α-β per size regime (gloo switches algorithms by size); return (link, max rel error).

    One line (:func:`fit_alpha_beta`) if its max relative error is within ``tol``; else, up to
    ``max_segments`` regimes of at least ``min_points`` consecutive sizes each, every regime its
    own minimax line, with the split points that give the smallest max error over all sizes
    (tried exhaustively; a split is kept only if it beats fewer regimes, and adding regimes stops
    once within ``tol``). A regime ends halfway (geometrically) to the next measured size. A regime
    whose times do not grow is latency-only (bandwidth ``LATENCY_ONLY_BW``).
    """
    alpha, bw, err = fit_alpha_beta(op, times, n)  # also checks the arguments
    best = (SegmentedLink(((math.inf, Link(bw, alpha)),)), err)
    s, t = _points(op, times, n)
    line = functools.cache(lambda a, b: _minimax(*ring_factors(op, n), s[a:b], t[a:b]))
    for m in range(2, max_segments + 1):
        if best[1] <= tol:
            break
        for cuts in itertools.combinations(range(min_points, len(s) - min_points + 1), m - 1):
            edges = (0, *cuts, len(s))
            if any(b - a < min_points for a, b in zip(edges, edges[1:])):
                continue
            link = SegmentedLink(tuple((math.sqrt(s[b - 1] * s[b]) if b < len(s) else math.inf,
                                        Link(1 / g if g > 0 else LATENCY_ONLY_BW, alpha))
                                       for a, b in zip(edges, edges[1:]) for alpha, g in [line(a, b)]))
            err = _max_err(op, n, link, s, t)
            if err < best[1]:
                best = (link, err)
    return best


def fit_all(times: dict, n: int, **kwargs) -> tuple[dict, dict]:
    """:func:`fit_segments` for every measured op: ({op: (link, max rel error)}, {op: why not fitted})."""
    fits, failed = {}, {}
    for op, per_size in times.items():
        if not per_size:
            failed[op] = getattr(times, "missing", {}).get(op, "not measured")
            continue
        try:
            fits[op] = fit_segments(op, per_size, n, **kwargs)
        except ValueError as e:
            failed[op] = str(e)
    return fits, failed


# ---- presets -----------------------------------------------------------------------------------


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def _segments(link) -> tuple:
    return link.segments if isinstance(link, SegmentedLink) else ((math.inf, link),)


def _link_doc(link: Link) -> dict:
    return {"bandwidth_Bps": _sig(link.bandwidth_Bps), "latency_s": _sig(link.latency_s)}


def calibrated_preset(base: Hardware, fits: dict, *, notes: str = "", replace: tuple[str, ...] | None = None) -> dict:
    """A preset document equal to ``base`` but with links from ``fits`` (``{op: (link, max_rel_error)}``,
    a link a :class:`Link` or :class:`SegmentedLink`, as :func:`fit_all` returns).

    The all_reduce fit for the largest messages (its last regime: the bandwidth that dominates a
    training step) replaces the link levels in ``replace``; by default ``intra_node`` (local
    ranks share a node), and ``inter_node`` too when ``base`` has the same link at both levels
    (as the ``local`` preset has: every rank on one host). Every fit is also stored under
    ``"collectives"``, which :meth:`Hardware.link_for` returns per op. ``notes`` is appended to a
    note saying how and when the links were measured.
    """
    if "all_reduce" not in fits:
        raise ValueError("calibrated_preset needs an all_reduce fit (it sets the link levels)")
    if replace is None:
        replace = ("intra_node", "inter_node") if base.intra_node == base.inter_node else ("intra_node",)
    for level in replace:
        if level not in ("intra_node", "inter_node"):
            raise ValueError(f"replace must name intra_node and/or inter_node, got {level!r}")

    def fit_doc(link, err) -> dict:
        segs = _segments(link)
        doc = _link_doc(segs[0][1]) if len(segs) == 1 else {"segments": [
            {"max_bytes": int(b), **_link_doc(x)} if b < math.inf else _link_doc(x) for b, x in segs]}
        return {**doc, "max_rel_error": round(float(err), 4)}

    primary = _link_doc(_segments(fits["all_reduce"][0])[-1][1])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    note = (
        f"Links calibrated {stamp} by `autopar profile --collectives` from base preset {base.name!r}: "
        "minimax-relative-error LP fit (GLOP) of t = k_a*alpha + k_b*S/bw (comm.collective_time's ring factors), "
        "one line per size regime where one line is off by more than 10% (at most 3 regimes of >= 3 sizes), "
        "to the max over ranks of each size's measured time (how it was measured follows); "
        f"{', '.join(replace)} = the all_reduce fit for the largest messages; per-collective fits under \"collectives\" "
        f"(max relative error of each fit: {', '.join(f'{op} {e:.1%}' for op, (_, e) in fits.items())})."
    )
    return {
        "schema": SCHEMA,
        "name": base.name,
        "description": base.description,
        "notes": note + (" " + notes if notes else ""),
        "peak_flops": dict(base.peak_flops),
        "memory_bandwidth_Bps": base.memory_bandwidth_Bps,
        "memory_capacity_bytes": base.memory_capacity_bytes,
        "devices_per_node": base.devices_per_node,
        "intra_node": dict(primary) if "intra_node" in replace else _link_doc(base.intra_node),
        "inter_node": dict(primary) if "inter_node" in replace else _link_doc(base.inter_node),
        "inter_node_overrides": [{"nodes": list(ids), **_link_doc(x)} for ids, x in base.inter_node_overrides],
        "all_to_all_as_all_gather": base.all_to_all_as_all_gather,
        "collectives": {op: fit_doc(link, err) for op, (link, err) in fits.items()},
    }


# ---- launching local ranks ---------------------------------------------------------------------


def _measure_on_rank(rank, world, kwargs):
    times = measure_collectives(**kwargs)
    return dict(times), times.missing, times.world, times.backend


def launch_local(nproc: int = 2, timeout: float = 900, **kwargs) -> CollectiveTimes:
    """Spawn ``nproc`` local gloo ranks (loopback, a free port) running ``measure_collectives(**kwargs)``.

    Returns rank 0's result (all ranks agree). Raises RuntimeError with the failing rank's traceback.
    """
    from ..launch import RankError, run_local

    if nproc < 2:
        raise ValueError(f"need at least 2 ranks to measure collectives, got {nproc}")
    try:
        times, missing, world, backend = run_local(_measure_on_rank, nproc, kwargs, timeout=timeout)[0]
    except RankError as exc:
        raise RuntimeError(f"measuring collectives failed:\n{exc}") from None
    return CollectiveTimes(times, missing=missing, world=world, backend=backend)
