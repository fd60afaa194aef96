"""Calibrated communication: measure collectives on the live process group and fit α-β links.

* :func:`measure_collectives` times each collective over a range of sizes on the default process
  group (every rank calls it; gloo on CPU, NCCL on the rank's GPU).
* :func:`fit_alpha_beta` fits ``t = k_a·α + k_b·S/bw`` with the ring factors ``k_a``, ``k_b`` of
  :func:`autopar.cost_models.comm.collective_time`, so the fitted :class:`Link` plugs straight
  into it.
* :func:`calibrated_preset` turns the fits into a hardware preset document (``"collectives"``
  holds the per-collective links; :meth:`Hardware.link_for` reads them back).
* :func:`launch_local` runs :func:`measure_collectives` on N local gloo ranks it spawns itself
  (what ``autopar profile --collectives`` does).

Bytes follow :func:`collective_time`'s conventions: all_reduce the buffer, all_gather the gathered
output, reduce_scatter the unscattered input, all_to_all one rank's buffer, send_recv the message.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from datetime import datetime, timezone

import numpy as np

from autopar.cost_models.comm import collective_time
from autopar.cost_models.hardware import SCHEMA, Hardware, Link

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")
# 1 KiB .. 64 MiB by powers of 4
DEFAULT_SIZES = tuple(1024 * 4**i for i in range(9))
_ITEMSIZE = 4  # float32 buffers


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


def _make_call(op: str, nbytes: int, world: int, rank: int, device, group):
    """Return (actual nbytes as collective_time counts them, a no-arg function running one call)."""
    import torch
    import torch.distributed as dist

    numel = max(world, nbytes // _ITEMSIZE // world * world)  # divisible by the world size
    actual = numel * _ITEMSIZE
    if op == "all_reduce":
        buf = torch.ones(numel, device=device)
        return actual, lambda: dist.all_reduce(buf, group=group)
    if op == "all_gather":
        out, inp = torch.empty(numel, device=device), torch.ones(numel // world, device=device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return actual, lambda: gather(out, inp, group=group)
    if op == "reduce_scatter":
        out, inp = torch.empty(numel // world, device=device), torch.ones(numel, device=device)
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return actual, lambda: scatter(out, inp, group=group)
    if op == "all_to_all":
        out, inp = torch.empty(numel, device=device), torch.ones(numel, device=device)
        return actual, lambda: dist.all_to_all_single(out, inp, group=group)
    if op == "send_recv":
        # Disjoint pairs (0 -> 1, 2 -> 3, ...) each pass one message; an odd last rank idles.
        buf = torch.ones(numel, device=device)
        peer = rank ^ 1
        if peer >= world:
            return actual, lambda: None
        if rank % 2 == 0:
            return actual, lambda: dist.send(buf, dst=peer, group=group)
        return actual, lambda: dist.recv(buf, src=peer, group=group)
    raise ValueError(f"unknown collective {op!r}; expected one of {list(OPS)}")


def measure_collectives(sizes=None, ops=OPS, repeats: int = 7, group=None, warmup: int = 2,
                        rounds: int = 1) -> CollectiveTimes:
    """Time collectives on the live process group; every rank must call this with the same arguments.

    For each op and size: ``warmup`` untimed calls, then ``repeats`` timed calls, each after a
    barrier. Each rank takes the median of its own calls (with ``rounds`` > 1: the lowest of that
    many such medians, as benchmarks/measure_local_preset.py does, since on a busy host other
    work only ever adds time), and the medians are max-reduced across
    ranks (a collective lasts until its slowest rank is done), so every rank returns the same
    numbers. (Median first, then max: a scheduler hiccup on one rank in one call, common when
    ranks share a few CPU cores, does not count as the collective's time.) Sizes default to 1 KiB .. 64 MiB by powers of 4; a size is rounded
    down to a whole number of float32 elements per rank. An op the backend cannot run is recorded
    in ``result.missing`` (and maps to ``{}``) instead of raising.
    """
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("measure_collectives needs an initialized default process group")
    if repeats < 1 or rounds < 1:
        raise ValueError(f"repeats and rounds must be >= 1, got {repeats} and {rounds}")
    sizes = sorted(int(s) for s in (DEFAULT_SIZES if sizes is None else sizes))
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    backend = str(dist.get_backend(group))
    device = _device(backend)
    result = CollectiveTimes(world=world, backend=backend)
    for op in ops:
        if op not in OPS:
            raise ValueError(f"unknown collective {op!r}; expected one of {list(OPS)}")
        raw = torch.zeros(len(sizes), rounds, repeats, dtype=torch.float64)
        keys, error = [], None
        for i, size in enumerate(sizes):
            try:
                nbytes, call = _make_call(op, size, world, rank, device, group)
                for _ in range(warmup):
                    call()
                _sync(device)
                for r in range(rounds):
                    for j in range(repeats):
                        dist.barrier(group=group)
                        t0 = time.perf_counter()
                        call()
                        _sync(device)
                        raw[i, r, j] = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - the backend lacks the op (it raises on every rank)
                error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
                break
            keys.append(nbytes)
        # Agree on whether the op worked anywhere before mixing its numbers.
        flag = torch.tensor([1.0 if error else 0.0], dtype=torch.float64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if flag.item():
            result.missing[op] = error or "failed on another rank"
            result[op] = {}
            dist.barrier(group=group)
            continue
        medians = torch.tensor([min(statistics.median(raw[i, r].tolist()) for r in range(rounds))
                                for i in range(len(keys))],
                               dtype=torch.float64, device=device)
        dist.all_reduce(medians, op=dist.ReduceOp.MAX, group=group)
        result[op] = {nbytes: float(m) for nbytes, m in zip(keys, medians.cpu().tolist())}
    return result


# ---- fitting -----------------------------------------------------------------------------------


def ring_factors(op: str, n: int) -> tuple[float, float]:
    """(k_a, k_b) with collective_time(op, S, n, Link(bw, α)) == k_a·α + k_b·S/bw."""
    k_a = collective_time(op, 0.0, n, Link(1.0, 1.0))
    k_b = collective_time(op, 1.0, n, Link(1.0, 0.0))
    return k_a, k_b


def fit_alpha_beta(op: str, times: dict, n: int) -> tuple[float, float, float]:
    """Fit ``t = k_a(op, n)·α + k_b(op, n)·S/bw`` to ``{nbytes: seconds}``; return (α, bw, max rel error).

    Least squares in relative error (each equation weighted by 1/t, so a 1 KiB call counts as much
    as a 64 MiB one), with α >= 0 and 1/bw > 0. Raises ValueError if there are fewer than two
    sizes, n < 2, or the times do not grow with size (no bandwidth can be fitted).
    """
    if n < 2:
        raise ValueError(f"need at least 2 ranks to fit {op}, got {n}")
    points = sorted((float(s), float(t)) for s, t in times.items())
    if len(points) < 2 or len({s for s, _ in points}) < 2:
        raise ValueError(f"need times for at least two sizes to fit {op}, got {len(points)}")
    if any(t <= 0 or not math.isfinite(t) for _, t in points):
        raise ValueError(f"{op}: times must be positive and finite, got {[t for _, t in points]}")
    k_a, k_b = ring_factors(op, n)
    s = np.array([p[0] for p in points])
    t = np.array([p[1] for p in points])
    a_col, b_col = k_a / t, k_b * s / t  # unknowns: α and β = 1/bw; target 1

    def rel_err(alpha: float, beta: float) -> float:
        return float(np.max(np.abs(k_a * alpha + k_b * s * beta - t) / t))

    (alpha, beta), *_ = np.linalg.lstsq(np.stack([a_col, b_col], axis=1), np.ones_like(t), rcond=None)
    alpha, beta = float(alpha), float(beta)
    if alpha < 0:  # the constrained optimum then lies on the α = 0 edge
        alpha, beta = 0.0, float(b_col @ np.ones_like(t) / (b_col @ b_col))
    if not beta > 0:
        raise ValueError(f"{op}: measured times do not grow with size; measure larger sizes to fit a bandwidth")
    return alpha, 1.0 / beta, rel_err(alpha, beta)


def fitted_time(op: str, nbytes: float, n: int, alpha: float, bandwidth_Bps: float) -> float:
    """What the fitted link predicts: ``collective_time(op, nbytes, n, Link(bandwidth_Bps, alpha))``."""
    return collective_time(op, nbytes, n, Link(bandwidth_Bps, alpha))


def fit_all(times: dict, n: int) -> tuple[dict, dict]:
    """Fit every measured op; return ({op: (α, bw, max rel error)}, {op: why it could not be fitted})."""
    fits, failed = {}, {}
    for op, per_size in times.items():
        if not per_size:
            failed[op] = getattr(times, "missing", {}).get(op, "not measured")
            continue
        try:
            fits[op] = fit_alpha_beta(op, per_size, n)
        except ValueError as e:
            failed[op] = str(e)
    return fits, failed


# ---- presets -----------------------------------------------------------------------------------


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def calibrated_preset(base: Hardware, fits: dict, *, notes: str = "", replace: tuple[str, ...] | None = None) -> dict:
    """A preset document equal to ``base`` but with links from ``fits`` (``{op: (α, bw, max_rel_error)}``).

    The all_reduce fit replaces the link levels in ``replace``; by default ``intra_node`` (local
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

    def link_doc(link: Link) -> dict:
        return {"bandwidth_Bps": link.bandwidth_Bps, "latency_s": link.latency_s}

    alpha, bw, _ = fits["all_reduce"]
    primary = {"bandwidth_Bps": _sig(bw), "latency_s": _sig(alpha)}
    collectives = {
        op: {"bandwidth_Bps": _sig(b), "latency_s": _sig(a), "max_rel_error": round(float(e), 4)}
        for op, (a, b, e) in fits.items()
    }
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    note = (
        f"Links calibrated {stamp} by `autopar profile --collectives` from base preset {base.name!r}: "
        "relative least-squares fit of t = k_a*alpha + k_b*S/bw (comm.collective_time's ring factors) "
        "to the median of max-over-ranks times of each collective; "
        f"{', '.join(replace)} = the all_reduce fit; per-collective fits under \"collectives\" "
        f"(max relative error of each fit: {', '.join(f'{op} {e:.1%}' for op, (_, _, e) in fits.items())})."
    )
    doc = {
        "schema": SCHEMA,
        "name": base.name,
        "description": base.description,
        "notes": note + (" " + notes if notes else ""),
        "peak_flops": dict(base.peak_flops),
        "memory_bandwidth_Bps": base.memory_bandwidth_Bps,
        "memory_capacity_bytes": base.memory_capacity_bytes,
        "devices_per_node": base.devices_per_node,
        "intra_node": dict(primary) if "intra_node" in replace else link_doc(base.intra_node),
        "inter_node": dict(primary) if "inter_node" in replace else link_doc(base.inter_node),
        "all_to_all_as_all_gather": base.all_to_all_as_all_gather,
        "collectives": collectives,
    }
    return doc


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
