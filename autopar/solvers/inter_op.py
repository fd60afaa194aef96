"""Pipeline stages: split a chain of layers into contiguous stages, exactly, by dynamic programming.

Pure arrays in, a partition out (the planner turns a graph into layers and costs; this module
never sees torch). Layers i = 0..L-1 run in order; stage s holds layers [a_s, b_s).

Given, per microbatch: ``t[i]`` the time of layer i (forward + backward, on the stage's own
intra-op layout), ``c[i]`` the time to send the activation after layer i to the next stage and
its gradient back (i = 0..L-2), ``w[i]`` the bytes layer i keeps for the whole step (parameters,
gradients, optimizer state) and ``a[i]`` the activation bytes it saves per microbatch in flight;
p stages, m microbatches, a schedule and a per-device memory limit M:

    stage time      τ_s = Σ_{i∈s} t[i] + c[b_s − 1]            (the last stage sends nothing)
    in flight       f_s = m                 (GPipe: every forward before any backward)
                    f_s = min(m, p − s)     (1F1B: stage s holds p − s microbatches)
    memory          μ_s = Σ_{i∈s} w[i] + f_s · Σ_{i∈s} a[i] ≤ M
    step time       T   = Σ_s τ_s + (m − 1) · max_s τ_s          (Alpa's inter-op latency; the
                                                                  first microbatch crosses every
                                                                  stage, the rest follow at the
                                                                  pace of the slowest)

    minimise T over the contiguous partitions of 0..L-1 into exactly p non-empty stages.

Solution: for a cap τ̂ on the stage time, DP[s][j] = the least Σ τ over partitions of the first j
layers into s stages, each with τ ≤ τ̂ and μ ≤ M; then T(τ̂) = DP[p][L] + (m − 1)·τ̂. The optimum
is attained at τ̂ = the time of one of the O(L²) candidate stages, so the caps are tried in
increasing order from the lower bound max(max_i t[i], Σt/p), stopping once (m − 1)·τ̂ alone
exceeds the best T found. Each DP is O(p·L²) with numpy over the inner index. The predicted
bubble is reported next to the analytic one: (T − m·τ_max)/(m·τ_max) against (p − 1)/m, equal
when the stages are balanced.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InfeasibleError

SCHEDULES = ("1f1b", "gpipe")  # in order of preference on a tie: 1F1B holds fewer microbatches


@dataclass(frozen=True)
class StagePlan:
    bounds: tuple[tuple[int, int], ...]  # per stage: layers [start, end)
    stage_times: tuple[float, ...]  # τ_s per microbatch
    stage_memory: tuple[float, ...]  # μ_s bytes
    step_time: float  # T
    microbatches: int
    schedule: str
    bubble: float  # (T − m·τ_max) / (m·τ_max)
    analytic_bubble: float  # (p − 1) / m

    def to_json(self) -> dict:
        return {"bounds": [list(b) for b in self.bounds], "stage_times_s": list(self.stage_times),
                "stage_memory_bytes": list(self.stage_memory), "step_time_s": self.step_time,
                "microbatches": self.microbatches, "schedule": self.schedule, "bubble": self.bubble,
                "analytic_bubble": self.analytic_bubble}


def _in_flight(schedule: str, s: int, p: int, m: int) -> int:
    return m if schedule == "gpipe" else min(m, p - s)


def solve_stages(t, c, w, a, p: int, m: int, schedule: str = "1f1b", memory_limit: float = float("inf")) -> StagePlan:
    """The optimal contiguous partition of layers into ``p`` stages (see the module docstring)."""
    t, w, a = (np.asarray(x, dtype=float) for x in (t, w, a))
    L = len(t)
    c = np.append(np.asarray(c, dtype=float), 0.0) if L else np.zeros(0)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if not (len(c) == L and len(w) == L and len(a) == L):
        raise ValueError(f"need t, w, a of one length L and c of length L-1; got {len(t)}, {len(c) - 1}, {len(w)}, {len(a)}")
    if p < 1 or m < 1 or p > L:
        raise ValueError(f"need 1 <= p <= number of layers ({L}) and m >= 1; got p={p}, m={m}")
    if (t < 0).any() or (c < 0).any() or (w < 0).any() or (a < 0).any():
        raise ValueError("layer times, transfer times and bytes must be non-negative")

    pt, pw, pa = (np.concatenate([[0.0], np.cumsum(x)]) for x in (t, w, a))
    # seg_time[i, j] for the stage of layers [i, j): Σ t + c[j-1]; inf where j <= i
    i_idx, j_idx = np.meshgrid(np.arange(L + 1), np.arange(L + 1), indexing="ij")
    valid = j_idx > i_idx
    seg_time = np.where(valid, pt[j_idx] - pt[i_idx] + np.where(valid, c[np.maximum(j_idx - 1, 0)], 0.0), np.inf)
    seg_w, seg_a = pw[j_idx] - pw[i_idx], pa[j_idx] - pa[i_idx]

    caps = np.unique(seg_time[np.isfinite(seg_time)])
    caps = caps[caps >= max(t.max(), t.sum() / p) - 1e-15]
    if m == 1:
        caps = caps[-1:]  # T = Σ τ: no cap binds
    best = None
    for cap in caps:
        if best is not None and (m - 1) * cap >= best[0]:
            break  # every larger cap costs more in the (m − 1)·τ̂ term alone
        found = _dp(seg_time, seg_w, seg_a, cap, p, m, L, schedule, memory_limit)
        if found is not None:
            total, bounds = found
            taus = [seg_time[i, j] for i, j in bounds]
            step = total + (m - 1) * max(taus)  # the partition's own max (≤ cap)
            if best is None or step < best[0] - 1e-15:
                best = (step, bounds)
    if best is None:
        need = min(seg_w[0, L] / p, float(np.max(w)))
        raise InfeasibleError(f"no split of {L} layers into {p} pipeline stages fits {memory_limit:.4g} bytes per device "
                              f"with {schedule} and {m} microbatches (the parameters alone need at least {need:.4g} per stage); "
                              "raise pp, lower the microbatch size, or shard more with tp/dp")
    step, bounds = best
    taus = tuple(float(seg_time[i, j]) for i, j in bounds)
    mems = tuple(float(seg_w[i, j] + _in_flight(schedule, s, p, m) * seg_a[i, j]) for s, (i, j) in enumerate(bounds))
    tmax = max(taus)
    return StagePlan(tuple(bounds), taus, mems, float(step), m, schedule,
                     float((step - m * tmax) / (m * tmax)) if tmax > 0 else 0.0, (p - 1) / m)


def _dp(seg_time, seg_w, seg_a, cap, p, m, L, schedule, memory_limit):
    """Least Σ τ over partitions into p stages with τ ≤ cap and μ ≤ M; (total, bounds) or None."""
    inf = np.inf
    cost = np.full((p + 1, L + 1), inf)
    back = np.zeros((p + 1, L + 1), dtype=int)
    cost[0, 0] = 0.0
    for s in range(1, p + 1):
        f = _in_flight(schedule, s - 1, p, m)
        ok = (seg_time <= cap) & (seg_w + f * seg_a <= memory_limit)  # [i, j]: stage s-1 = layers [i, j)
        cand = np.where(ok, cost[s - 1][:, None] + seg_time, inf)  # over i, for each j
        back[s] = np.argmin(cand, axis=0)
        cost[s] = cand[back[s], np.arange(L + 1)]
    if not np.isfinite(cost[p, L]):
        return None
    bounds, j = [], L
    for s in range(p, 0, -1):
        i = int(back[s, j])
        bounds.append((i, j))
        j = i
    return float(cost[p, L]), bounds[::-1]


def choose_pipeline(per_m: dict[int, tuple], p: int, schedules=SCHEDULES, memory_limit: float = float("inf")) -> StagePlan:
    """The best (microbatches, schedule, stages): ``per_m[m] = (t, c, w, a)`` are the per-microbatch
    arrays when the batch is cut into m microbatches (the caller scales them)."""
    best, why = None, []
    for m, (t, c, w, a) in sorted(per_m.items()):
        for schedule in schedules:
            try:
                plan = solve_stages(t, c, w, a, p, m, schedule, memory_limit)
            except InfeasibleError as e:
                why.append(f"m={m} {schedule}: {e}")
                continue
            if best is None or plan.step_time < best.step_time - 1e-15:
                best = plan
    if best is None:
        raise InfeasibleError("no microbatch count and schedule fits: " + "; ".join(why[:3]))
    return best
