"""Expert placement (MoETuner balance + ExFlow affinity): pricing by hand, the solver against the
contiguous default and against brute force, shard/permutation invariants, JSON, bad input."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from autopar.errors import AutoparError
from autopar.solvers.expert_placement import (Placement, RoutingStats, contiguous, predict, round_robin,
                                              solve_placement, synthetic_routing)

L, E, G = 8, 64, 8


@pytest.fixture(scope="module")
def trace() -> RoutingStats:
    return synthetic_routing(layers=L, experts=E, top_k=2, seed=0)


@pytest.fixture(scope="module")
def solved(trace) -> Placement:
    return solve_placement(trace, G, time_limit_s=8.0)


def _objective(stats: RoutingStats, pl: Placement, w: float) -> float:
    """The documented objective, from predict(): cross share + w · mean over layers of max/mean load."""
    p = predict(stats, pl)
    means = stats.counts.sum(axis=1) / pl.devices
    return p["cross_device_fraction"] + w * float(np.mean(np.asarray(p["per_layer_max_load"]) / means))


def _hand() -> RoutingStats:
    """2 layers, 4 experts, top-1, 9 tokens; counts are the row / column sums of t."""
    t = np.array([[3, 0, 1, 0],
                  [0, 0, 0, 1],
                  [0, 2, 0, 0],
                  [0, 0, 2, 0]])
    return RoutingStats(np.stack([t.sum(axis=1), t.sum(axis=0)]), t[None], tokens=9, top_k=1)


def test_solver_beats_contiguous_on_skewed_affine_trace(trace, solved):
    base, got = predict(trace, contiguous(L, E, G)), predict(trace, solved)
    cross_cut = 1 - got["cross_device_tokens"] / base["cross_device_tokens"]
    load_cut = 1 - got["max_device_load"] / base["max_device_load"]
    assert cross_cut >= 0.30, (base, got)
    assert load_cut >= 0.20, (base, got)
    assert got["total_transitions"] == base["total_transitions"] == (L - 1) * trace.tokens * trace.top_k ** 2
    assert got["mean_device_load"] == pytest.approx(trace.tokens * trace.top_k / G)


def test_solver_load_near_per_layer_bound(trace, solved):
    """No placement with E/G experts a device beats max(mean, c_max + the E/G - 1 smallest) per layer."""
    per_layer = predict(trace, solved)["per_layer_max_load"]
    for l, c in enumerate(trace.counts):
        s = np.sort(c)
        bound = max(c.sum() / G, s[-1] + s[:E // G - 1].sum())
        assert bound <= per_layer[l] <= 1.04 * bound, (l, per_layer[l], bound)  # greedy alone: 1.10


def test_equal_shards_and_permutation(solved):
    for l in range(L):
        perm = solved.permutation(l)
        assert sorted(perm) == list(range(E))
        inv = solved.inverse_permutation(l)
        for g in range(G):
            mine = solved.experts_of(l, g)
            assert len(mine) == E // G and mine == sorted(mine)
            assert perm[g * (E // G):(g + 1) * (E // G)] == mine  # contiguous equal shards of w[perm]
            assert all(solved.assignment[l][e] == g and inv[e] // (E // G) == g for e in mine)
        assert [perm[inv[e]] for e in range(E)] == list(range(E))
    assert any(solved.permutation(l) != list(range(E)) for l in range(L))  # the plan is not the identity


def test_permutation_by_hand():
    pl = Placement(2, [[1, 0, 0, 1], [0, 1, 1, 0]])
    assert pl.experts_of(0, 0) == [1, 2] and pl.experts_of(0, 1) == [0, 3]
    assert pl.permutation(0) == [1, 2, 0, 3] and pl.permutation(1) == [0, 3, 1, 2]
    assert pl.inverse_permutation(0) == [2, 0, 1, 3]
    w = np.arange(4)[:, None] * 10  # row e of the expert weight belongs to expert e
    shards = np.split(w[pl.permutation(0)], 2)
    assert [list(s[:, 0] // 10) for s in shards] == [pl.experts_of(0, 0), pl.experts_of(0, 1)]


def test_baselines():
    assert contiguous(2, 8, 4).assignment == [[0, 0, 1, 1, 2, 2, 3, 3]] * 2
    assert round_robin(1, 8, 4).assignment == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert contiguous(3, 8, 4).permutation(2) == list(range(8))


def test_predict_by_hand():
    st = _hand()
    # layer 0: experts {0, 2} on device 0, {1, 3} on 1; layer 1: {1, 2} on 0, {0, 3} on 1
    p = predict(st, Placement(2, [[0, 1, 0, 1], [1, 0, 0, 1]]))
    # pairs: 0->0 (3, cross), 0->2 (1, kept), 1->3 (1, kept), 2->1 (2, kept), 3->2 (2, cross)
    assert p["cross_device_tokens"] == 5 and p["total_transitions"] == 9
    assert p["cross_device_fraction"] == pytest.approx(5 / 9)
    # loads: layer 0 counts [4, 1, 2, 2] -> [6, 3]; layer 1 counts [3, 2, 3, 1] -> [5, 4]
    assert p["per_layer_max_load"] == [6, 5] and p["max_device_load"] == 6
    assert p["mean_device_load"] == pytest.approx(4.5)
    c = predict(st, contiguous(2, 4, 2))  # 0->2, 1->3, 2->1 cross
    assert (c["cross_device_tokens"], c["per_layer_max_load"]) == (4, [5, 5])


def test_matches_brute_force_on_small_instances():
    rows = [r for r in itertools.product(range(2), repeat=6) if sum(r) == 3]
    for seed, w in [(0, 0.3), (5, 1.0), (2, 3.0)]:
        st = synthetic_routing(layers=3, experts=6, tokens=400, top_k=2, skew=1.0, affinity=0.7, seed=seed)
        best = min(_objective(st, Placement(2, list(a)), w) for a in itertools.product(rows, repeat=3))
        got = _objective(st, solve_placement(st, 2, balance_weight=w, time_limit_s=5.0), w)
        assert got == pytest.approx(best, abs=1e-9), (seed, w)


def test_balance_weight_trades_traffic_for_balance():
    st = synthetic_routing(layers=3, experts=8, tokens=2000, skew=1.2, affinity=0.9, seed=3)
    traffic = predict(st, solve_placement(st, 2, balance_weight=0.01, time_limit_s=5.0))
    balance = predict(st, solve_placement(st, 2, balance_weight=100.0, time_limit_s=5.0))
    assert traffic["cross_device_tokens"] <= balance["cross_device_tokens"]
    assert sum(balance["per_layer_max_load"]) <= sum(traffic["per_layer_max_load"])
    assert (traffic["cross_device_tokens"], traffic["per_layer_max_load"]) != \
        (balance["cross_device_tokens"], balance["per_layer_max_load"])


def test_one_device_is_trivial(trace):
    pl = solve_placement(trace, 1)
    assert pl.assignment == [[0] * E] * L and pl.permutation(3) == list(range(E))
    assert predict(trace, pl)["cross_device_tokens"] == 0


def test_synthetic_trace_is_consistent_and_affine(trace):
    k = trace.top_k
    assert (trace.counts.sum(axis=1) == trace.tokens * k).all()
    assert (trace.transitions.sum(axis=2) == k * trace.counts[:-1]).all()  # rows: every pick of layer l
    assert (trace.transitions.sum(axis=1) == k * trace.counts[1:]).all()  # columns: every pick of layer l+1
    top_share = trace.transitions.max(axis=2).sum() / trace.transitions.sum()
    flat = synthetic_routing(layers=L, experts=E, affinity=0.0, seed=0)
    assert top_share > 0.4 > 0.1 > flat.transitions.max(axis=2).sum() / flat.transitions.sum()
    assert trace.counts.max() > 2 * trace.counts.mean()  # skewed popularity


def test_json_round_trip(tmp_path, trace, solved):
    path = tmp_path / "routing.json"
    trace.save(path)
    doc = json.loads(path.read_text())
    assert doc["version"] == 1 and isinstance(doc["counts"][0][0], int)
    back = RoutingStats.load(path)
    assert np.array_equal(back.counts, trace.counts) and np.array_equal(back.transitions, trace.transitions)
    assert (back.tokens, back.top_k) == (trace.tokens, trace.top_k)
    one = RoutingStats([[1, 2]], np.zeros((0, 2, 2)), tokens=3, top_k=1)
    assert RoutingStats.from_json(json.loads(json.dumps(one.to_json()))).transitions.shape == (0, 2, 2)
    pl = Placement.from_json(json.loads(json.dumps(solved.to_json())))
    assert pl == solved and pl.permutation(5) == solved.permutation(5)


def test_bad_input():
    st = synthetic_routing(layers=2, experts=6, tokens=50, seed=0)
    with pytest.raises(AutoparError, match="6 experts cannot be split evenly over 4 devices"):
        solve_placement(st, 4)
    with pytest.raises(AutoparError, match="evenly"):
        contiguous(2, 6, 4)
    with pytest.raises(AutoparError, match=r"transitions must have shape \[layers-1, experts, experts\]"):
        RoutingStats(np.ones((3, 4)), np.ones((3, 4, 4)), tokens=1, top_k=1)
    with pytest.raises(AutoparError, match="counts must have shape"):
        RoutingStats(np.ones(4), np.ones((0, 4, 4)), tokens=1, top_k=1)
    with pytest.raises(AutoparError, match="non-negative"):
        RoutingStats([[1, -1]], np.zeros((0, 2, 2)), tokens=1, top_k=1)
    with pytest.raises(AutoparError, match="top_k"):
        RoutingStats([[1, 1]], np.zeros((0, 2, 2)), tokens=1, top_k=0)
    with pytest.raises(AutoparError, match="exactly 2 experts"):
        Placement(2, [[0, 0, 0, 1]])
    with pytest.raises(AutoparError, match="exactly 2 experts"):
        Placement(2, [[0, 1, 2, 3]])
    with pytest.raises(AutoparError, match="layers x experts"):
        predict(st, contiguous(3, 6, 2))
    with pytest.raises(AutoparError, match="version-1 RoutingStats"):
        RoutingStats.from_json({**st.to_json(), "version": 2})
    with pytest.raises(AutoparError, match="malformed"):
        RoutingStats.from_json({"version": 1, "counts": [[1]]})
    with pytest.raises(AutoparError, match="version-1 Placement"):
        Placement.from_json({"devices": 2, "assignment": [[0, 1]]})
