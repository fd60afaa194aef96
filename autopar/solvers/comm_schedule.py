r"""Gradient buckets and the order the backward's gradient reductions leave in: a scheduling model.

Pure arrays in, a schedule out (this module never sees torch); ``passes/comm_schedule.py`` builds
the arrays from a plan. With the shardings fixed, the step still depends on when each gradient
reduction is issued and which ones are fused into one collective. This models the backward pass
of one rank as one compute stream and a communication stream per link.

Model
-----
Gradients i = 1..n, each reduced (all-reduced) over mesh axis a(i), have

    r_i   ready time: the backward compute that completes gradient i ends (compute stream, from 0)
    b_i   bytes
    T     the backward's end (T ≥ max r_i)

Axis a prices one collective of S bytes at d_a(S) = α_a + β_a·S (the ring all-reduce of
cost_models/comm.py is affine in S: α_a = 2(n−1)·latency, β_a = 2(n−1)/(n·bandwidth)); a callable
``time_fn(a, S)`` may replace it (a segmented, calibrated link), and is then used for every time
reported (the CP-SAT model itself keeps the affine α_a, β_a).

Each axis runs on a stream σ(a); axes on the same stream share one link (the pass gives axes on
the same link level one stream). Decisions: a partition of each axis's gradients into buckets (one
collective each), an issue order and start times s_k. Constraints:

    s_k ≥ max_{i ∈ B_k} r_i                         (a bucket leaves once its last gradient is ready)
    e_k = s_k + d_a(Σ_{i ∈ B_k} b_i)
    buckets on one stream never overlap              (no-overlap per stream)
    Σ_{k : q_k ≤ t < e_k} bytes(B_k) ≤ M  ∀t          (optional memory cap M on bucket buffers in flight)

where q_k = max_{i ∈ B_k} r_i is when the executor issues bucket k (it flattens the gradients into
one buffer then; the buffer is freed when the collective ends). Objective:

    minimise the makespan C = max(T', max_k e_k)         exposed communication = C − T

ω ∈ [0, 1] (``overlap``, the preset's ``comm_compute_overlap``): the fraction of a collective's time
that overlaps compute without slowing it; r_i and T are compute progress. In issue order, with L_k =
(1 − ω)·Σ_{j<k} o_j the delay compute has taken so far, bucket k is released at max_{i ∈ B_k} r_i + L_k
and overlaps compute for o_k = min(d_k, (T + L_k − s_k)⁺/ω) (compute left at s_k runs at rate ω), and
compute ends at T' = T + L_K (exact on one stream; collectives in flight at once each slow compute).
ω = 1 is the model above; ω = 0 serialises, C = T + Σ_k d_k: each α is pure cost.

Ties (every bucket hidden behind compute but the last is the common case) are broken towards
gradients synced early. The dp makes each prefix of the ready order that ends a bucket finish as
early as any schedule of that prefix can (which also minimises the last end, max_k e_k, when it
is below T); CP-SAT minimises Σ_i c_i, c_i the end of the bucket holding gradient i, at the
optimal C. Either way small buckets leave as soon as their gradients are ready while the link
keeps up, and gradients merge where each extra collective's α would delay the ones behind it:
a high α gives fewer, larger buckets; a low α more, smaller ones.

Contiguity loses nothing (for C, with d_a affine and no memory cap). Take any schedule, its
buckets in execution order on their streams. Suppose gradients i, j of one axis with r_i ≤ r_j sit
in buckets B_m ∋ i executed after B_l ∋ j. Move i into B_l: B_l's release does not move (r_i ≤
r_j), its duration grows by δ = β_a·b_i; B_m's release cannot grow and its duration shrinks by δ
(by α_a + δ if it empties and is dropped). On the shared stream each bucket between l and m then
ends at most δ later (induction on e'_k = max(q'_k, e'_{k−1}) + d'_k), and B_m ends no later:
e'_m ≤ max(q_m, e_{m−1} + δ) + d_m − δ ≤ e_m; every later bucket ends no later either. Each
move lowers Σ_i (execution position of i's bucket), so repeating it terminates, in a schedule
whose buckets are contiguous in ready order and run in ready order on each axis. Hence, per axis,
the decision is only where the bucket boundaries fall: x_i ∈ {0,1} "a bucket closes after the
i-th gradient of its axis" (the last one closes). With a memory cap or a non-affine d_a the
contiguous schedules are a restriction (an exact optimum over them).

Solvers
-------
* ``dp`` (exact, every stream carrying one axis, no binding cap): streams are independent, and on
  one stream with contiguous FIFO buckets e_k = max(q_k, e_{k−1}) + d(B_k) is monotone in
  e_{k−1}, so the earliest end of a schedule of the first j gradients is

      f(0) = 0,   f(j) = min_{1 ≤ i ≤ j} max(r_j, f(i−1)) + d_a(b_i + ... + b_j)

  and C = max(T, f(n)); O(n²), the scan over i stopping once r_j + d(i..j) ≥ the best f(j) found.
  ω < 1 (exact for one axis; per axis, a heuristic, beside other streams): the state (e, W), last
  end and compute progress then, goes to (e + (r − W)⁺ + d, min(T, max(W, r) + ω·d)), monotone in
  (−e, W), and C = T + e_n − W_n: each prefix keeps its Pareto front of (e, W) (thinned past 16).
* ``cp-sat`` (axes sharing a stream, or a memory cap; ``method="auto"`` uses it up to
  ``CPSAT_MAX_GRADS`` gradients, beyond which each axis's dp buckets are list-scheduled in release
  order on the shared streams, a heuristic, when that keeps the cap): with x_i as above, in time
  units τ (integers), per axis in ready order i = 1..n_a::

      D_i = x_{i−1} ? α_a + β_a b_i : D_{i−1} + β_a b_i                (bucket duration so far)
      S_i = x_{i−1} ? b_i : S_{i−1} + b_i                             (bucket bytes so far)
      I_i = interval [s_i, s_i + D_i) present iff x_i,   s_i ≥ r_i
      c_i = x_i ? s_i + D_i : c_{i+1}
      NoOverlap({I_i : σ(a(i)) = σ}) for each stream σ
      Cumulative({[r_i, s_i + D_i) present iff x_i, demand S_i}) ≤ M     (with a cap)
      s_i ≥ s_{i−1}                                                  (FIFO per axis)
      C ≥ T,  C ≥ c_i
      ω < 1:  o_i = x_i ? min(D_i, T' − s_i)⁺ : 0,  T' = T + (1 − ω)·Σ o_i,  C ≥ T',
              s_i ≥ r_i + (1 − ω)·Σ_{j < i on axis a} o_j  when x_i
  ((1 − ω) in thousandths; exact for one axis, else the lag misses other axes: checked against the dp.)

  minimise C, then (C fixed at its optimum) Σ_i c_i: one worker, a fixed seed and deterministic
  time limits (70% and 30% of ``time_limit_s``; the wall clock only as a safety net at twice
  that), so every rank planning alike gets the same schedule; warm-started from the dp's
  buckets. τ is the horizon (the synchronous makespan) over 10⁵. The chosen partition and
  order are re-timed in floats (``simulate``).

For comparison, priced by the same model: ``synchronous_s`` (today's runtime: each gradient
all-reduced alone, in its accumulate hook, blocking compute: T + Σ_i d_{a(i)}(b_i), any ω) and ``ddp``
(PyTorch DDP's rule: buckets in ready order closed at 25 MiB, the first at 1 MiB, overlapped).
ZeRO-3 all-gather prefetch is not modelled: autopar has no sharded-parameter data parallelism yet.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DDP_BUCKET_BYTES = 25 * 1024 * 1024  # torch DDP bucket_cap_mb=25
DDP_FIRST_BUCKET_BYTES = 1024 * 1024  # torch.distributed's _DEFAULT_FIRST_BUCKET_BYTES
_SEED = 20220711  # as solvers/intra_op.py: part of the determinism contract
CPSAT_MAX_GRADS = 64  # "auto" beyond this many gradients: list scheduling of the dp's buckets (shared links)
_UNITS = 10**5  # the CP-SAT model's horizon in time units (τ = horizon / _UNITS)
_FRONT = 16  # the dp's labels per prefix with ω < 1, beyond which it thins them (a heuristic)


@dataclass(frozen=True)
class BucketProblem:
    """The arrays of the model (module docstring). Gradients are indexed 0..n−1 in any order; each
    axis's ready order is by (ready_s, index)."""

    ready_s: Sequence[float]  # r_i
    nbytes: Sequence[int]  # b_i
    axis: Sequence[int]  # a(i): index into alpha_s / beta_s
    alpha_s: Sequence[float]  # α_a, seconds per collective
    beta_s: Sequence[float]  # β_a, seconds per byte
    backward_s: float  # T
    stream: Sequence[int] | None = None  # σ(a) per axis; None: every axis on its own stream
    memory_cap_bytes: float | None = None  # M; None: no cap
    time_fn: Callable[[int, float], float] | None = None  # d_a(S) when not affine
    overlap: float = 1.0  # ω: compute runs at rate ω while a collective is in flight

    def __post_init__(self):
        n, k = len(self.ready_s), len(self.alpha_s)
        if not (len(self.nbytes) == len(self.axis) == n and len(self.beta_s) == k):
            raise ValueError(f"ready_s, nbytes and axis need one entry per gradient and alpha_s, beta_s one per axis; "
                             f"got {n}, {len(self.nbytes)}, {len(self.axis)} and {k}, {len(self.beta_s)}")
        if any(not 0 <= a < k for a in self.axis):
            raise ValueError(f"axis indexes must be in 0..{k - 1}, got {sorted(set(self.axis))}")
        if any(not (math.isfinite(r) and r >= 0) for r in self.ready_s) or any(b < 0 for b in self.nbytes):
            raise ValueError("ready times must be finite and >= 0, and bytes >= 0")
        if any(x < 0 for x in (*self.alpha_s, *self.beta_s)):
            raise ValueError("alpha_s and beta_s must be >= 0")
        if not 0 <= self.overlap <= 1:
            raise ValueError(f"overlap (comm_compute_overlap) must be in [0, 1], got {self.overlap!r}")
        if self.stream is not None and len(self.stream) != k:
            raise ValueError(f"stream needs one entry per axis ({k}), got {len(self.stream)}")
        if self.memory_cap_bytes is not None and n and self.memory_cap_bytes < max(self.nbytes):
            raise ValueError(f"memory cap {self.memory_cap_bytes:g} B is below the largest gradient "
                             f"({max(self.nbytes)} B): no bucket fits")

    @property
    def n(self) -> int:
        return len(self.ready_s)

    @property
    def end_s(self) -> float:
        """T, at least the last ready time."""
        return max([float(self.backward_s), *map(float, self.ready_s)])

    def streams(self) -> list[int]:
        return list(self.stream) if self.stream is not None else list(range(len(self.alpha_s)))

    def duration(self, a: int, nbytes: float) -> float:
        if self.time_fn is not None:
            return float(self.time_fn(a, nbytes))
        return self.alpha_s[a] + self.beta_s[a] * nbytes

    def order(self, a: int) -> list[int]:
        """Axis a's gradients in ready order."""
        return sorted((i for i in range(self.n) if self.axis[i] == a), key=lambda i: (self.ready_s[i], i))


@dataclass(frozen=True)
class Bucket:
    axis: int
    grads: tuple[int, ...]  # gradient indexes, in ready order
    nbytes: int
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Schedule:
    buckets: tuple[Bucket, ...]  # in issue order (per stream, execution order)
    makespan_s: float  # C = max(T, last end)
    backward_s: float  # T
    completion_sum_s: float  # Σ_i c_i
    solver: str  # "dp", "cp-sat", "ddp", "given"
    status: str
    solve_time_s: float = 0.0

    @property
    def exposed_s(self) -> float:
        return self.makespan_s - self.backward_s


def simulate(problem: BucketProblem, groups: Sequence[tuple[int, Sequence[int]]], *, solver: str = "given",
             status: str = "simulated", solve_time_s: float = 0.0) -> Schedule:
    """Time buckets ``groups`` = [(axis, gradient indexes), ...] given in issue order: each starts
    as soon as its gradients are ready and its stream is free (the earliest schedule of that order)."""
    seen = sorted(i for _, g in groups for i in g)
    if seen != list(range(problem.n)):
        raise ValueError("the buckets must hold every gradient exactly once")
    streams, T, w = problem.streams(), problem.end_s, problem.overlap
    free: dict[int, float] = {}
    out, lag = [], 0.0  # lag: compute's delay so far, (1 − ω)·Σ overlapped collective time
    for a, g in groups:
        if any(problem.axis[i] != a for i in g):
            raise ValueError(f"bucket {list(g)} mixes axes: every gradient of a bucket reduces over axis {a}")
        g = tuple(sorted(g, key=lambda i: (problem.ready_s[i], i)))
        nb = sum(int(problem.nbytes[i]) for i in g)
        s = max(max(float(problem.ready_s[i]) for i in g) + lag, free.get(streams[a], 0.0))
        e = free[streams[a]] = s + problem.duration(a, nb)
        if (left := T + lag - s) > 0:  # compute still running: o = min(d, left / ω) overlapped
            lag += (1 - w) * (e - s if w * (e - s) <= left else left / w)
        out.append(Bucket(a, g, nb, s, e))
    total = sum(len(b.grads) * b.end_s for b in out)
    end = max([T + lag, *(b.end_s for b in out)])
    return Schedule(tuple(out), end, T, total, solver, status, solve_time_s)


def synchronous_s(problem: BucketProblem) -> float:
    """Each gradient reduced alone, blocking the compute stream (today's accumulate hooks)."""
    return problem.end_s + sum(problem.duration(problem.axis[i], problem.nbytes[i]) for i in range(problem.n))


def ddp_schedule(problem: BucketProblem, bucket_bytes: int = DDP_BUCKET_BYTES,
                 first_bucket_bytes: int = DDP_FIRST_BUCKET_BYTES) -> Schedule:
    """PyTorch DDP's rule priced by the model: per axis, gradients in ready order fill a bucket
    until it holds ``bucket_bytes`` (the first ``first_bucket_bytes``); buckets overlap compute."""
    groups = []
    for a in range(len(problem.alpha_s)):
        cur, size, cap = [], 0, first_bucket_bytes
        for i in problem.order(a):
            cur.append(i)
            size += problem.nbytes[i]
            if size >= cap:
                groups.append((a, cur))
                cur, size, cap = [], 0, bucket_bytes
        if cur:
            groups.append((a, cur))
    # issue order: by the time each bucket's last gradient is ready
    groups.sort(key=lambda ag: (max(problem.ready_s[i] for i in ag[1]), ag[0]))
    return simulate(problem, groups, solver="ddp", status="rule")


def solve(problem: BucketProblem, *, method: str = "auto", time_limit_s: float = 5.0) -> Schedule:
    """The optimal bucket schedule (module docstring). ``method``: "auto" (the dp where it is
    exact, else CP-SAT), "dp" or "cp-sat"."""
    if method not in ("auto", "dp", "cp-sat"):
        raise ValueError(f"method must be 'auto', 'dp' or 'cp-sat', got {method!r}")
    t0 = time.perf_counter()
    if problem.n == 0:
        return Schedule((), problem.end_s, problem.end_s, 0.0, "dp", "optimal", 0.0)
    dp_ok = _dp_exact(problem)
    if method == "dp" and not dp_ok:
        raise ValueError("the dp needs every stream to carry one axis and no binding memory cap; use cp-sat")
    thinned: list[int] = []  # axes whose dp fronts were thinned (ω < 1, long axes): then not proven optimal
    groups = _dp_groups(problem, thinned)
    if method == "dp" or (method == "auto" and dp_ok):
        status = "heuristic: dp fronts thinned to %d labels" % _FRONT if thinned else "optimal"
        return simulate(problem, groups, solver="dp", status=status, solve_time_s=time.perf_counter() - t0)
    if method == "auto" and problem.n > CPSAT_MAX_GRADS:  # list scheduling: each axis's dp buckets, by release
        heuristic = simulate(problem, groups, solver="dp", status="heuristic: per-axis dp buckets, list-scheduled")
        if problem.memory_cap_bytes is None or _within_cap(problem, heuristic):
            return heuristic
    return _cpsat(problem, groups, time_limit_s, t0)


def _within_cap(problem: BucketProblem, sched: Schedule) -> bool:
    spans = [(max(problem.ready_s[i] for i in b.grads), b.end_s, b.nbytes) for b in sched.buckets]
    return all(sum(x for s, e, x in spans if s <= t < e) <= problem.memory_cap_bytes for t, _, _ in spans)


def _dp_exact(problem: BucketProblem) -> bool:
    streams = problem.streams()
    used = sorted(set(problem.axis))
    one_axis_each = len({streams[a] for a in used}) == len(used)
    cap = problem.memory_cap_bytes
    return one_axis_each and (cap is None or cap >= sum(problem.nbytes)) and (problem.overlap == 1 or len(used) == 1)


def _dp_groups(problem: BucketProblem, thinned: list | None = None) -> list[tuple[int, list[int]]]:
    """The dp's buckets on every axis, issued by start time (exact per stream; on a shared stream
    or under a cap, a warm start for CP-SAT)."""
    timed = []
    for a in sorted(set(problem.axis)):
        for grads in _dp_axis(problem, a, thinned if thinned is not None else []):
            timed.append((max(problem.ready_s[i] for i in grads), a, grads))
    timed.sort(key=lambda x: (x[0], x[1]))
    return [(a, g) for _, a, g in timed]


def _dp_axis(problem: BucketProblem, a: int, thinned: list) -> list[list[int]]:
    """The dp over prefixes of axis a's ready order (module docstring)."""
    idx = problem.order(a)
    n = len(idx)
    r = [float(problem.ready_s[i]) for i in idx]
    b = [int(problem.nbytes[i]) for i in idx]
    if problem.overlap < 1:
        return _dp_labels(problem, a, idx, r, b, thinned)
    f, arg = [0.0], [0]  # f[j]: earliest end of a schedule of positions 0..j-1; arg[j]: its last bucket's first
    for j in range(1, n + 1):
        best, where, size = math.inf, j - 1, 0
        for i in range(j - 1, -1, -1):  # the last bucket holds positions i..j-1
            size += b[i]
            d = problem.duration(a, size)
            if r[j - 1] + d >= best:
                break  # every longer last bucket ends later still
            e = max(r[j - 1], f[i]) + d
            if e < best:  # ties keep the shorter last bucket
                best, where = e, i
        f.append(best)
        arg.append(where)
    out, j = [], n
    while j > 0:
        out.append([idx[p] for p in range(arg[j], j)])
        j = arg[j]
    return out[::-1]


def _dp_labels(problem: BucketProblem, a: int, idx, r, b, thinned: list) -> list[list[int]]:
    """ω < 1: per prefix, the Pareto front of labels (e, W, the last bucket's first position, parent)."""
    T, w, fronts = problem.end_s, problem.overlap, [[(0.0, 0.0, 0, None)]]
    for j in range(1, len(idx) + 1):
        cand = [(lab[0] + max(0.0, r[j - 1] - lab[1]) + d, -min(T, max(lab[1], r[j - 1]) + w * d), -i, lab)
                for i in range(j) for d in [problem.duration(a, sum(b[i:j]))] for lab in fronts[i]]
        fronts.append([])
        for e, mW, mi, lab in sorted(cand, key=lambda x: x[:3]):  # more progress than every earlier label
            if not fronts[-1] or -mW > fronts[-1][-1][1]:
                fronts[-1].append((e, -mW, -mi, lab))
        if len(fronts[-1]) > _FRONT:  # thinned, evenly along the front: no longer exact
            thinned.append(a)
            fronts[-1] = [fronts[-1][k * (len(fronts[-1]) - 1) // (_FRONT - 1)] for k in range(_FRONT)]
    lab, out, j = min(fronts[-1], key=lambda x: (x[0] - x[1], x[0])), [], len(idx)  # C = T + e − W
    while j > 0:
        out.append([idx[p] for p in range(lab[2], j)])
        j, lab = lab[2], lab[3]
    return out[::-1]


def _cpsat(problem: BucketProblem, hint_groups, time_limit_s: float, t0: float) -> Schedule:
    from ortools.sat.python import cp_model

    T = problem.end_s
    horizon_s = max(synchronous_s(problem), simulate(problem, hint_groups).makespan_s) * 1.000001 + 1e-30
    tau = horizon_s / _UNITS

    def t(x: float) -> int:
        return int(round(x / tau))

    H = t(horizon_s) + problem.n + 2  # rounding slack
    unit = max(1, math.ceil(sum(problem.nbytes) / 1e9))  # bytes per memory unit
    streams, axes = problem.streams(), sorted(set(problem.axis))
    order = {a: problem.order(a) for a in axes}
    inc = {i: t(problem.beta_s[problem.axis[i]] * problem.nbytes[i]) for i in range(problem.n)}
    mem = {i: -(-int(problem.nbytes[i]) // unit) for i in range(problem.n)}
    m = cp_model.CpModel()
    x, d, sz, s, e, c = {}, {}, {}, {}, {}, {}
    intervals: dict[int, list] = {}
    live = []
    for a in axes:
        idx = order[a]
        for p, i in enumerate(idx):
            x[i] = m.new_bool_var(f"x{i}")
            if p == len(idx) - 1:
                m.add(x[i] == 1)  # the axis's last gradient closes its bucket
            d[i], sz[i] = m.new_int_var(0, H, f"D{i}"), m.new_int_var(0, sum(mem.values()), f"S{i}")
            r = t(problem.ready_s[i])
            s[i], e[i], c[i] = m.new_int_var(r, H, f"s{i}"), m.new_int_var(0, H, f"e{i}"), m.new_int_var(0, H, f"c{i}")
            if p == 0:
                m.add(d[i] == t(problem.alpha_s[a]) + inc[i])
                m.add(sz[i] == mem[i])
            else:
                j = idx[p - 1]
                m.add(d[i] == t(problem.alpha_s[a]) + inc[i]).only_enforce_if(x[j])
                m.add(d[i] == d[j] + inc[i]).only_enforce_if(~x[j])
                m.add(sz[i] == mem[i]).only_enforce_if(x[j])
                m.add(sz[i] == sz[j] + mem[i]).only_enforce_if(~x[j])
                m.add(s[i] >= s[j])  # FIFO: the axis's buckets leave in ready order
            intervals.setdefault(streams[a], []).append(m.new_optional_interval_var(s[i], d[i], e[i], x[i], f"I{i}"))
            if problem.memory_cap_bytes is not None:
                live.append((m.new_optional_interval_var(r, e[i] - r, e[i], x[i], f"L{i}"), sz[i]))
            m.add(c[i] == e[i]).only_enforce_if(x[i])
        for i, j in zip(idx, idx[1:]):
            m.add(c[i] == c[j]).only_enforce_if(~x[i])
    for ivs in intervals.values():
        m.add_no_overlap(ivs)
    if live:
        m.add_cumulative([iv for iv, _ in live], [q for _, q in live], int(problem.memory_cap_bytes // unit))
    C = m.new_int_var(t(T), H, "C")
    for i in c:
        m.add(C >= c[i])
    if problem.overlap < 1:  # o_i, T' (module docstring); q = 1000·(1 − ω)
        q, Tw = 1000 - round(1000 * problem.overlap), m.new_int_var(t(T), H, "Tw")
        o, mn = {i: m.new_int_var(0, H, f"o{i}") for i in c}, {i: m.new_int_var(-H, H, f"m{i}") for i in c}
        m.add(1000 * Tw >= 1000 * t(T) + q * sum(o.values()))
        m.add(C >= Tw)
        for a in axes:
            for p, i in enumerate(order[a]):
                m.add_min_equality(mn[i], [d[i], Tw - s[i]])
                m.add(o[i] >= mn[i]).only_enforce_if(x[i])
                m.add(1000 * s[i] >= 1000 * t(problem.ready_s[i]) + q * sum(o[j] for j in order[a][:p])).only_enforce_if(x[i])
    vars_ = [v for i in range(problem.n) for v in (x[i], d[i], sz[i], s[i], e[i], c[i])] + [C]

    # warm start: the dp's buckets, timed in the model's integer units (under a cap CP-SAT may repair them)
    hint, free = {}, {}
    for a, g in hint_groups:
        g = sorted(g, key=lambda i: (problem.ready_s[i], i))
        st = max(max(t(problem.ready_s[i]) for i in g), free.get(streams[a], 0))
        dur, byt = t(problem.alpha_s[a]), 0
        for i in g:
            dur, byt = dur + inc[i], byt + mem[i]
            hint[x[i]], hint[d[i]], hint[sz[i]] = int(i == g[-1]), dur, byt
        free[streams[a]] = st + dur
        for i in g:
            hint[c[i]] = st + dur
        hint[s[g[-1]]], hint[e[g[-1]]] = st, st + dur
    for a in axes:
        prev = 0
        for i in order[a]:
            if s[i] not in hint:  # not a bucket's last gradient: its interval is absent
                hint[s[i]] = max(prev, t(problem.ready_s[i]))
                hint[e[i]] = hint[s[i]] + hint[d[i]]
            prev = hint[s[i]]
    hint[C] = max([t(T), *(hint[c[i]] for i in c)])

    def run(limit, values):
        m.clear_hints()
        for v, value in values.items():
            m.add_hint(v, value)
        solver = cp_model.CpSolver()
        prm = solver.parameters
        prm.num_workers, prm.random_seed = 1, _SEED
        prm.max_deterministic_time = limit
        prm.max_time_in_seconds = 2 * limit + 1  # a safety net: the deterministic limit binds first
        return solver, solver.solve(m)

    m.minimize(C)
    solver, status = run(0.7 * time_limit_s, hint)
    if status == cp_model.INFEASIBLE:
        raise ValueError("no bucket schedule keeps the bucket buffers in flight under the memory cap "
                         f"({problem.memory_cap_bytes:g} B)")
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        if live:
            raise ValueError(f"CP-SAT found no bucket schedule under the memory cap in {time_limit_s:g} s")
        return simulate(problem, hint_groups, solver="dp", status="feasible (cp-sat found none in time)",
                        solve_time_s=time.perf_counter() - t0)
    first = status
    m.add(C <= solver.value(C))
    found = {v: solver.value(v) for v in vars_ + (list(o.values()) + [Tw] if problem.overlap < 1 else [])}
    m.minimize(sum(c.values()))
    solver2, status2 = run(0.3 * time_limit_s, found)
    if status2 in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        solver = solver2
    optimal = first == cp_model.OPTIMAL and status2 == cp_model.OPTIMAL
    groups = []
    for a in axes:
        cur = []
        for i in order[a]:
            cur.append(i)
            if solver.value(x[i]):
                groups.append((solver.value(s[i]), a, cur))
                cur = []
    groups.sort(key=lambda g: (g[0], g[1]))
    optimal &= problem.overlap == 1 or len(axes) == 1  # else the ω terms are approximate (docstring)
    out = simulate(problem, [(a, g) for _, a, g in groups], solver="cp-sat",
                   status="optimal" if optimal else "feasible", solve_time_s=time.perf_counter() - t0)
    if problem.overlap < 1 and not live:  # approximate ω terms: keep the dp's buckets where they do better
        dp = simulate(problem, hint_groups, solver="dp", status="feasible (beat cp-sat)", solve_time_s=out.solve_time_s)
        out = dp if dp.makespan_s < out.makespan_s * (1 - 1e-9) else out
    return out
