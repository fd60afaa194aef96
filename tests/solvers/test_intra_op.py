"""Tests of the intra-op sharding solver: numpy arrays in, choices out (no model needed)."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from autopar.errors import InfeasibleError
from autopar.solvers import intra_op
from autopar.solvers.intra_op import ShardingProblem, evaluate, peak_memory, solve

REPO = Path(__file__).resolve().parents[2]


def random_problem(
    seed: int,
    n: int,
    kmax: int = 3,
    p_edge: float = 0.4,
    p_inf: float = 0.0,
    memory: float | None = None,
    dup: bool = True,
) -> ShardingProblem:
    """Random DAG: edges u < v with probability p_edge, sometimes duplicated; some inf entries."""
    rng = np.random.default_rng(seed)
    ks = rng.integers(1, kmax + 1, size=n)
    costs = [rng.uniform(0, 1, size=k).round(3) for k in ks]
    mem = [rng.integers(1, 100, size=k).astype(np.float64) for k in ks]
    edges, ecosts = [], []
    for v in range(1, n):
        for u in range(v):
            if rng.random() < p_edge or u == v - 1:
                r = rng.uniform(0, 1, size=(ks[u], ks[v])).round(3)
                r[rng.random(r.shape) < 0.3] = 0.0
                r[rng.random(r.shape) < p_inf] = np.inf
                pair = (u, v) if rng.random() < 0.5 else (v, u)
                edges.append(pair)
                ecosts.append(r if pair == (u, v) else r.T.copy())
                if dup and rng.random() < 0.1:
                    edges.append((u, v))
                    ecosts.append(rng.uniform(0, 1, size=(ks[u], ks[v])).round(3))
    limit = None
    if memory is not None:
        lo = sum(m.min() for m in mem)
        hi = sum(m.max() for m in mem)
        limit = float(lo + memory * (hi - lo))
    return ShardingProblem(costs, mem, edges, ecosts, limit, [f"op{v}" for v in range(n)])


def brute_force(p: ShardingProblem) -> tuple[float, list[int] | None]:
    best, arg = math.inf, None
    for choice in itertools.product(*[range(len(c)) for c in p.node_costs]):
        if p.memory_limit is not None and peak_memory(p, list(choice)) > p.memory_limit:
            continue
        obj = evaluate(p, list(choice))
        if obj < best:
            best, arg = obj, list(choice)
    return best, arg


def check_against_brute_force(p: ShardingProblem) -> None:
    best, _ = brute_force(p)
    if not math.isfinite(best):
        with pytest.raises(InfeasibleError):
            solve(p, time_limit_s=5)
        return
    sol = solve(p, time_limit_s=5)
    assert sol.status == "OPTIMAL"
    assert sol.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert evaluate(p, sol.choice) == sol.objective
    if p.memory_limit is not None:
        assert peak_memory(p, sol.choice) <= p.memory_limit


@pytest.fixture(params=["eliminate", "cp-sat"])
def mode(request, monkeypatch):
    """Run each brute-force test with and without variable elimination (the DP path)."""
    if request.param == "cp-sat":
        monkeypatch.setattr(intra_op._Reduced, "eliminate", lambda self, v: False)
    return request.param


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force_on_random_dags(seed, mode):
    check_against_brute_force(random_problem(seed, 5 + seed % 3, kmax=3 + seed % 2, p_edge=0.6))


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force_with_memory_and_forbidden_pairs(seed):
    p = random_problem(100 + seed, 6, kmax=3, p_edge=0.6, p_inf=0.1, memory=0.2 + 0.08 * seed)
    check_against_brute_force(p)


@pytest.mark.parametrize("seed", range(4))
def test_forbidden_pairs_are_respected(seed, mode):
    p = random_problem(200 + seed, 6, kmax=4, p_edge=0.5, p_inf=0.2)
    check_against_brute_force(p)


def test_memory_limit_forces_costlier_choice():
    # Strategy 0 is fast but needs 8 GB, strategy 1 is slower and needs 2 GB.
    costs = [np.array([1.0, 3.0]), np.array([1.0, 2.0])]
    mem = [np.array([8e9, 2e9]), np.array([8e9, 2e9])]
    edges, ecosts = [(0, 1)], [np.zeros((2, 2))]
    free = solve(ShardingProblem(costs, mem, edges, ecosts))
    assert free.choice == [0, 0] and free.objective == 2.0
    p = ShardingProblem(costs, mem, edges, ecosts, memory_limit=12e9)
    sol = solve(p)
    # one node must go to 2 GB; the cheaper one to move is node 1 (+1 s instead of +2 s)
    assert sol.choice == [0, 1]
    assert sol.objective == 3.0
    assert sol.status == "OPTIMAL"
    assert peak_memory(p, sol.choice) == 10e9


def test_infeasible_memory_names_the_minimum_and_contributors():
    costs = [np.array([1.0, 2.0]), np.array([1.0]), np.array([1.0, 5.0])]
    mem = [np.array([4e9, 3e9]), np.array([1.5e9]), np.array([9e9, 0.25e9])]
    names = ["attn.qkv", "norm", "mlp.up"]
    p = ShardingProblem(costs, mem, [(0, 1), (1, 2)], [np.zeros((2, 1)), np.zeros((1, 2))],
                        memory_limit=4e9, names=names)
    with pytest.raises(InfeasibleError) as info:
        solve(p)
    msg = info.value.explanation
    assert "4.75 GB" in msg  # 3 + 1.5 + 0.25
    assert "4.00 GB" in msg
    assert "attn.qkv" in msg and "norm" in msg


def test_all_forbidden_edge_is_named():
    costs = [np.array([1.0, 1.0]), np.array([1.0, 2.0]), np.array([1.0, 1.0])]
    mem = [np.zeros(2)] * 3
    bad = np.array([[0.0, np.inf], [np.inf, 0.0]])
    # 0 -> 1 needs equal indices, 1 -> 2 needs equal indices, 0 -> 2 needs different ones
    edges = [(0, 1), (1, 2), (0, 2)]
    ecosts = [bad, bad, np.array([[np.inf, 0.0], [0.0, np.inf]])]
    p = ShardingProblem(costs, mem, edges, ecosts, names=["a", "b", "c"])
    with pytest.raises(InfeasibleError) as info:
        solve(p)
    assert "forbidden" in info.value.explanation
    assert "a -> c" in info.value.explanation

    q = ShardingProblem(costs[:2], mem[:2], [(0, 1)], [np.full((2, 2), np.inf)], names=["x", "y"])
    with pytest.raises(InfeasibleError, match="x -> y"):
        solve(q)


def test_memory_and_forbidden_pairs_jointly_infeasible():
    # Each constraint alone can be met; together they cannot.
    costs = [np.array([1.0, 1.0]), np.array([1.0, 1.0])]
    mem = [np.array([0.0, 10e9]), np.array([0.0, 10e9])]
    forbid = np.array([[np.inf, 0.0], [0.0, 0.0]])  # both small strategies together: forbidden
    p = ShardingProblem(costs, mem, [(0, 1)], [forbid], memory_limit=5e9, names=["p", "q"])
    with pytest.raises(InfeasibleError) as info:
        solve(p)
    msg = info.value.explanation
    assert "memory limit of 5.00 GB" in msg and "p -> q" in msg


def test_node_without_allowed_strategy():
    p = ShardingProblem([np.array([np.inf, np.inf]), np.array([1.0])], [np.zeros(2), np.zeros(1)],
                        [(0, 1)], [np.zeros((2, 1))], names=["dead", "ok"])
    with pytest.raises(InfeasibleError, match="dead"):
        solve(p)


def _chain(seed: int, n: int, k: int) -> ShardingProblem:
    rng = np.random.default_rng(seed)
    costs = [rng.uniform(0, 1, size=k) for _ in range(n)]
    mem = [rng.uniform(1, 10, size=k).round() for _ in range(n)]
    edges = [(v, v + 1) for v in range(n - 1)]
    ecosts = [rng.uniform(0, 1, size=(k, k)) * (rng.random((k, k)) < 0.7) for _ in edges]
    return ShardingProblem(costs, mem, edges, ecosts)


def test_chain_is_solved_by_dp_and_matches_brute_force():
    p = _chain(0, 7, 3)
    sol = solve(p)
    assert sol.stats["solver"] == "dp" and sol.status == "OPTIMAL"
    best, _ = brute_force(p)
    assert sol.objective == pytest.approx(best, rel=1e-12)


def test_chain_dp_matches_cp_sat(monkeypatch):
    p = _chain(1, 60, 6)
    dp = solve(p)
    assert dp.stats["solver"] == "dp" and dp.status == "OPTIMAL"
    # With variable elimination switched off, CP-SAT solves the same chain.
    monkeypatch.setattr(intra_op._Reduced, "eliminate", lambda self, v: False)
    cp = solve(p, time_limit_s=10)
    assert cp.stats["solver"] == "cp-sat" and cp.status == "OPTIMAL"
    assert cp.objective == pytest.approx(dp.objective, rel=1e-8)


def test_chain_with_memory_limit():
    p = _chain(2, 7, 3)
    free = solve(p)
    hi = sum(float(m.max()) for m in p.node_memory)
    # active but loose: the unconstrained DP optimum fits, so no CP-SAT is needed
    loose = ShardingProblem(p.node_costs, p.node_memory, p.edges, p.edge_costs, memory_limit=hi - 0.5)
    assert peak_memory(p, free.choice) <= hi - 0.5
    sol = solve(loose)
    assert sol.stats["solver"] == "dp" and sol.choice == free.choice
    # binding: CP-SAT, checked against brute force
    tight = ShardingProblem(p.node_costs, p.node_memory, p.edges, p.edge_costs,
                            memory_limit=peak_memory(p, free.choice) - 3)
    sol = solve(tight)
    assert sol.stats["solver"] == "cp-sat"
    check_against_brute_force(tight)


def test_tree_with_branches_is_solved_by_dp():
    rng = np.random.default_rng(5)
    n, k = 9, 3
    parents = [int(rng.integers(0, v)) for v in range(1, n)]
    costs = [rng.uniform(0, 1, size=k) for _ in range(n)]
    edges = [(u, v) for v, u in zip(range(1, n), parents)]
    ecosts = [rng.uniform(0, 1, size=(k, k)) for _ in edges]
    p = ShardingProblem(costs, [np.zeros(k)] * n, edges, ecosts)
    sol = solve(p)
    assert sol.stats["solver"] == "dp"
    assert sol.objective == pytest.approx(brute_force(p)[0], rel=1e-12)


_DETERMINISM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    sys.path.insert(0, {repo!r})
    from autopar.solvers.intra_op import ShardingProblem, solve
    rng = np.random.default_rng(7)
    n = 70
    ks = rng.integers(4, 9, size=n)
    costs = [rng.integers(0, 4, size=k).astype(float) for k in ks]  # many ties
    mem = [rng.integers(1, 5, size=k).astype(float) for k in ks]
    edges, ecosts = [], []
    for v in range(1, n):
        for u in sorted(set(rng.integers(max(0, v - 6), v, size=3).tolist()) | {{v - 1}}):
            edges.append((u, v))
            ecosts.append(rng.integers(0, 3, size=(ks[u], ks[v])).astype(float))
    lo = sum(m.min() for m in mem); hi = sum(m.max() for m in mem)
    p = ShardingProblem(costs, mem, edges, ecosts, memory_limit=float(lo + 0.4 * (hi - lo)))
    sol = solve(p, time_limit_s=1.0, workers=2)
    print(json.dumps({{"choice": sol.choice, "objective": sol.objective,
                      "solver": sol.stats["solver"]}}))
    """
)


def test_same_choice_in_separate_processes():
    script = _DETERMINISM_SCRIPT.format(repo=str(REPO))
    outs = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=120, check=True)
        outs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    assert outs[0]["solver"] == "cp-sat"
    assert outs[0] == outs[1]


def test_save_load_round_trip(tmp_path):
    p = random_problem(3, 6, kmax=4, p_inf=0.05, memory=0.5)
    path = tmp_path / "problem.npz"
    p.save(path)
    q = ShardingProblem.load(path)
    assert q.names == p.names and q.memory_limit == p.memory_limit and q.edges == p.edges
    for a, b in zip(p.node_costs + p.node_memory + p.edge_costs,
                    q.node_costs + q.node_memory + q.edge_costs):
        np.testing.assert_array_equal(a, b)
    assert solve(q).choice == solve(p).choice

    r = ShardingProblem([np.array([1.0])], [np.array([0.0])], [], [])
    r.save(tmp_path / "tiny.npz")
    back = ShardingProblem.load(tmp_path / "tiny.npz")
    assert back.memory_limit is None and back.names is None and back.edges == []


def test_validate_names_offending_entries():
    p = ShardingProblem([np.array([1.0, np.nan]), np.array([1.0])], [np.zeros(2), np.zeros(1)],
                        [(0, 1)], [np.zeros((2, 2))], names=["lin", "relu"])
    with pytest.raises(ValueError) as info:
        p.validate()
    assert "lin" in str(info.value) and "(2, 1)" in str(info.value)
    with pytest.raises(ValueError, match="self-loop"):
        ShardingProblem([np.ones(1)], [np.ones(1)], [(0, 0)], [np.ones((1, 1))]).validate()
    with pytest.raises(ValueError, match="negative"):
        ShardingProblem([np.ones(1), np.ones(1)], [np.ones(1)] * 2, [(0, 1)],
                        [-np.ones((1, 1))]).validate()


def test_progress_is_reported():
    msgs = []
    p = random_problem(11, 7, kmax=3, memory=0.4)
    solve(p, progress=msgs.append)
    assert any(m.startswith("presolve:") for m in msgs)
    assert all(isinstance(m, str) for m in msgs)


def test_empty_and_trivial_problems():
    assert solve(ShardingProblem([], [], [], [])).choice == []
    sol = solve(ShardingProblem([np.array([2.0, 1.0, 1.0])], [np.zeros(3)], [], []))
    assert sol.choice == [1] and sol.objective == 1.0 and sol.status == "OPTIMAL"


def _exhaustive(p: ShardingProblem) -> float:
    """The optimum by enumerating every choice (4^12 = 16.7M here), vectorised over the last nodes."""
    n, head = p.num_nodes, 4
    ks = [len(c) for c in p.node_costs]
    tail = np.indices(ks[head:]).reshape(n - head, -1)  # every choice of nodes head..n-1, as columns
    mem = np.asarray([m for m in p.node_memory], dtype=object)
    best = math.inf
    for prefix in itertools.product(*[range(k) for k in ks[:head]]):
        choice = [np.full(tail.shape[1], i) for i in prefix] + list(tail)
        total = sum(p.node_costs[v][choice[v]] for v in range(n))
        total = total + sum(r[choice[u], choice[v]] for (u, v), r in zip(p.edges, p.edge_costs))
        if p.memory_limit is not None:
            used = sum(mem[v][choice[v]] for v in range(n))
            total = np.where(used <= p.memory_limit, total, np.inf)
        best = min(best, float(total.min()))
    return best


@pytest.mark.parametrize("seed,limited", [(0, False), (1, True)])
def test_matches_exhaustive_enumeration_at_12_nodes_by_4_strategies(seed, limited):
    """Issue 8's optimality check at its stated size: 12 nodes x 4 strategies, a dense random graph
    (with a memory limit that cuts the unconstrained optimum off in the second case)."""
    rng = np.random.default_rng(500 + seed)
    costs = [rng.uniform(0, 1, 4).round(3) for _ in range(12)]
    mem = [rng.integers(1, 100, 4).astype(np.float64) for _ in range(12)]
    edges = [(u, v) for v in range(1, 12) for u in range(v) if u == v - 1 or rng.random() < 0.3]
    mats = [np.where(rng.random((4, 4)) < 0.3, 0.0, rng.uniform(0, 1, (4, 4)).round(3)) for _ in edges]
    p = ShardingProblem(costs, mem, edges, mats)
    if limited:
        free = solve(p)
        p = ShardingProblem(costs, mem, edges, mats, memory_limit=peak_memory(p, free.choice) - 30)
    best = _exhaustive(p)
    sol = solve(p, time_limit_s=10)
    assert sol.status == "OPTIMAL"
    assert sol.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
    if limited:
        assert peak_memory(p, sol.choice) <= p.memory_limit and sol.objective > free.objective
