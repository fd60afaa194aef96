"""Pipeline stage partitioning: exact against brute force, memory per schedule, balance by cost."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from autopar.errors import InfeasibleError
from autopar.solvers.inter_op import choose_pipeline, solve_stages


def _brute(t, c, w, a, p, m, schedule, limit):
    L, best = len(t), None
    for cuts in itertools.combinations(range(1, L), p - 1):
        bounds = list(zip((0,) + cuts, cuts + (L,)))
        taus = [sum(t[i:j]) + (c[j - 1] if j < L else 0.0) for i, j in bounds]
        mems = [sum(w[i:j]) + (m if schedule == "gpipe" else min(m, p - s)) * sum(a[i:j])
                for s, (i, j) in enumerate(bounds)]
        if max(mems) > limit:
            continue
        step = sum(taus) + (m - 1) * max(taus)
        best = step if best is None else min(best, step)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_dp_is_exact_against_every_partition(seed):
    rng = np.random.default_rng(seed)
    L, p, m = int(rng.integers(3, 9)), int(rng.integers(1, 4)), int(rng.integers(1, 6))
    p = min(p, L)
    t, c = rng.uniform(0.1, 2.0, L), rng.uniform(0.0, 0.5, L - 1)
    w, a = rng.uniform(1, 10, L), rng.uniform(0, 3, L)
    schedule = ("gpipe", "1f1b")[seed % 2]
    limit = float(np.sort(w)[-1] * 2 + 5) if seed % 3 else float("inf")
    expect = _brute(t, c, w, a, p, m, schedule, limit)
    if expect is None:
        with pytest.raises(InfeasibleError, match="pipeline stages"):
            solve_stages(t, c, w, a, p, m, schedule, limit)
        return
    got = solve_stages(t, c, w, a, p, m, schedule, limit)
    assert got.step_time == pytest.approx(expect, rel=1e-9)
    assert len(got.bounds) == p and got.bounds[0][0] == 0 and got.bounds[-1][1] == L
    assert all(i < j for i, j in got.bounds) and all(x[1] == y[0] for x, y in zip(got.bounds, got.bounds[1:]))
    assert max(got.stage_memory) <= limit


def test_unequal_layers_are_balanced_by_cost_not_by_count():
    t = [4.0, 4.0, 4.0, 4.0, 1.0, 1.0, 1.0, 1.0]  # a wide MLP in the first half of the layers
    zeros = [0.0] * 8
    plan = solve_stages(t, zeros[:-1], zeros, zeros, p=2, m=8)
    equal_count_max = max(sum(t[:4]), sum(t[4:]))  # 16: four wide layers on one stage
    assert max(plan.stage_times) == 12.0 < equal_count_max  # the best a contiguous split can do
    assert plan.step_time == pytest.approx(20 + 7 * 12) and plan.analytic_bubble == pytest.approx(1 / 8)


def test_balanced_stages_have_the_analytic_bubble():
    plan = solve_stages([1.0] * 8, [0.0] * 7, [0.0] * 8, [0.0] * 8, p=4, m=6)
    assert plan.bubble == pytest.approx(plan.analytic_bubble) and plan.analytic_bubble == pytest.approx(3 / 6)
    assert plan.step_time == pytest.approx((6 + 3) * 2.0)


def test_1f1b_fits_where_gpipe_runs_out_of_memory():
    t, c, w, a = [1.0] * 4, [0.0] * 3, [1.0] * 4, [1.0] * 4
    # p=2, m=8: GPipe holds 8 microbatches of 2 layers (2 + 16 bytes); 1F1B at most 2 (2 + 4)
    assert solve_stages(t, c, w, a, 2, 8, "1f1b", memory_limit=6.0).stage_memory == (6.0, 4.0)
    with pytest.raises(InfeasibleError, match="raise pp"):
        solve_stages(t, c, w, a, 2, 8, "gpipe", memory_limit=6.0)


def test_choose_pipeline_trades_bubble_against_per_microbatch_overhead():
    L = 8
    def arrays(m):  # work that splits over microbatches plus a fixed cost per microbatch and layer
        return [16.0 / m + 1.0] * L, [0.0] * (L - 1), [0.0] * L, [1.0 / m] * L
    best = choose_pipeline({m: arrays(m) for m in (1, 2, 4, 8, 16)}, p=4)
    times = {m: solve_stages(*arrays(m), 4, m).step_time for m in (1, 2, 4, 8, 16)}
    assert best.step_time == min(times.values()) and best.microbatches == min(times, key=times.get)
    assert 1 < best.microbatches < 16  # neither extreme: the bubble and the overhead both count


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="1 <= p"):
        solve_stages([1.0, 1.0], [0.0], [0, 0], [0, 0], p=3, m=1)
    with pytest.raises(ValueError, match="schedule"):
        solve_stages([1.0], [], [0], [0], p=1, m=1, schedule="zb")
    with pytest.raises(ValueError, match="one length"):
        solve_stages([1.0, 2.0], [0.0], [0], [0, 0], p=1, m=1)
