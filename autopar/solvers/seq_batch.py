r"""Heterogeneous sequence-parallel groups for one packed batch (FlexSP, arXiv 2412.01523).

The solver sees numbers, never torch.  Sequences k of lengths s_k go to Ulysses SP groups g of
power-of-two sizes d_g ≤ D (D: the largest degree, ≤ the number of attention heads), each group a
contiguous, size-aligned block of devices, Σ_g d_g ≤ N.  :class:`SeqCost` holds the coefficients.
A group of size d holding tokens T = Σ s_k and squares Q = Σ s_k² costs, in seconds::

    time(d, T, Q) = (α₁·Q + α₂·T)/d + [d > 1]·(β_d·c·T/d + a·(d − 1)·λ_d)
    β_d = max((min(d, p) − 1)/(d·B_intra), max(d − p, 0)/(d·B_inter))   p = devices per node
    mem(d, T)     = m·T/d + state  ≤  M                                   bytes per device

c is the all-to-all bytes a token sends per step (all layers, forward and backward), a the number
of all-to-alls per step, λ_d the intra-node latency when d ≤ p and the inter-node one otherwise:
the all-to-all T ≈ (P − 1)α + ((P − 1)/P)·S·β of FORMULATIONS.md, with only the share of the bytes
that leaves the node on the NIC.  Groups sorted by size are aligned, so a group of d ≤ p devices
never spans two nodes.

MILP (CP-SAT; times scaled to integers)
---------------------------------------
Lengths are bucketed (equal lengths, or log-spaced bins): bucket b has c_b sequences of mean s̄_b,
mean square q̄_b and maximum ŝ_b.  Slots g = (d, i), i < ⌊N/d⌋, d ∈ {1, 2, 4, …, D}::

    u_g ∈ {0, 1}  (slot used),   n_bg ∈ ℤ≥0  (sequences of bucket b in slot g),   C ≥ 0
    min  C
    s.t. Σ_g n_bg = c_b                                        ∀b   (every sequence once)
         n_bg ≤ c_b·u_g,   n_bg = 0 if ŝ_b > K_d               ∀b,g
         Σ_b n_bg·w_bd + a·(d − 1)·λ_d·u_g ≤ C                 ∀g   (w_bd = time(d, s̄_b, q̄_b) − latency)
         Σ_b n_bg·ŝ_b ≤ K_d·u_g,   K_d = ⌊d·(M − state)/m⌋     ∀g   (memory, in tokens; conservative)
         Σ_g d·u_g ≤ N
         u_(d,i) ≥ u_(d,i+1),   Σ_b n_b(d,i)·s̄_b ≥ Σ_b n_b(d,i+1)·s̄_b     (symmetry breaking)

The best static plan (:func:`static_plan`) is the hint.  Sequences are then dealt to the slots'
bucket quotas longest first, each to the least-loaded slot with quota left, and the plan is priced
exactly with ``time``; if that is worse than the static plan, the static plan is returned.
CP-SAT runs on ``workers`` threads, ``interleave_search``, a fixed seed and a deterministic time
limit, so the same inputs give the same plan.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["SeqCost", "SPGroup", "BatchPlan", "static_plan", "solve"]

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
    groups: tuple[SPGroup, ...]
    max_time_s: float
    static_degree: int | None  # best single SP degree (None: none fits)
    static_time_s: float  # its max group time (inf if none fits)
    status: str  # CP-SAT's: OPTIMAL / FEASIBLE / UNKNOWN; "+static" when the static plan was kept
    gap: float  # (objective − bound)/objective of the bucketed MILP
    solve_time_s: float
    buckets: int

    @property
    def speedup(self) -> float:
        return self.static_time_s / self.max_time_s

    def to_dict(self) -> dict:
        d = asdict(self)
        d["groups"] = [{**asdict(g), "sequences": list(g.sequences)} for g in self.groups]
        d["static_time_s"] = None if math.isinf(self.static_time_s) else self.static_time_s
        return d


def degrees(cost: SeqCost, n: int) -> list[int]:
    return [1 << i for i in range(int(math.log2(min(n, cost.max_degree))) + 1)]


def static_plan(lengths: np.ndarray, cost: SeqCost, n: int, d: int) -> list[list[int]] | None:
    """N/d groups of size d, sequences longest first to the least-loaded group they fit; None if one fits none."""
    w, cap = cost.work(d, lengths), cost.capacity(d)
    loads, tokens, groups = np.zeros(n // d), np.zeros(n // d), [[] for _ in range(n // d)]
    for k in np.argsort(-w, kind="stable"):
        fits = tokens + lengths[k] <= cap
        if not fits.any():
            return None
        g = int(np.argmin(np.where(fits, loads, np.inf)))
        loads[g] += w[k]
        tokens[g] += lengths[k]
        groups[g].append(int(k))
    return groups


def _buckets(lengths: np.ndarray, max_buckets: int) -> np.ndarray:
    """Bucket id of every sequence: equal lengths together, or log-spaced bins when there are too many."""
    uniq = np.unique(lengths)
    if len(uniq) <= max_buckets:
        return np.searchsorted(uniq, lengths)
    edges = np.geomspace(uniq[0], uniq[-1] + 1, max_buckets + 1)
    return np.unique(np.digitize(lengths, edges[1:-1]), return_inverse=True)[1]


def solve(lengths, cost: SeqCost, n: int, *, time_limit_s: float = 2.0, max_buckets: int = 48,
          workers: int = 2) -> BatchPlan:
    """Plan the batch (module docstring).  Every length must fit a group of size D alone."""
    from ortools.sat.python import cp_model

    t0 = time.perf_counter()
    s = np.asarray(lengths, dtype=np.int64)
    sizes = degrees(cost, n)
    statics = {d: static_plan(s, cost, n, d) for d in sizes if n % d == 0}
    st_time = {d: max(cost.time(d, s[g]) for g in gs) for d, gs in statics.items() if gs is not None}
    st_d = min(st_time, key=st_time.get) if st_time else None
    b_of = _buckets(s, max_buckets)
    nb = int(b_of.max()) + 1
    cnt = np.bincount(b_of, minlength=nb)
    mean = np.bincount(b_of, s, nb) / cnt
    sq = np.bincount(b_of, s.astype(float) ** 2, nb) / cnt
    top = np.zeros(nb, dtype=np.int64)
    np.maximum.at(top, b_of, s)
    slots = [(d, i) for d in sizes for i in range(min(n // d, len(s)))]
    w = {d: cost.work(d, mean, sq) for d in sizes}
    ub = st_time[st_d] if st_d else sum(cost.time(sizes[-1], [x]) for x in s)
    scale = 1e7 / ub

    m = cp_model.CpModel()
    u = [m.new_bool_var(f"u{j}") for j in range(len(slots))]
    x = {}
    for j, (d, _) in enumerate(slots):
        for b in range(nb):
            if top[b] <= cost.capacity(d):
                x[b, j] = m.new_int_var(0, int(cnt[b]), f"n{b}_{j}")
                m.add(x[b, j] <= int(cnt[b]) * u[j])
    c = m.new_int_var(0, int(2 * 1e7), "C")
    for b in range(nb):
        m.add(sum(x[b, j] for j in range(len(slots)) if (b, j) in x) == int(cnt[b]))
    tok = []
    for j, (d, i) in enumerate(slots):
        row = [b for b in range(nb) if (b, j) in x]
        m.add(sum(x[b, j] * round(w[d][b] * scale) for b in row) + round(cost.latency(d) * scale) * u[j] <= c)
        m.add(sum(x[b, j] * int(top[b]) for b in row) <= cost.capacity(d) * u[j])
        tok.append(sum(x[b, j] * int(round(mean[b])) for b in row))
        if i:
            m.add(u[j - 1] >= u[j])
            m.add(tok[j - 1] >= tok[j])
    m.add(sum(d * u[j] for j, (d, _) in enumerate(slots)) <= n)
    m.minimize(c)
    if st_d:  # hint: the best static plan, its groups by decreasing tokens
        rmean = np.round(mean).astype(np.int64)
        order = sorted(statics[st_d], key=lambda g: -int(rmean[b_of[g]].sum()))
        for j, (d, i) in enumerate(slots):
            g = order[i] if d == st_d and i < len(order) else []
            m.add_hint(u[j], d == st_d and i < len(order))
            for b in range(nb):
                if (b, j) in x:
                    m.add_hint(x[b, j], int(np.sum(b_of[g] == b)) if g else 0)

    solver = cp_model.CpSolver()
    prm = solver.parameters
    prm.num_workers, prm.interleave_search, prm.random_seed = workers, True, _SEED
    prm.max_deterministic_time, prm.max_time_in_seconds = time_limit_s, 10 * time_limit_s + 30
    status = solver.solve(m)
    name = solver.status_name(status)
    if status == cp_model.INFEASIBLE:
        from autopar.errors import InfeasibleError

        raise InfeasibleError(f"the batch's {int(s.sum())} tokens fit no set of SP groups within {n} devices "
                              f"({cost.capacity(1)} tokens per device); split the batch into smaller ones")
    groups: list[tuple[int, list[int]]] = []
    gap = 1.0
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        obj = solver.objective_value
        gap = (obj - solver.best_objective_bound) / obj if obj > 0 else 0.0
        used = [j for j in range(len(slots)) if solver.value(u[j])]
        quota = {(b, j): solver.value(x[b, j]) for j in used for b in range(nb) if (b, j) in x}
        loads = {j: 0.0 for j in used}
        members: dict[int, list[int]] = {j: [] for j in used}
        for k in np.argsort(-cost.work(1, s), kind="stable"):
            j = min((j for j in used if quota.get((int(b_of[k]), j), 0) > 0), key=lambda j: loads[j])
            quota[int(b_of[k]), j] -= 1
            loads[j] += float(cost.work(slots[j][0], s[k]))
            members[j].append(int(k))
        groups = [(slots[j][0], members[j]) for j in used if members[j]]
    best = max((cost.time(d, s[g]) for d, g in groups), default=math.inf)
    if st_d and st_time[st_d] < best:
        groups, best, name = [(st_d, g) for g in statics[st_d] if g], st_time[st_d], name + "+static"
    out, first = [], 0
    for d, g in sorted(groups, key=lambda t: -t[0]):
        out.append(SPGroup(d, first, tuple(sorted(g)), cost.time(d, s[g])))
        first += d
    return BatchPlan(tuple(out), best, st_d, st_time.get(st_d, math.inf), name, max(gap, 0.0),
                     time.perf_counter() - t0, nb)
