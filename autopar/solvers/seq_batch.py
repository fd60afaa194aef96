r"""Heterogeneous sequence-parallel groups for one packed batch (FlexSP, arXiv 2412.01523).

The solver sees numbers, never torch.  Sequences k of lengths s_k go to Ulysses SP groups g of
power-of-two sizes d_g ≤ D (D: the largest degree, ≤ the number of attention heads), each group a
contiguous, size-aligned block of devices, Σ_g d_g ≤ N.  :class:`SeqCost` holds the coefficients.
A group of size d holding tokens T = Σ s_k and squares Q = Σ s_k² costs, in seconds::

    time(d, T, Q) = (α₁·Q + α₂·T)/d + β_d·c·T/d + a·(d − 1)·λ_d        (0 for an empty group)
    β_d = max((min(d, p) − 1)/(d·B_intra), max(d − p, 0)/(d·B_inter))   p = devices per node
    mem(d, T)     = m·T/d + state  ≤  M                                   bytes per device

c is the all-to-all bytes a token sends per step (all layers, forward and backward), a the number
of all-to-alls per step, λ_d the intra-node latency when d ≤ p and the inter-node one otherwise:
the all-to-all T ≈ (P − 1)α + ((P − 1)/P)·S·β of FORMULATIONS.md, with only the share of the bytes
that leaves the node on the NIC.  Groups sorted by size are aligned, so a group of d ≤ p devices
never spans two nodes.

MILP (CP-SAT, times scaled to integers), solved by bisection on C
-----------------------------------------------------------------
Lengths are bucketed (equal lengths, or log-spaced bins): bucket b has c_b sequences of mean s̄_b,
mean square q̄_b, minimum š_b and maximum ŝ_b; w_bd = time(d, s̄_b, q̄_b) without the latency term
ℓ_d = a·(d − 1)·λ_d, and ŵ_bd, w̌_bd the same for ŝ_b, š_b.  The MILP is min C s.t. FEAS(C); its
time constraint is bilinear in (C, y_d), but for a fixed C, FEAS(C) (d ∈ {1, 2, 4, …, D}) is linear::

    x_bd ∈ ℤ≥0      sequences of bucket b in groups of size d
    y_d  ∈ ℤ≥0      groups of size d
    Σ_d x_bd = c_b                                     ∀b        (every sequence once)
    Σ_d d·y_d ≤ N                                                (devices)
    Σ_b x_bd·w_bd ≤ (C − ℓ_d)·y_d                      ∀d        (the class's time over its groups)
    Σ_b x_bd·ŝ_b ≤ K_d·y_d,   K_d = ⌊d·(M − state)/m⌋  ∀d        (memory, in tokens)
    x_bd = 0  if ŝ_b > K_d or ŵ_bd + ℓ_d > C                     (a sequence is never split)
    Σ_{b: (j+1)·w̌_bd > C − ℓ_d} x_bd ≤ j·y_d         ∀d, j=1,2,3 (at most j of them share a group)

FEAS(C) is monotone in C, so min C is found by bisection (to ``rel_tol``) between a lower bound
(below) and the best static plan's time, the first hint (:func:`static_plan`); each
FEAS is hinted with the last feasible solution.  A class is fluid in FEAS (its time spread evenly
over its groups), so every feasible solution found is dealt: in each bucket the longest sequences
go to the largest sizes, then each class deals its sequences longest first to the least-loaded of
its y_d groups with memory left (LPT; best-fit if LPT runs out of memory), and the plan is priced
exactly.  The best is returned, or the static plan when that is at least as good.

``lower_bound_s`` bounds every plan: max(Σ_k time(1, s_k)/N, max_k min_d time(d, s_k)) (a
sequence's device-seconds d·time(d, s) grow with d), raised to C whenever FEAS(C) is proven
infeasible with one bucket per length (then FEAS is a relaxation: w is rounded down, the cuts are
valid).  ``gap`` = 1 − lower_bound_s/max_time_s; ``status`` is OPTIMAL when gap ≤ rel_tol.

CP-SAT runs on one worker with a fixed seed and a deterministic limit of ``time_limit_s``/12 per
FEAS, so the same inputs give the same plan.  A FEAS has a few hundred variables and is decided in
milliseconds on one worker; with 2 interleaved workers each took ~0.6 s, and OR-Tools 9.15 aborted
("Check failed: heuristics.fixed_search") on this satisfaction model.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from autopar.errors import InfeasibleError

__all__ = ["SeqCost", "SPGroup", "BatchPlan", "degrees", "static_plan", "solve"]

_SEED = 20241202


@dataclass(frozen=True)
class SeqCost:
    """The cost model of the module docstring (seconds, bytes)."""

    alpha1: float  # s per token² on one device (attention)
    alpha2: float  # s per token on one device (dense layers)
    a2a_bytes_per_token: float  # c
    a2a_per_step: int  # a
    bw_intra: float  # B_intra, bytes/s per device one direction
    bw_inter: float  # B_inter
    lat_intra: float  # λ for d ≤ p
    lat_inter: float  # λ for d > p
    devices_per_node: int  # p
    act_bytes_per_token: float  # m
    state_bytes: float  # per device, whatever the group
    memory_bytes: float  # M per device
    max_degree: int  # D

    def work(self, d: int, s, q=None) -> np.ndarray:
        """time(d, s, q) of single sequences (q: their squares, s² by default), without the latency term."""
        s = np.asarray(s, dtype=float)
        p, beta = self.devices_per_node, 0.0
        if d > 1:
            beta = max((min(d, p) - 1) / (d * self.bw_intra), max(d - p, 0) / (d * self.bw_inter))
        return (self.alpha1 * (s * s if q is None else q) + (self.alpha2 + beta * self.a2a_bytes_per_token) * s) / d

    def latency(self, d: int) -> float:
        """ℓ_d: the all-to-all latency of a group of size d."""
        return self.a2a_per_step * (d - 1) * (self.lat_intra if d <= self.devices_per_node else self.lat_inter)

    def time(self, d: int, s) -> float:
        """Predicted time of a group of size d holding the sequences of lengths ``s``."""
        return float(self.work(d, s).sum()) + (self.latency(d) if len(s) else 0.0)

    def capacity(self, d: int) -> int:
        """K_d: the most tokens a group of size d holds."""
        return int(d * (self.memory_bytes - self.state_bytes) // self.act_bytes_per_token)


@dataclass(frozen=True)
class SPGroup:
    size: int
    first_device: int
    sequences: tuple[int, ...]  # indices into the lengths
    time_s: float


@dataclass(frozen=True)
class BatchPlan:
    """Groups laid out by decreasing size (so each is aligned to its size), and how the plan was found."""

    groups: tuple[SPGroup, ...]
    max_time_s: float  # the largest group time
    static_degree: int | None  # the best single SP degree (None: none fits memory)
    static_time_s: float  # its max group time (inf if none fits)
    lower_bound_s: float  # proven: no plan is faster
    gap: float  # 1 − lower_bound_s/max_time_s
    status: str  # OPTIMAL (gap ≤ rel_tol) or FEASIBLE
    source: str  # "milp", or "static" when the static plan is at least as good
    solve_time_s: float
    buckets: int

    @property
    def speedup(self) -> float:
        """The best static degree's max group time over this plan's."""
        return self.static_time_s / self.max_time_s

    def to_dict(self) -> dict:
        """JSON-ready (``inf`` becomes ``None``)."""
        d = {**asdict(self), "speedup": self.speedup}
        d["groups"] = [{**g, "sequences": list(g["sequences"])} for g in d["groups"]]
        return {k: None if isinstance(v, float) and math.isinf(v) else v for k, v in d.items()}


def degrees(cost: SeqCost, n: int) -> list[int]:
    """The group sizes 1, 2, 4, …, D."""
    return [1 << i for i in range(min(n, cost.max_degree).bit_length())]


def _lpt(s: np.ndarray, ks: list, cost: SeqCost, d: int, count: int, tight: bool = False) -> list[list[int]] | None:
    """Sequences ``ks`` longest first to the least-loaded of ``count`` groups of size d with memory left
    (``tight``: to the fullest, best-fit decreasing); None if one fits none."""
    w, cap = cost.work(d, s[ks]), cost.capacity(d)
    loads, tokens, groups = np.zeros(count), np.zeros(count), [[] for _ in range(count)]
    for i in np.argsort(-w, kind="stable"):
        fits = tokens + s[ks[i]] <= cap
        if not fits.any():
            return None
        g = int(np.argmin(np.where(fits, -tokens if tight else loads, np.inf)))
        loads[g], tokens[g] = loads[g] + w[i], tokens[g] + s[ks[i]]
        groups[g].append(int(ks[i]))
    return groups


def static_plan(lengths, cost: SeqCost, n: int, d: int) -> list[list[int]] | None:
    """The static baseline: N/d groups of size d, dealt by LPT within memory; None if a sequence fits none."""
    s = np.asarray(lengths, dtype=np.int64)
    return _lpt(s, list(range(len(s))), cost, d, n // d)


def _buckets(s: np.ndarray, max_buckets: int) -> np.ndarray:
    """Bucket of every sequence: equal lengths together, or log-spaced bins when there are too many."""
    uniq = np.unique(s)
    if len(uniq) <= max_buckets:
        return np.searchsorted(uniq, s)
    edges = np.geomspace(uniq[0], uniq[-1] + 1, max_buckets + 1)
    return np.unique(np.digitize(s, edges[1:-1]), return_inverse=True)[1]


def solve(lengths, cost: SeqCost, n: int, *, time_limit_s: float = 2.0, max_buckets: int = 48,
          rel_tol: float = 1e-3) -> BatchPlan:
    """Plan the batch on ``n`` devices (module docstring); InfeasibleError if nothing fits memory."""
    from ortools.sat.python import cp_model

    t0, s = time.perf_counter(), np.asarray(lengths, dtype=np.int64)
    sizes = degrees(cost, n)
    statics = {d: static_plan(s, cost, n, d) for d in sizes if n % d == 0}
    st_time = {d: max(cost.time(d, s[g]) for g in gs) for d, gs in statics.items() if gs is not None}
    st_d = min(st_time, key=st_time.get) if st_time else None
    b_of = _buckets(s, max_buckets)
    nb = int(b_of.max()) + 1
    cnt = np.bincount(b_of, minlength=nb)
    mean, sq = np.bincount(b_of, s, nb) / cnt, np.bincount(b_of, s.astype(float) ** 2, nb) / cnt
    top, bot = np.zeros(nb, dtype=np.int64), np.full(nb, s.max())
    np.maximum.at(top, b_of, s)
    np.minimum.at(bot, b_of, s)
    w, lat = {d: cost.work(d, mean, sq) for d in sizes}, {d: cost.latency(d) for d in sizes}
    wtop, wbot = {d: cost.work(d, top) for d in sizes}, {d: cost.work(d, bot) for d in sizes}

    def feasible(c: float, hint: dict) -> tuple[int, dict | None]:
        """FEAS(C): CP-SAT's status and {(b, d): x_bd, d: y_d} if feasible."""
        scale, m = 1e6 / c, cp_model.CpModel()
        y = {d: m.new_int_var(0, n // d, f"y{d}") for d in sizes}
        x = {(b, d): m.new_int_var(0, int(cnt[b]) * (top[b] <= cost.capacity(d) and wtop[d][b] + lat[d] <= c),
                                   f"x{b}_{d}") for b in range(nb) for d in sizes}
        for b in range(nb):
            m.add(sum(x[b, d] for d in sizes) == int(cnt[b]))
        m.add(sum(d * y[d] for d in sizes) <= n)
        for d in sizes:
            room = max(0, int((c - lat[d]) * scale))  # w rounded down: a real plan that fits C is never cut off
            m.add(sum(x[b, d] * int(w[d][b] * scale) for b in range(nb)) <= room * y[d])
            m.add(sum(x[b, d] * int(top[b]) for b in range(nb)) <= cost.capacity(d) * y[d])
            for j in (1, 2, 3):
                big = [b for b in range(nb) if (j + 1) * wbot[d][b] > c - lat[d]]
                if big:
                    m.add(sum(x[b, d] for b in big) <= j * y[d])
        for key, var in [*x.items(), *y.items()]:
            m.add_hint(var, hint[key])
        solver = cp_model.CpSolver()
        solver.parameters.num_workers, solver.parameters.random_seed = 1, _SEED
        solver.parameters.max_deterministic_time = time_limit_s / 12
        solver.parameters.max_time_in_seconds = time_limit_s + 10  # a safety net only
        status = solver.solve(m)
        ok = status in (cp_model.OPTIMAL, cp_model.FEASIBLE)
        return status, {k: solver.value(v) for k, v in [*x.items(), *y.items()]} if ok else None

    def dealt(sol: dict) -> tuple[float, list]:
        """Every class's sequences (longest of each bucket to the largest sizes) dealt by LPT, priced."""
        members: dict[int, list[int]] = {d: [] for d in sizes}
        for b in range(nb):
            seqs = sorted(np.flatnonzero(b_of == b).tolist(), key=lambda k: -s[k])
            for d in sizes[::-1]:
                members[d], seqs = members[d] + seqs[:sol[b, d]], seqs[sol[b, d]:]
        classes = {d: _lpt(s, ks, cost, d, sol[d]) or _lpt(s, ks, cost, d, sol[d], tight=True)
                   for d, ks in members.items() if ks}
        if any(gs is None for gs in classes.values()):
            return math.inf, []
        groups = [(d, g) for d, gs in classes.items() for g in gs if g]
        return max(cost.time(d, s[g]) for d, g in groups), groups

    alone = np.min([np.where(s <= cost.capacity(d), cost.work(d, s) + lat[d], np.inf) for d in sizes], axis=0)
    lo = proven = max(float(cost.work(1, s).sum()) / n, float(alone.max()))
    exact = nb == len(np.unique(s))
    hi = st_time[st_d] if st_d else float(sum(cost.time(1, [x]) for x in s) + lat[sizes[-1]])
    hint = {(b, d): int(cnt[b]) * (d == st_d) for b in range(nb) for d in sizes}
    status, sol = feasible(hi, {**hint, **{d: n // d * (d == st_d) for d in sizes}})
    plans = [dealt(sol)] if sol else []
    while sol and hi - lo > rel_tol * hi:  # bisection on C; every feasible solution is dealt and priced
        mid = (lo + hi) / 2
        status, got = feasible(mid, sol)
        if got is None:
            lo = mid
            proven = max(proven, mid) if exact and status == cp_model.INFEASIBLE else proven
        else:
            hi, sol = mid, got
            plans.append(dealt(sol))
    plan_t, groups = min(plans, key=lambda p: p[0], default=(math.inf, []))
    source = "milp"
    if st_d and st_time[st_d] <= plan_t:
        groups, plan_t, source = [(st_d, g) for g in statics[st_d] if g], st_time[st_d], "static"
    if not groups:
        raise InfeasibleError(f"no set of SP groups within {n} devices holds the batch's {int(s.sum())} tokens "
                              f"(a device holds {cost.capacity(1)}); split the batch into smaller ones")
    out, first = [], 0
    for d, g in sorted(groups, key=lambda t: -t[0]):
        out.append(SPGroup(d, first, tuple(sorted(g)), cost.time(d, s[g])))
        first += d
    gap = max(0.0, (plan_t - proven) / plan_t)
    return BatchPlan(tuple(out), plan_t, st_d, st_time.get(st_d, math.inf), proven, gap,
                     "OPTIMAL" if gap <= rel_tol else "FEASIBLE", source, time.perf_counter() - t0, nb)
