"""Pipeline schedules: the simulated timeline against the closed forms, the dependencies and memory."""

from __future__ import annotations

import random

import pytest

from autopar.solvers.schedule import SCHEDULES, _run, analytic_bubble, rank_actions, simulate


def _cases(schedule):
    for p in (1, 2, 3, 4, 8):
        for m in (1, 2, 3, 4, 8, 12):
            for v in ((1, 2, 3) if schedule == "interleaved-1f1b" else (1,)):
                if schedule != "interleaved-1f1b" or m % p == 0:
                    yield p, m, v


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_equal_stages_take_m_plus_p_minus_1_slots(schedule):
    f, b = 1.5, 2.75
    for p, m, _ in _cases(schedule):
        t = simulate(schedule, p, m, f=f, b=b)
        assert t.makespan == pytest.approx((m + p - 1) * (f + b)), (p, m)
        assert t.bubble == pytest.approx((p - 1) / m) == pytest.approx(analytic_bubble(schedule, p, m))


def test_interleaving_divides_the_bubble_by_v():
    f, b = 1.0, 2.0  # per stage of the unsplit model; each of the v chunks takes 1/v of it
    for p, m, v in _cases("interleaved-1f1b"):
        t = simulate("interleaved-1f1b", p, m, v, f=f / v, b=b / v)
        assert t.bubble == pytest.approx((p - 1) / (m * v)), (p, m, v)
        assert t.makespan == pytest.approx(m * (f + b) + (p - 1) * (f + b) / v), (p, m, v)
        assert analytic_bubble("interleaved-1f1b", p, m, v) == pytest.approx((p - 1) / (m * v))
    # more chunks, less bubble, for one model
    makespans = [simulate("interleaved-1f1b", 4, 8, v, f=1 / v, b=2 / v).makespan for v in (1, 2, 4)]
    assert makespans[0] > makespans[1] > makespans[2]


def test_zero_bubble_h1_beats_1f1b_when_the_weight_gradient_takes_time():
    for p, m, _ in _cases("zb-h1"):
        if p == 1:
            continue
        for f, b, w in ((1.0, 1.0, 1.0), (1.0, 1.2, 0.8), (0.5, 0.7, 0.1)):
            zb = simulate("zb-h1", p, m, f=f, b=b, w=w)
            one = simulate("1f1b", p, m, f=f, b=b, w=w)
            assert zb.makespan < one.makespan - 1e-12, (p, m, f, b, w)
            assert zb.bubble <= analytic_bubble("zb-h1", p, m) + 1e-12  # the documented upper bound
        if m >= p:  # the paper's bubble for equal passes: (p - 1)(f + b - w)
            zb = simulate("zb-h1", p, m, f=1.0, b=1.0, w=1.0)
            assert zb.makespan == pytest.approx(3 * m + (p - 1))
    # with no weight-gradient time there is nothing to move into the bubbles
    assert simulate("zb-h1", 4, 8, f=1, b=2, w=0).makespan == pytest.approx(simulate("1f1b", 4, 8, f=1, b=2).makespan)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_pass_runs_once_after_its_inputs(schedule):
    rng = random.Random(0)
    for p, m, v in _cases(schedule):
        n, c = p * v, rng.choice([0.0, 0.3])
        f, b, w = ([rng.uniform(0.1, 2.0) for _ in range(n)] for _ in range(3))
        t = simulate(schedule, p, m, v, f=f, b=b, w=w, c=c)
        kinds = "FBW" if schedule == "zb-h1" else "FB"
        keys = [(e.kind, e.microbatch, e.stage) for e in t.events]
        assert sorted(keys) == sorted((k, i, s) for k in kinds for i in range(m) for s in range(n))
        assert sum(len(a) for a in rank_actions(schedule, p, m, v)) == len(keys)
        ev = {(e.kind, e.microbatch, e.stage): e for e in t.events}
        eps = 1e-9
        for e in t.events:
            k, i, s = e.kind, e.microbatch, e.stage
            assert e.rank == s % p  # the looped layout
            lag = 0.0 if p == 1 else c
            full = b[s] if schedule == "zb-h1" else b[s] + w[s]
            assert e.end - e.start == pytest.approx({"F": f[s], "B": full, "W": w[s]}[k])
            if k == "F" and s > 0:
                assert e.start >= ev["F", i, s - 1].end + lag - eps
            if k == "B":
                assert e.start >= ev["F", i, s].end - eps
                if s < n - 1:
                    assert e.start >= ev["B", i, s + 1].end + lag - eps
            if k == "W":
                assert e.start >= ev["B", i, s].end - eps
        for r in range(p):  # one pass at a time, in the rank's order
            mine = t.rank_events(r)
            assert [(e.kind, e.microbatch, e.stage) for e in mine] == rank_actions(schedule, p, m, v)[r]
            assert all(x.end <= y.start + eps for x, y in zip(mine, mine[1:]))
        assert t.makespan == pytest.approx(max(e.end for e in t.events))
        busiest = max(t.busy(r) for r in range(p))
        assert t.bubble == pytest.approx((t.makespan - busiest) / busiest)


def _peak(events, release):
    held = peak = 0
    for e in events:
        held += (e.kind == "F") - (e.kind == release)
        peak = max(peak, held)
    return peak


def test_in_flight_microbatches():
    for p, m, _ in _cases("1f1b"):
        one, gp = simulate("1f1b", p, m, f=1, b=2), simulate("gpipe", p, m, f=1, b=2)
        zb = simulate("zb-h1", p, m, f=1, b=1, w=1)
        for r in range(p):
            assert _peak(one.rank_events(r), "B") == one.peak_in_flight(r) == min(m, p - r), (p, m, r)
            assert _peak(gp.rank_events(r), "B") == gp.peak_in_flight(r) == m
            # ZB-H1 holds activations until W, never more of them than 1F1B's first rank does
            assert _peak(zb.rank_events(r), "W") == zb.peak_in_flight(r) <= min(m, p)
        assert max(zb.peak_in_flight(r) for r in range(p)) == max(one.peak_in_flight(r) for r in range(p))
    for p, m, v in _cases("interleaved-1f1b"):  # Megatron's warm-up, 2(p − r − 1) + (v − 1)p, plus one
        t = simulate("interleaved-1f1b", p, m, v, f=1 / v, b=2 / v)
        assert [t.peak_in_flight(r) for r in range(p)] == [min(2 * (p - r - 1) + (v - 1) * p + 1, m * v)
                                                         for r in range(p)], (p, m, v)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="p=0"):
        rank_actions("1f1b", 0, 4)
    with pytest.raises(ValueError, match="m=0"):
        simulate("gpipe", 2, 0, f=1, b=1)
    with pytest.raises(ValueError, match="unknown pipeline schedule 'pipedream'"):
        simulate("pipedream", 2, 4, f=1, b=1)
    with pytest.raises(ValueError, match="multiple of the ranks; got m=6, p=4"):
        simulate("interleaved-1f1b", 4, 6, 2, f=1, b=1)
    with pytest.raises(ValueError, match="only interleaved-1f1b takes v > 1"):
        rank_actions("1f1b", 2, 4, v=2)
    with pytest.raises(ValueError, match="one time per global stage \\(4\\); got 2"):
        simulate("interleaved-1f1b", 2, 4, 2, f=[1, 1], b=1)
    with pytest.raises(ValueError, match=r"b\[1\]=-1.0"):
        simulate("1f1b", 2, 4, f=1, b=[1, -1])
    with pytest.raises(ValueError, match="transfer time"):
        simulate("1f1b", 2, 4, f=1, b=1, c=float("nan"))


def test_an_impossible_order_is_a_deadlock_not_a_hang():
    dur = {"F": [1.0, 1.0], "B": [1.0, 1.0], "W": [0.0, 0.0]}
    order = [[("F", 0, 0), ("B", 0, 0), ("F", 1, 0), ("B", 1, 0)],
             [("F", 1, 1), ("B", 1, 1), ("F", 0, 1), ("B", 0, 1)]]  # rank 1 wants microbatch 1 first
    with pytest.raises(ValueError, match="deadlocks: rank 0 waits at B0 of stage 0; rank 1 waits at F1 of stage 1"):
        _run(order, dur, 0.0, 2, 2)
