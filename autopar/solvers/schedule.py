"""Pipeline schedules: the order each rank runs its passes in, and an event-driven simulation of it.

Pure Python in, a timeline out (this module never sees torch). p ranks, m microbatches, v stages per
rank (``v > 1`` only for the interleaved schedule), S = p·v global stages s = 0..S-1. Rank r holds
the stages r, r + p, r + 2p, ... (the looped layout of Megatron-LM); with v = 1, stage s = rank s.

Passes, per stage s and microbatch i, with per-microbatch times f_s, b_s, w_s:

    F(s, i)  forward                        f_s
    B(s, i)  backward: the full backward    b_s + w_s   (gpipe, 1f1b, interleaved-1f1b)
                       the input gradient   b_s         (zb-h1)
    W(s, i)  the weight gradient            w_s         (zb-h1 only)

Dependencies, with c the time to move an activation or its gradient between two ranks (0 when
both stages sit on one rank) and e(·) a pass's end time:

    start F(s, i) ≥ e(F(s−1, i)) + c                      (s > 0)
    start B(s, i) ≥ e(F(s, i)),  start B(s, i) ≥ e(B(s+1, i)) + c   (s < S − 1)
    start W(s, i) ≥ e(B(s, i))

and each rank runs its own list of passes in order, one at a time:

    start(a_k) = max(e(a_{k−1}), the dependencies above)         (a_k the k-th pass of the rank)

The orders (``rank_actions``):

    gpipe             every F, then every B, both in microbatch order (Huang et al. 2019).
    1f1b              w_r = min(p − r − 1, m) warm-up F; then F, B alternately; then the last B
                      (PipeDream-flush, the Megatron-LM default). At most min(m, p − r) microbatches
                      are in flight on rank r (forward done, backward not).
    interleaved-1f1b  Megatron-LM's interleaved schedule (Narayanan et al., SC21). The k-th forward
                      of a rank runs chunk (k // p) mod v on microbatch p·(k // (p·v)) + k mod p, the
                      k-th backward chunk v − 1 − (k // p) mod v likewise; w_r = min(2(p − r − 1) +
                      (v − 1)·p, m·v) warm-up forwards, then F, B alternately, then the last B.
                      Needs m mod p = 0.
    zb-h1             the Zero Bubble paper's ZB-H1 (Qi et al., arXiv 2401.10241, as PyTorch's
                      ZB1P builds it): 1F1B's order of F and B, the backward split into B and W; rank
                      r defers its first r weight passes, then runs one W after each B, and runs the
                      deferred ones last. The deferred W fill the cool-down bubbles. In flight
                      (forward done, W not) on rank r: at most min(m, p), 1F1B's peak on rank 0.

The simulation is exact for these rules: it places each pass at the earliest start they allow.
Its figures of merit:

    makespan  T = max e(·)
    busy      β_r = Σ durations of the passes of rank r
    bubble    (T − max_r β_r) / max_r β_r

and ``analytic_bubble``, for equal stages and c = 0: (p − 1)/m for gpipe and 1f1b, (p − 1)/(m·v)
for interleaved-1f1b; for zb-h1 the 1F1B value, an upper bound (ZB-H1's is about
(p − 1)(f + b − w)/(m(f + b + w)) when the three are near equal).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1")

Action = tuple[str, int, int]  # (kind "F" | "B" | "W", microbatch, global stage)


@dataclass(frozen=True)
class Event:
    """One pass as simulated: ``kind`` F, B or W of ``microbatch`` on global ``stage``, run by ``rank``."""

    rank: int
    stage: int
    kind: str
    microbatch: int
    start: float
    end: float

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}@s{self.stage} [{self.start:.6g}, {self.end:.6g})"


@dataclass(frozen=True)
class Timeline:
    """A simulated schedule: every pass of every rank with its start and end time."""

    schedule: str
    p: int
    m: int
    v: int
    events: tuple[Event, ...]
    makespan: float  # T
    bubble: float  # (T − max_r β_r) / max_r β_r

    def rank_events(self, rank: int) -> tuple[Event, ...]:
        """The passes of ``rank`` in the order it runs them."""
        return tuple(e for e in self.events if e.rank == rank)

    def busy(self, rank: int) -> float:
        """β_r: the time ``rank`` spends computing."""
        return sum(e.end - e.start for e in self.rank_events(rank))

    def peak_in_flight(self, rank: int) -> int:
        """The most (stage, microbatch) pairs of ``rank`` whose forward is done and whose activations
        are still held: until the B for gpipe, 1f1b and interleaved-1f1b, until the W for zb-h1."""
        release = "W" if self.schedule == "zb-h1" else "B"
        held = peak = 0
        for e in self.rank_events(rank):
            held += 1 if e.kind == "F" else -1 if e.kind == release else 0
            peak = max(peak, held)
        return peak


def analytic_bubble(schedule: str, p: int, m: int, v: int = 1) -> float:
    """(p − 1)/m, or (p − 1)/(m·v) for interleaved-1f1b; for zb-h1 the 1F1B value, an upper bound."""
    _check(schedule, p, m, v)
    return (p - 1) / (m * v) if schedule == "interleaved-1f1b" else (p - 1) / m


def _check(schedule: str, p: int, m: int, v: int) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    bad = [f"{n}={x!r}" for n, x in (("p", p), ("m", m), ("v", v)) if not isinstance(x, int) or x < 1]
    if bad:
        raise ValueError(f"need integers p >= 1 ranks, m >= 1 microbatches and v >= 1 stages per rank; got {', '.join(bad)}")
    if schedule != "interleaved-1f1b" and v != 1:
        raise ValueError(f"{schedule} runs one stage per rank; got v={v} (only interleaved-1f1b takes v > 1)")
    if schedule == "interleaved-1f1b" and m % p:
        raise ValueError(f"interleaved-1f1b needs the microbatch count to be a multiple of the ranks; "
                         f"got m={m}, p={p} (m mod p = {m % p})")


def rank_actions(schedule: str, p: int, m: int, v: int = 1) -> list[list[Action]]:
    """Per rank r = 0..p-1, its passes ``(kind, microbatch, stage)`` in the order it runs them."""
    _check(schedule, p, m, v)
    if schedule == "gpipe":
        return [[("F", i, r) for i in range(m)] + [("B", i, r) for i in range(m)] for r in range(p)]
    if schedule == "interleaved-1f1b":
        return [_interleaved(p, m, v, r) for r in range(p)]
    out = []
    for r in range(p):
        warm = min(p - r - 1, m)
        acts = [("F", i, r) for i in range(warm)]
        for k in range(m - warm):
            acts += [("F", warm + k, r), ("B", k, r)]
        acts += [("B", i, r) for i in range(m - warm, m)]
        if schedule == "zb-h1":
            acts = _defer_weights(acts, deferred=r)
        out.append(acts)
    return out


def _defer_weights(acts: list[Action], deferred: int) -> list[Action]:
    """Split each B into B then W, holding back the first ``deferred`` W: after that, one W (the
    oldest pending) follows each B, and those still pending run at the end."""
    out, pending, seen = [], [], 0
    for a in acts:
        out.append(a)
        if a[0] == "B":
            pending.append(("W", a[1], a[2]))
            seen += 1
            if seen > deferred:
                out.append(pending.pop(0))
    return out + pending


def _interleaved(p: int, m: int, v: int, r: int) -> list[Action]:
    total = m * v
    warm = min(2 * (p - r - 1) + (v - 1) * p, total)

    def forward(k: int) -> Action:
        chunk = (k // p) % v
        return ("F", p * (k // (p * v)) + k % p, chunk * p + r)

    def backward(k: int) -> Action:
        chunk = v - 1 - (k // p) % v
        return ("B", p * (k // (p * v)) + k % p, chunk * p + r)

    acts = [forward(k) for k in range(warm)]
    for k in range(total - warm):
        acts += [forward(warm + k), backward(k)]
    return acts + [backward(k) for k in range(total - warm, total)]


def _per_stage(name: str, x, n: int) -> list[float]:
    vals = [float(x)] * n if isinstance(x, numbers.Real) else [float(t) for t in x]
    if len(vals) != n:
        raise ValueError(f"{name} needs one time per global stage ({n}); got {len(vals)}")
    bad = [f"{name}[{i}]={t!r}" for i, t in enumerate(vals) if not (math.isfinite(t) and t >= 0)]
    if bad:
        raise ValueError(f"pass times must be finite and non-negative; got {', '.join(bad)}")
    return vals


def simulate(schedule: str, p: int, m: int, v: int = 1, *, f: float | Sequence[float], b: float | Sequence[float],
             w: float | Sequence[float] | None = None, c: float = 0.0) -> Timeline:
    """Run ``rank_actions(schedule, p, m, v)`` against the dependencies of the module docstring.

    ``f``, ``b``, ``w``: per-microbatch times, one number or one per global stage (p·v). For every
    schedule but zb-h1 the weight gradient is part of the backward (B takes b + w). ``c``: the
    transfer time between two ranks. Raises ValueError on bad input, or if the order deadlocks.
    """
    order = rank_actions(schedule, p, m, v)
    n = p * v
    fs, bs = _per_stage("f", f, n), _per_stage("b", b, n)
    ws = _per_stage("w", 0.0 if w is None else w, n)
    if not (math.isfinite(c) and c >= 0):
        raise ValueError(f"transfer time c must be finite and non-negative; got {c!r}")
    split = schedule == "zb-h1"
    dur = {"F": fs, "B": bs if split else [x + y for x, y in zip(bs, ws)], "W": ws}
    events = _run(order, dur, c, p, n)
    makespan = max((e.end for e in events), default=0.0)
    busiest = max(sum(e.end - e.start for e in events if e.rank == r) for r in range(p))
    bubble = (makespan - busiest) / busiest if busiest > 0 else 0.0
    return Timeline(schedule, p, m, v, tuple(events), makespan, bubble)


def _run(order: list[list[Action]], dur: dict[str, list[float]], c: float, p: int, n: int) -> list[Event]:
    """Place every pass at the earliest start the rules allow (module docstring); events by rank,
    each rank's in its own order. ValueError if some rank can never run its next pass."""

    def hop(s: int, t: int) -> float:  # the transfer between stages s and t
        return 0.0 if s % p == t % p else c

    done: dict[Action, float] = {}
    free, nxt = [0.0] * p, [0] * p
    per_rank: list[list[Event]] = [[] for _ in range(p)]
    progress = True
    while progress:
        progress = False
        for r in range(p):
            while nxt[r] < len(order[r]):
                kind, i, s = order[r][nxt[r]]
                if kind == "F":
                    deps = [(("F", i, s - 1), hop(s - 1, s))] if s > 0 else []
                elif kind == "B":
                    deps = [(("F", i, s), 0.0)] + ([(("B", i, s + 1), hop(s + 1, s))] if s < n - 1 else [])
                else:
                    deps = [(("B", i, s), 0.0)]
                if any(d not in done for d, _ in deps):
                    break
                start = max([free[r]] + [done[d] + lag for d, lag in deps])
                end = start + dur[kind][s]
                done[(kind, i, s)] = free[r] = end
                per_rank[r].append(Event(r, s, kind, i, start, end))
                nxt[r] += 1
                progress = True
    stuck = [f"rank {r} waits at {a[k][0]}{a[k][1]} of stage {a[k][2]}" for r, (k, a) in enumerate(zip(nxt, order)) if k < len(a)]
    if stuck:
        raise ValueError(f"the pipeline order deadlocks: {'; '.join(stuck)}")
    return [e for evs in per_rank for e in evs]
