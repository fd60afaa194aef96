"""plan_batch / the FlexSP-style SP-group solver: validity, optimality on hand-checked cases, bounds, errors."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

import autopar
from autopar.batching import ModelDims, seq_cost
from autopar.cost_models.hardware import load_hardware
from autopar.errors import AutoparError, InfeasibleError
from autopar.solvers.seq_batch import SeqCost, degrees, solve, static_plan


def _toy(**kw) -> SeqCost:
    """1 s per token on one device; d = 2 pays 0.5 s/token of all-to-all, d = 4 (two nodes) 1 s/token."""
    base = dict(alpha1=0.0, alpha2=1.0, a2a_bytes_per_token=1.0, a2a_per_step=0, bw_intra=1.0, bw_inter=0.5,
                lat_intra=0.0, lat_inter=0.0, devices_per_node=2, act_bytes_per_token=1.0, state_bytes=0.0,
                memory_bytes=3.0, max_degree=4)
    return SeqCost(**{**base, **kw})


def _lengths(n: int, seed: int = 0, median: float = 2000.0, sigma: float = 1.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), 1, 131072).astype(np.int64)


def _check_valid(plan, lengths, cost: SeqCost, n: int) -> None:
    """Every sequence exactly once, devices within n, groups aligned and within memory, times as priced."""
    seen = sorted(k for g in plan.groups for k in g.sequences)
    assert seen == list(range(len(lengths)))
    first = 0
    for g in plan.groups:
        assert g.first_device == first and g.first_device % g.size == 0 and g.size in degrees(cost, n)
        if g.size <= cost.devices_per_node:  # a group of one node never spans two
            assert g.first_device // cost.devices_per_node == (first + g.size - 1) // cost.devices_per_node
        toks = int(np.sum(np.asarray(lengths)[list(g.sequences)]))
        assert cost.act_bytes_per_token * toks / g.size + cost.state_bytes <= cost.memory_bytes
        assert g.time_s == pytest.approx(cost.time(g.size, np.asarray(lengths)[list(g.sequences)]))
        first += g.size
    assert first <= n
    assert plan.max_time_s == pytest.approx(max(g.time_s for g in plan.groups))
    assert plan.lower_bound_s <= plan.max_time_s * (1 + 1e-9) and plan.max_time_s <= plan.static_time_s


def test_toy_cost_is_what_the_docstring_says():
    c = _toy()
    assert c.time(1, [3]) == 3.0  # no all-to-all on one device
    assert c.time(2, [4]) == pytest.approx((4 + 4 * (1 / 2) / 1.0) / 2)  # β_2 = (2−1)/(2·B_intra) = 0.5
    assert c.time(4, [4]) == pytest.approx((4 + 4 * max(1 / 4, 2 / (4 * 0.5))) / 4)  # β_4 = 1
    assert [c.capacity(d) for d in (1, 2, 4)] == [3, 6, 12]


def test_hand_checked_optimum_mixes_group_sizes():
    # 4 devices, 3 tokens each.  Length 4 needs a group of 2 (time 4·1.5/2 = 3).  Static d=2 must pair
    # the two 3s (4.5); static d=4 costs 10·2/4 = 5; d=1 cannot hold the 4.  Optimum: [2, 1, 1] at 3.0.
    c, lengths = _toy(), [4, 3, 3]
    assert static_plan(lengths, c, 4, 1) is None
    plan = solve(lengths, c, 4)
    _check_valid(plan, lengths, c, 4)
    assert [(g.size, g.first_device) for g in plan.groups] == [(2, 0), (1, 2), (1, 3)]
    assert plan.groups[0].sequences == (0,)
    assert plan.max_time_s == pytest.approx(3.0) and plan.static_degree == 2
    assert plan.static_time_s == pytest.approx(4.5) and plan.speedup == pytest.approx(1.5)
    assert plan.source == "milp"


def _brute(lengths, c: SeqCost, n: int) -> float:
    """The true optimum: every multiset of sizes, every assignment."""
    best, sizes = np.inf, degrees(c, n)
    for k in range(1, len(lengths) + 1):
        for ms in itertools.combinations_with_replacement(sizes, k):
            if sum(ms) > n:
                continue
            for a in itertools.product(range(k), repeat=len(lengths)):
                parts = [[s for s, g in zip(lengths, a) if g == j] for j in range(k)]
                if all(sum(p) <= c.capacity(d) for p, d in zip(parts, ms)):
                    best = min(best, max(c.time(d, p) for p, d in zip(parts, ms)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_lower_bound_is_a_bound_and_plan_beats_static_on_small_cases(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 7, size=int(rng.integers(3, 6))).tolist()
    c = _toy(alpha1=float(rng.uniform(0, 0.3)), memory_bytes=float(rng.integers(6, 9)))
    opt, plan = _brute(lengths, c, 4), solve(lengths, c, 4)
    _check_valid(plan, lengths, c, 4)
    assert plan.lower_bound_s <= opt * (1 + 1e-9) <= plan.max_time_s * (1 + 1e-9)


def test_plan_batch_beats_static_where_memory_forces_a_big_degree():
    # Without recomputation the longest sequence (74244 tokens) alone takes longer on 8 H100s than the
    # whole batch on static degree 16, which pays inter-node all-to-alls for every sequence; the
    # others do better in small groups inside a node.
    lengths = _lengths(256, seed=1, median=1000)
    mesh = autopar.Mesh({"dp": 64}, hardware="h100-sxm")
    plan = autopar.plan_batch(lengths, mesh, recompute=False)
    cost = seq_cost(ModelDims.of("llama3-8b"), load_hardware("h100-sxm"), 64, recompute=False)
    _check_valid(plan, lengths, cost, 64)
    longest = int(np.argmax(lengths))
    assert cost.time(8, lengths[[longest]]) > plan.static_time_s
    assert plan.static_degree == 16 and next(g.size for g in plan.groups if longest in g.sequences) == 16
    assert plan.source == "milp" and plan.speedup > 1.05
    assert min(g.size for g in plan.groups) == 1
    assert plan.solve_time_s < 5


def test_long_sequences_go_to_groups_whose_memory_holds_them():
    lengths = [30, 28] + np.random.default_rng(0).integers(1, 6, size=40).tolist()
    c = _toy(memory_bytes=14.0, devices_per_node=4, bw_intra=4.0, max_degree=16)  # 14 tokens per device
    assert c.capacity(2) < 30 <= c.capacity(4) and static_plan(lengths, c, 16, 2) is None
    plan = solve(lengths, c, 16)
    _check_valid(plan, lengths, c, 16)
    assert next(g.size for g in plan.groups if 0 in g.sequences) >= 4
    assert min(g.size for g in plan.groups) == 1 and plan.source == "milp" and plan.speedup > 1.02


def test_plan_batch_is_deterministic_and_json():
    lengths = _lengths(300, seed=3).tolist()
    mesh = autopar.Mesh({"dp": 8, "tp": 4}, hardware="h100-sxm")
    a, b = (autopar.plan_batch(lengths, mesh).to_dict() for _ in range(2))
    a.pop("solve_time_s"), b.pop("solve_time_s")
    assert a == b
    assert json.loads(json.dumps(a, allow_nan=False))["groups"][0]["sequences"] == a["groups"][0]["sequences"]


def test_model_dims_from_presets_and_dicts():
    d = ModelDims.of("llama3-8b")
    assert (d.layers, d.hidden, d.heads, d.kv_heads, d.ffn, d.vocab) == (32, 4096, 32, 8, 14336, 128256)
    h_kv = d.hidden // d.heads * d.kv_heads
    params = d.layers * (2 * d.hidden ** 2 + 2 * d.hidden * h_kv + 3 * d.hidden * d.ffn) + 2 * d.hidden * d.vocab
    assert params == pytest.approx(8.03e9, rel=0.01)  # Llama-3-8B's published size
    g = ModelDims.of("gpt2")
    assert (g.layers, g.hidden, g.heads, g.ffn, g.gated) == (12, 768, 12, 3072, False)
    assert seq_cost(g, load_hardware("h100-sxm"), 8).max_degree == 4  # 12 heads: Ulysses degree 1, 2 or 4
    assert ModelDims.of({"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 100}).ffn == 128
    with pytest.raises(AutoparError, match="lack"):
        ModelDims.of({"layers": 2})
    with pytest.raises(AutoparError, match="unknown keys \\['n_embd'\\]"):
        ModelDims.of({"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 100, "n_embd": 1})
    with pytest.raises(AutoparError, match="unknown model"):
        ModelDims.of("llama9")


@pytest.mark.parametrize("bad", [[], [0, 5], [3, -1], [1.5, 2], "1,2", [[1, 2]], [True, 2], None, np.array([])])
def test_bad_lengths_are_autopar_errors(bad):
    with pytest.raises(AutoparError, match="lengths must be"):
        autopar.plan_batch(bad, autopar.Mesh({"dp": 8}, hardware="h100-sxm"))


def test_a_sequence_that_fits_no_group_is_named():
    mesh = autopar.Mesh({"dp": 4}, hardware="h100-sxm")
    with pytest.raises(InfeasibleError, match=r"\(index, length\) \[\(1, 131072\), \(3, 90000\)\] .* 4 devices"):
        autopar.plan_batch([100, 131072, 50, 90000], mesh, recompute=False)


def test_a_batch_too_big_for_the_mesh_is_infeasible():
    with pytest.raises(InfeasibleError, match="split the batch"):
        autopar.plan_batch([100_000] * 40, autopar.Mesh({"dp": 8}, hardware="h100-sxm"))
