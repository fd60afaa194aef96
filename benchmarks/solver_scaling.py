"""Time the intra-op sharding solver on random DAG problems (a benchmark, not a test).

    python benchmarks/solver_scaling.py                     # 100 / 500 / 1000 nodes, 8-16 strategies
    python benchmarks/solver_scaling.py --nodes 1000 --memory 0.3 --time-limit 60

The generator imitates what the cost model produces: each strategy has an output layout and an
expected layout per input; resharding between different layouts costs the tensor size times a
per-layout-pair factor, and is free between equal ones.  Node costs are compute divided by a
sharding factor plus a little in-op communication; memory is parameter size divided by the same
factor.  Inputs come from a window of recent nodes (residual-style DAG, not a tree).

Columns: ``core n/e`` nodes/edges left after presolve, ``pairs`` CP-SAT pair variables, ``heur`` the
greedy + block-descent hint, ``total`` wall seconds of solve(), ``cpu`` CPU seconds (all threads),
``gap`` (objective − proven bound) / objective, ``hint`` how much worse the hint was.

Measured (2-core VM shared with other jobs, load 2-4; time_limit_s=20, workers=2; seeds 0 and 1):

    default (fan-in <= 3 from the last 8 nodes; frustrated, a weak LP bound)
      100 nodes  ~27 s   FEASIBLE, gap 11-14 %
      500 nodes  ~25 s   FEASIBLE, gap 16-21 % (CP-SAT does not beat the hint)
     1000 nodes  ~54 s   FEASIBLE, gap 27 %    (CP-SAT does not beat the hint)
    --fanin 1 --window 4 (residual-like)
      100 nodes  4-7 s   OPTIMAL
      500 nodes  40-47 s FEASIBLE, gap 0.1-13 %
     1000 nodes  59-108 s FEASIBLE, gap 9-11 %
    --chain: 1000 nodes 0.10 s, 5000 nodes 0.63 s, OPTIMAL by dynamic programming

time_limit_s is CP-SAT deterministic time; on cores of 100k+ pair variables its LP and LNS tasks
take several wall seconds per unit, hence totals above 20 s.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autopar.solvers.intra_op import ShardingProblem, solve  # noqa: E402


def random_dag_problem(
    n: int,
    kmin: int = 8,
    kmax: int = 16,
    seed: int = 0,
    memory: float | None = None,
    fanin: int = 3,
    window: int = 8,
    layouts: int = 12,
    elementwise: float = 0.6,
) -> ShardingProblem:
    """A random DAG problem; ``memory`` in [0, 1] puts the limit between min and max memory.

    A fraction ``elementwise`` of the nodes are elementwise-like: one strategy per layout (up to
    ``kmax``), each expecting its inputs in the layout it produces.  The others are matmul-like:
    8-16 strategies, each with a random output layout and a random expected layout per input.
    ``elementwise=0`` gives fully random (frustrated) problems, the hard case for the LP bound.
    """
    rng = np.random.default_rng(seed)
    pair = rng.uniform(0.2, 1.0, size=(layouts, layouts))
    np.fill_diagonal(pair, 0.0)
    factor = np.array([1] + [int(rng.choice([2, 4, 8])) for _ in range(layouts - 1)])
    is_ew = rng.random(n) < elementwise
    out_layout, ks = [], []
    for v in range(n):
        if is_ew[v]:
            k = min(layouts, kmax)
            out_layout.append(np.arange(k) % layouts)
        else:
            k = int(rng.integers(kmin, kmax + 1))
            out_layout.append(rng.integers(0, layouts, size=k))
        ks.append(k)
    shard = [factor[o] for o in out_layout]
    size = rng.lognormal(0.0, 1.0, size=n) * 1e-3  # seconds to move the whole tensor once
    node_costs, node_memory = [], []
    for v in range(n):
        flops = rng.lognormal(0.0, 1.0) * 1e-3
        comm = rng.uniform(0.0, 0.3, size=ks[v]) * flops * (shard[v] > 1)
        node_costs.append(flops / shard[v] + comm)
        params = rng.lognormal(0.0, 1.0) * 1e8
        node_memory.append(np.round(params / shard[v]))
    edges, edge_costs = [], []
    for v in range(1, n):
        lo = max(0, v - window)
        m = int(rng.integers(1, fanin + 1))
        srcs = sorted(set(int(u) for u in rng.integers(lo, v, size=m)) | {v - 1})
        for u in srcs:
            want = out_layout[v] if is_ew[v] else rng.integers(0, layouts, size=ks[v])
            edges.append((u, v))
            edge_costs.append(size[u] * pair[out_layout[u][:, None], want[None, :]])
    limit = None
    if memory is not None:
        lo_m = sum(float(m.min()) for m in node_memory)
        hi_m = sum(float(m.max()) for m in node_memory)
        limit = lo_m + memory * (hi_m - lo_m)
    names = [f"op{v}" for v in range(n)]
    return ShardingProblem(node_costs, node_memory, edges, edge_costs, limit, names)


def _cpu() -> float:
    """CPU seconds of this process (all threads): robust to other load on the machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--nodes", type=int, nargs="*", default=[100, 500, 1000])
    ap.add_argument("--kmin", type=int, default=8)
    ap.add_argument("--kmax", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--memory", type=float, default=None, help="limit between min (0) and max (1)")
    ap.add_argument("--time-limit", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chain", action="store_true", help="fan-in 1 from the previous node only")
    ap.add_argument("--fanin", type=int, default=3, help="up to this many random inputs per node")
    ap.add_argument("--window", type=int, default=8, help="inputs come from this many previous nodes")
    ap.add_argument("--elementwise", type=float, default=0.6, help="0 = fully random (hard)")
    args = ap.parse_args()
    print(
        f"{'nodes':>6} {'seed':>4} {'core n/e':>11} {'pairs':>7} {'solver':>7} {'status':>9} "
        f"{'presolve':>8} {'heur':>6} {'total':>7} {'cpu':>7} {'objective':>10} {'gap':>8} {'hint':>8}"
    )
    for n in args.nodes:
        times = []
        for seed in range(args.seeds):
            p = random_dag_problem(
                n, args.kmin, args.kmax, seed=seed, memory=args.memory,
                fanin=1 if args.chain else args.fanin, window=1 if args.chain else args.window,
                elementwise=args.elementwise,
            )
            t, c = time.perf_counter(), _cpu()
            sol = solve(p, time_limit_s=args.time_limit, workers=args.workers)
            dt, cpu = time.perf_counter() - t, _cpu() - c
            times.append(dt)
            st = sol.stats
            gap = hint = ""
            if "cp_bound_s" in st and sol.objective > 0:
                gap = f"{(sol.objective - st['cp_bound_s']) / sol.objective:.2%}"
            if "hint_objective_s" in st and sol.objective > 0:
                hint = f"{(st['hint_objective_s'] - sol.objective) / sol.objective:+.2%}"
            print(
                f"{n:>6} {seed:>4} {st['nodes_after']:>5}/{st['edges_after']:<5} "
                f"{st.get('cp_pair_vars', 0):>7} {st['solver']:>7} {sol.status:>9} "
                f"{st['presolve_time_s']:>7.2f}s {st.get('heuristic_time_s', 0):>5.2f}s "
                f"{dt:>6.2f}s {cpu:>6.2f}s {sol.objective:>10.5g} {gap:>8} {hint:>8}",
                flush=True,
            )
        print(f"{n:>6} median {statistics.median(times):.2f} s, max {max(times):.2f} s", flush=True)


if __name__ == "__main__":
    main()
