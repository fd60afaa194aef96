"""Pipeline stages: split a chain of layers into contiguous stages by dynamic programming.

Pure arrays in, a partition out (the planner turns a graph into layers and costs; this module
never sees torch). Layers i = 0..L-1 run in order; global stage k = 0..P-1 holds layers
[a_k, b_k), and runs on pp rank r(k) = k mod p. P = p except for the interleaved schedule, where
each rank holds v > 1 stages ("chunks"): P = p·v, rank r holds r, r + p, r + 2p, ...

Given, per microbatch: ``t[i]`` the time of layer i (forward + backward, on the stage's own
intra-op layout), ``tf[i]`` its forward part and ``tw[i]`` its weight-gradient part (the
backward's input-gradient part is t − tf − tw; without a measured split tf = tw = t/3), ``c[i]``
the time to send the activation after layer i to the next stage and its gradient back
(i = 0..L-2), ``w[i]`` the bytes layer i keeps for the whole step (parameters, gradients,
optimizer state) and ``a[i]`` the activation bytes it saves per microbatch in flight; p ranks,
m microbatches, a schedule and a per-device memory limit M:

    stage time      τ_k  = Σ_{i∈k} t[i] + c[b_k − 1]            (the last stage sends nothing)
    its forward     τᶠ_k = Σ_{i∈k} tf[i] + c[b_k − 1]/2         (the activation's half of the send)
    its W           τʷ_k = Σ_{i∈k} tw[i]
    rank time       ρ_r  = Σ_{k: k mod p = r} τ_k                (= τ_r when v = 1)

In flight: the microbatches whose activations a stage holds at its peak (Megatron SC21 §2.2;
Zero Bubble, arXiv 2401.10241, §3):

    gpipe             f_k = m                          every forward before any backward
    1f1b              f_k = min(m, p − k)              stage k holds p − k microbatches
    zb-h1             f_k = min(m, p)                  the deferred W keep activations: rank r
                                                       defers r of them, so every rank holds
                                                       p − r + r = p, 1F1B's peak on rank 0
    interleaved-1f1b  f_r = min(m, p + (p − 2r − 1)/v)  of all v chunks of rank r: Megatron's
                                                       warm-up runs 2(p − r − 1) + (v − 1)·p
                                                       chunk-forwards, one more in the steady
                                                       state, over v chunks per microbatch

    memory          μ_r = Σ_{k on r} (Σ_{i∈k} w[i] + f · Σ_{i∈k} a[i]) ≤ M      per rank

Step time, with τ_max = max_k τ_k and ρ_max = max_r ρ_r:

    gpipe, 1f1b       T = Σ_k τ_k + (m − 1)·τ_max      (Alpa's inter-op latency: the first
                                                       microbatch crosses every stage, the rest
                                                       follow at the pace of the slowest)
    zb-h1             T = max(m·τ_max, Σ_k (τ_k − σ_k) + (m − 1)·τ_max),
                      σ_k = ((p − 1)·τʷ_k + min(p − 1, m − 1)·min(τᶠ_k, τᵇ_k, τʷ_k)) / p,
                      τᵇ_k = τ_k − τᶠ_k − τʷ_k the input-gradient part
                      (the first microbatch's backward chain skips W on p − 1 stages, and the
                      deferred W fill the cool-down up to the shorter of F, B and W; σ spreads
                      that over the stages alike, so no stage is favoured. For equal stages and
                      m ≥ p the bubble is (p − 1)·max(T_F + T_B − T_W, T_F, T_B): the paper's
                      (p − 1)(T_F + T_B − T_W) when T_W ≤ T_F, T_B, against 1F1B's
                      (p − 1)(T_F + T_B + T_W); for equal stages it is the makespan of the
                      pass-by-pass simulation in ``solvers/schedule.py`` at every m, F, B, W)
    interleaved-1f1b  T = (Σ_k τ_k − ρ_max)/v + m·ρ_max       (needs m mod p = 0)
                      (for equal chunks: (m + (p − 1)/v)·ρ, Megatron's bubble (p − 1)/(m·v);
                      v = 1 gives the 1F1B line; the P − 1 sends make the point-to-point
                      traffic v times 1F1B's)

    minimise T over the contiguous partitions of 0..L-1 into exactly P non-empty stages.

Solution: for a cap τ̂ on the stage time, DP[k][j] = the least Σ g_k over partitions of the first
j layers into k stages, each with τ ≤ τ̂ and μ ≤ its limit, where g_k = τ_k − σ_k for zb-h1
and τ_k otherwise; then T(τ̂) = DP[P][L] + (m − 1)·τ̂. The optimum is attained at τ̂ = the time
of one of the O(L²) candidate stages. The smallest feasible cap is found by bisection (feasibility
only grows with τ̂); from there caps are tried in increasing order, stopping once the lower bound
DP_∞ + (m − 1)·τ̂ (DP_∞ the DP without a cap) reaches the best T found. Each DP is O(P·L²) with
numpy over the inner index. This is exact for gpipe, 1f1b and zb-h1 (T is Σ_k g_k plus a term in
τ_max alone). The T lines are closed forms: for unequal stages the simulated schedules differ from
them by a few percent on average (more for very unequal stages), the 1F1B line included.

For interleaved-1f1b, ρ_max and μ_r sum non-adjacent chunks, which the DP over contiguous chunks
cannot see; it solves the restriction where each chunk has τ_k ≤ τ̂ and its own share of memory
Σ w + f_r·Σ a ≤ M/v (then ρ_r ≤ v·τ̂ and μ_r ≤ M), and T and μ_r of the partition found are
evaluated exactly. So a plan it returns always fits, equal layers get equal chunks (Megatron's
layout), and the DP is a heuristic, not exact, when chunks must differ (tests compare it against
every split: never better than the best, never over memory).

Reported next to T: bubble = (T − m·ρ_max)/(m·ρ_max) against the analytic (p − 1)/m, or
(p − 1)/(m·v) interleaved (for zb-h1 the 1F1B value, an upper bound), equal for balanced stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InfeasibleError

# in order of preference on a tie: 1F1B holds fewer microbatches than GPipe, and needs neither
# the split backward of zb-h1 nor the extra sends of interleaving
SCHEDULES = ("1f1b", "zb-h1", "interleaved-1f1b", "gpipe")
VIRTUAL_STAGES = (2, 3, 4, 6, 8)  # v tried for interleaved-1f1b where p·v ≤ L


@dataclass(frozen=True)
class StagePlan:
    bounds: tuple[tuple[int, int], ...]  # per global stage k (P = p·v of them): layers [start, end)
    stage_times: tuple[float, ...]  # τ_k per microbatch
    stage_memory: tuple[float, ...]  # per global stage: Σ w + f·Σ a, its part of its rank's μ_r
    step_time: float  # T
    microbatches: int
    schedule: str
    bubble: float  # (T − m·ρ_max) / (m·ρ_max)
    analytic_bubble: float  # (p − 1)/m, or (p − 1)/(m·v) interleaved
    virtual_stages: int = 1  # v: stages per rank
    stage_forward: tuple[float, ...] = ()  # τᶠ_k per microbatch
    rank_memory: tuple[float, ...] = ()  # μ_r bytes per pp rank (= stage_memory when v = 1)
    stage_wgrad: tuple[float, ...] = ()  # τʷ_k per microbatch (the weight-gradient part zb-h1 defers)

    def to_json(self) -> dict:
        return {"bounds": [list(b) for b in self.bounds], "stage_times_s": list(self.stage_times),
                "stage_forward_s": list(self.stage_forward), "stage_wgrad_s": list(self.stage_wgrad),
                "stage_memory_bytes": list(self.stage_memory),
                "rank_memory_bytes": list(self.rank_memory), "step_time_s": self.step_time,
                "microbatches": self.microbatches, "schedule": self.schedule,
                "virtual_stages": self.virtual_stages, "bubble": self.bubble,
                "analytic_bubble": self.analytic_bubble}


def in_flight(schedule: str, k: int, p: int, m: int, v: int = 1) -> float:
    """f for global stage ``k`` (module docstring): microbatches of its activations held at the peak."""
    if schedule == "gpipe":
        return m
    if schedule == "zb-h1":
        return min(m, p)
    if schedule == "interleaved-1f1b":
        return min(m, p + (p - 2 * (k % p) - 1) / v)
    return min(m, p - k)


def _w_saving(schedule: str, p: int, m: int) -> tuple[float, float]:
    """The weights of τʷ and of min(τᶠ, τᵇ, τʷ) in σ_k: ((p − 1)/p, min(p − 1, m − 1)/p) for zb-h1."""
    return ((p - 1) / p, min(p - 1, m - 1) / p) if schedule == "zb-h1" else (0.0, 0.0)


def _saved(weights: tuple[float, float], tau, tf, tw):
    """σ of stages with times ``tau``, forward ``tf`` and W ``tw`` (arrays or numbers)."""
    on_w, on_min = weights
    if not (on_w or on_min):
        return 0.0
    return on_w * tw + on_min * np.minimum(np.minimum(tf, tw), tau - tf - tw)


def step_time(schedule: str, taus, tws, p: int, m: int, v: int = 1, tfs=None) -> float:
    """T of the module docstring for stage times ``taus`` (W times ``tws``, forward times ``tfs``,
    default τ/3 each), P = p·v stages."""
    taus = np.asarray(taus, dtype=float)
    if schedule == "interleaved-1f1b":
        rho = max(float(taus[r::p].sum()) for r in range(p))
        return float((taus.sum() - rho) / v + m * rho)
    tws = taus / 3 if tws is None else np.asarray(tws, dtype=float)
    tfs = taus / 3 if tfs is None else np.asarray(tfs, dtype=float)
    tmax = float(taus.max())
    g = float(np.sum(taus - _saved(_w_saving(schedule, p, m), taus, tfs, tws)))
    total = g + (m - 1) * tmax
    return max(total, m * tmax) if schedule == "zb-h1" else total


def solve_stages(t, c, w, a, p: int, m: int, schedule: str = "1f1b", memory_limit: float = float("inf"), *,
                 tf=None, tw=None, virtual_stages: int = 1) -> StagePlan:
    """The optimal contiguous partition of layers into ``p`` ranks' stages (see the module docstring).

    ``tf``/``tw``: per-layer forward and weight-gradient seconds per microbatch (default t/3 each).
    ``virtual_stages`` v > 1 only with ``schedule="interleaved-1f1b"`` (which needs v ≥ 2).
    """
    t, w, a = (np.asarray(x, dtype=float) for x in (t, w, a))
    L, v = len(t), int(virtual_stages)
    c = np.append(np.asarray(c, dtype=float), 0.0) if L else np.zeros(0)
    tf = t / 3 if tf is None else np.asarray(tf, dtype=float)
    tw = t / 3 if tw is None else np.asarray(tw, dtype=float)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if not (len(c) == L and len(w) == L and len(a) == L and len(tf) == L and len(tw) == L):
        raise ValueError(f"need t, w, a (and tf, tw) of one length L and c of length L-1; got "
                         f"{len(t)}, {len(c) - 1}, {len(w)}, {len(a)} ({len(tf)}, {len(tw)})")
    if (schedule == "interleaved-1f1b") != (v > 1) or v < 1:
        raise ValueError(f"interleaved-1f1b takes virtual_stages >= 2 and the other schedules 1; got {schedule} with v={v}")
    P = p * v
    if p < 1 or m < 1 or P > L:
        raise ValueError(f"need 1 <= p·v <= number of layers ({L}) and m >= 1; got p={p}, v={v}, m={m}")
    if schedule == "interleaved-1f1b" and m % p:
        raise ValueError(f"interleaved-1f1b needs the microbatch count to be a multiple of p; got m={m}, p={p}")
    if any((x < 0).any() for x in (t, c, w, a, tf, tw)):
        raise ValueError("layer times, transfer times and bytes must be non-negative")
    if (tf + tw > t * (1 + 1e-9) + 1e-15).any():
        raise ValueError("a layer's forward and weight-gradient parts cannot exceed its whole time t")

    seg = _segments(t, c, w, a, tf, tw)
    stages = [_stage_rule(schedule, k, p, m, v, memory_limit) for k in range(P)]
    caps = np.unique(seg["time"][np.isfinite(seg["time"])])
    caps = caps[caps >= max(t.max(), t.sum() / P) - 1e-15]

    def run(cap):
        return _dp(seg, stages, cap, L, _w_saving(schedule, p, m))

    free = run(np.inf)
    if free is None:  # not even without a cap on the stage time: memory rules the stage out
        raise InfeasibleError(_memory_message(w, a, p, m, schedule, v, memory_limit))
    lo, hi = 0, len(caps) - 1  # the smallest feasible cap, by bisection: feasibility only grows with the cap
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if run(caps[mid]) is not None else (mid + 1, hi)
    caps = caps[lo:]
    lead = m - 1 / v if schedule == "interleaved-1f1b" else m - 1
    floor = free[0] / v if schedule == "interleaved-1f1b" else free[0]
    best = None
    for cap in caps:
        if best is not None and floor + lead * cap >= best[0] * (1 - 1e-12):
            break  # every larger cap costs more in the cap's term alone
        found = run(cap)
        if found is None:
            continue
        bounds = found[1]
        taus = [seg["time"][i, j] for i, j in bounds]
        step = step_time(schedule, taus, [seg["tw"][i, j] for i, j in bounds], p, m, v,
                         [seg["fwd"][i, j] for i, j in bounds])
        if best is None or step < best[0] - 1e-15 * max(1.0, abs(step)):
            best = (step, bounds)
    return _stage_plan(seg, stages, best[1], schedule, p, m, v)


def _stage_plan(seg, stages, bounds, schedule, p, m, v) -> StagePlan:
    taus = tuple(float(seg["time"][i, j]) for i, j in bounds)
    fwd = tuple(float(seg["fwd"][i, j]) for i, j in bounds)
    wgrad = tuple(float(seg["tw"][i, j]) for i, j in bounds)
    step = step_time(schedule, taus, wgrad, p, m, v, fwd)
    mems = tuple(float(seg["w"][i, j] + rule[0] * seg["a"][i, j]) for rule, (i, j) in zip(stages, bounds))
    ranks = tuple(float(sum(mems[r::p])) for r in range(p))
    rho = max(sum(taus[r::p]) for r in range(p))
    return StagePlan(tuple((int(i), int(j)) for i, j in bounds), taus, mems, float(step), m, schedule,
                     float((step - m * rho) / (m * rho)) if rho > 0 else 0.0, (p - 1) / (m * v),
                     virtual_stages=v, stage_forward=fwd, rank_memory=ranks, stage_wgrad=wgrad)


def evaluate_stages(t, c, w, a, p: int, m: int, schedule: str, bounds, memory_limit: float = float("inf"), *,
                    tf=None, tw=None, virtual_stages: int = 1) -> StagePlan:
    """The StagePlan of a given partition ``bounds`` (p·v [start, end) ranges covering the layers in
    order), priced by the same formulas; InfeasibleError if a rank's μ_r exceeds ``memory_limit``."""
    t = np.asarray(t, dtype=float)
    L, v = len(t), int(virtual_stages)
    bounds = [tuple(b) for b in bounds]
    if len(bounds) != p * v or bounds[0][0] != 0 or bounds[-1][1] != L or any(
            i >= j for i, j in bounds) or any(x[1] != y[0] for x, y in zip(bounds, bounds[1:])):
        raise ValueError(f"bounds must be {p * v} contiguous non-empty [start, end) ranges covering 0..{L}; got {bounds}")
    if schedule == "interleaved-1f1b" and (v < 2 or m % p):
        raise ValueError(f"interleaved-1f1b needs virtual_stages >= 2 and m a multiple of p; got v={v}, m={m}, p={p}")
    c = np.append(np.asarray(c, dtype=float), 0.0)
    tf = t / 3 if tf is None else np.asarray(tf, dtype=float)
    tw = t / 3 if tw is None else np.asarray(tw, dtype=float)
    seg = _segments(t, c, np.asarray(w, dtype=float), np.asarray(a, dtype=float), tf, tw)
    plan = _stage_plan(seg, [_stage_rule(schedule, k, p, m, v, memory_limit) for k in range(p * v)], bounds,
                       schedule, p, m, v)
    over = [f"rank {r}: {mu:.4g}" for r, mu in enumerate(plan.rank_memory) if mu > memory_limit]
    if over:
        raise InfeasibleError(f"the given {p * v} pipeline stages need more than {memory_limit:.4g} bytes on "
                              f"{', '.join(over)} with {schedule} and {m} microbatches; raise pp, use more (smaller) "
                              "microbatches, or shard more with tp/dp")
    return plan


def _segments(t, c, w, a, tf, tw) -> dict:
    """Per candidate stage [i, j): its time, forward, W, state and activation bytes; time inf where j <= i."""
    L = len(t)
    pre = {k: np.concatenate([[0.0], np.cumsum(x)]) for k, x in (("t", t), ("w", w), ("a", a), ("f", tf), ("W", tw))}
    i_idx, j_idx = np.meshgrid(np.arange(L + 1), np.arange(L + 1), indexing="ij")
    valid = j_idx > i_idx
    send = np.where(valid, c[np.maximum(j_idx - 1, 0)], 0.0)

    def span(k):
        return pre[k][j_idx] - pre[k][i_idx]

    return {"time": np.where(valid, span("t") + send, np.inf), "fwd": span("f") + send / 2, "tw": span("W"),
            "w": span("w"), "a": span("a")}


def _stage_rule(schedule, k, p, m, v, memory_limit):
    """(f_k, memory limit of the stage alone) for global stage k."""
    return in_flight(schedule, k, p, m, v), memory_limit / v


def _dp(seg, stages, cap, L, saving):
    """Least Σ g over partitions into len(stages) stages with τ ≤ cap and memory within each
    stage's limit; (total, bounds) or None."""
    inf = np.inf
    P = len(stages)
    cost = np.full((P + 1, L + 1), inf)
    back = np.zeros((P + 1, L + 1), dtype=int)
    cost[0, 0] = 0.0
    capped = seg["time"] <= cap
    g = seg["time"] - _saved(saving, np.where(np.isfinite(seg["time"]), seg["time"], 0.0), seg["fwd"], seg["tw"])
    for s, (f, limit) in enumerate(stages, start=1):
        ok = capped & (seg["w"] + f * seg["a"] <= limit)  # [i, j]: stage s-1 = layers [i, j)
        cand = np.where(ok, cost[s - 1][:, None] + g, inf)  # over i, for each j
        back[s] = np.argmin(cand, axis=0)
        cost[s] = cand[back[s], np.arange(L + 1)]
    if not np.isfinite(cost[P, L]):
        return None
    bounds, j = [], L
    for s in range(P, 0, -1):
        i = int(back[s, j])
        bounds.append((i, j))
        j = i
    return float(cost[P, L]), bounds[::-1]


def least_peak_memory(w, a, p: int, m: int, schedule: str = "1f1b", virtual_stages: int = 1) -> float:
    """The smallest max_k (Σ w + f_k·Σ a) over every split into p·v stages, ignoring time:
    M_min[k][j] = min_i max(M_min[k−1][i], μ_k(i, j)). With v > 1, times v: the chunk's share."""
    w, a = np.asarray(w, dtype=float), np.asarray(a, dtype=float)
    L, v = len(w), virtual_stages
    pw, pa = (np.concatenate([[0.0], np.cumsum(x)]) for x in (w, a))
    i_idx, j_idx = np.meshgrid(np.arange(L + 1), np.arange(L + 1), indexing="ij")
    valid = j_idx > i_idx
    best = np.full(L + 1, np.inf)
    best[0] = 0.0
    for k in range(p * v):
        mu = np.where(valid, pw[j_idx] - pw[i_idx] + in_flight(schedule, k, p, m, v) * (pa[j_idx] - pa[i_idx]), np.inf)
        best = np.min(np.maximum(best[:, None], mu), axis=0)
    return float(best[L]) * v


def _memory_message(w, a, p, m, schedule, v, memory_limit) -> str:
    L, need = len(w), least_peak_memory(w, a, p, m, schedule, v)
    return (f"no split of {L} layers into {p} pipeline stages{f' x {v} chunks' if v > 1 else ''} fits {memory_limit:.4g} "
            f"bytes per device with {schedule} and {m} microbatches: the least any split needs is {need:.4g} bytes "
            f"(parameters, gradients and optimizer state alone {w.sum() / p:.4g} per rank on average); raise pp, "
            "use more (smaller) microbatches, or shard more with tp/dp")


def choose_pipeline(per_m: dict[int, tuple], p: int, schedules=SCHEDULES, memory_limit: float = float("inf"),
                    virtual_stages=VIRTUAL_STAGES) -> StagePlan:
    """The best (microbatches, schedule, v, stages): ``per_m[m] = (t, c, w, a)`` or
    ``(t, c, w, a, tf, tw)`` are the per-microbatch arrays when the batch is cut into m microbatches
    (the caller scales them). Interleaving is tried for each v in ``virtual_stages`` with p·v ≤ L,
    where p > 1 and m is a multiple of p."""
    best, why, tried = None, [], 0
    for m, arrays in sorted(per_m.items()):
        t, c, w, a, *split = arrays
        tf, tw = split if split else (None, None)
        for schedule in schedules:
            vs = [v for v in virtual_stages if p > 1 and p * v <= len(t) and m % p == 0] \
                if schedule == "interleaved-1f1b" else [1]
            for v in vs:
                tried += 1
                try:
                    plan = solve_stages(t, c, w, a, p, m, schedule, memory_limit, tf=tf, tw=tw, virtual_stages=v)
                except InfeasibleError as e:
                    why.append((least_peak_memory(w, a, p, m, schedule, v), f"m={m} {schedule}"
                                f"{f' v={v}' if v > 1 else ''}", str(e)))
                    continue
                if best is None or plan.step_time < best.step_time * (1 - 1e-12):
                    best = plan
    if best is None:
        if not tried:
            raise InfeasibleError(f"no schedule in {tuple(schedules)} applies to p={p} with microbatch counts "
                                  f"{sorted(per_m)} (interleaved-1f1b needs a count that is a multiple of p)")
        need, where, _ = min(why)
        raise InfeasibleError(
            f"no microbatch count and schedule fits {p} pipeline stages in {memory_limit / 1e9:.2f} GB per device: the "
            f"least peak memory any split reaches is {need / 1e9:.2f} GB ({where}); raise pp, use more (smaller) "
            f"microbatches, shard more with tp/dp, or plan for a device with more memory")
    return best
