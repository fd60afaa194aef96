r"""Intra-op sharding solver: pick one strategy per node (Alpa OSDI'22 §4).

The solver sees arrays, never torch.  A :class:`ShardingProblem` is a graph ``G = (V, E)`` whose
node ``v`` has ``k_v`` candidate strategies, each with a cost ``c_v`` (seconds: compute plus the
communication inside the op) and a memory footprint ``m_v`` (bytes per device), and whose edge
``(u, v)`` has a resharding matrix ``R_uv`` (seconds, ``k_u × k_v``; ``inf`` marks a forbidden pair).

Formulation
-----------
Variables::

    s_v ∈ {0,1}^{k_v},   Σ_i s_v[i] = 1                          (one-hot strategy of v)
    e_uv[i,j] ∈ {0,1}                                             (strategy pair on edge (u,v))

Objective and memory::

    min  Σ_v s_vᵀ c_v  +  Σ_(u,v)∈E ⟨e_uv, R_uv⟩
    s.t. Σ_v s_vᵀ m_v ≤ M                                         (only when a limit M is given)
         s_u[i] + s_v[j] ≤ 1              for every forbidden pair, R_uv[i,j] = inf

Linearisation of ``e`` (the "marginal" form, Alpa's)::

    Σ_j e_uv[i,j] = s_u[i]   ∀i,        Σ_i e_uv[i,j] = s_v[j]   ∀j,
    e_uv[i,j] exists only for allowed pairs (R_uv[i,j] < inf)

so a forbidden pair is excluded by the equalities themselves.  Its LP relaxation is the local
polytope of the pairwise problem (exact on trees).  The compact alternative, valid because every
``R_uv[i,j] ≥ 0`` and we minimise, keeps only ``e_uv[i,j] ≥ s_u[i] + s_v[j] − 1`` for pairs with
``R_uv[i,j] > 0`` plus the clause ``s_u[i] + s_v[j] ≤ 1`` for forbidden ones; it needs fewer
variables but its LP bound is much weaker.  On the 100-node DAG of ``benchmarks/solver_scaling.py``
(20 s of deterministic time) the marginal form reached a better solution (0.0719 s vs 0.0730 s), a
far better bound (0.0618 s vs 0.0381 s) and used half the wall time, so it is the default
(``_LINEARISATION``).

Before building the model each edge is *reparametrised*: its row minima move into ``c_u`` and then
its column minima into ``c_v``.  The objective of every choice is unchanged, and the pair costs
that remain are mostly zero (a resharding matrix is zero on its diagonal), which keeps the
objective short.

Reductions (all exact)
----------------------
1. Strategies with an infinite node cost, or compatible with no remaining strategy of some
   neighbour (arc consistency), are removed.  With a memory limit, strategy ``i`` of ``v`` is removed
   when ``m_v[i] − min m_v + Σ_u min m_u > M``.
2. Dominated strategies are removed: ``j`` is dominated by ``i`` at node ``v`` when, whatever the
   neighbours choose, ``i`` is never worse::

       c_v[i] − c_v[j] + Σ_(v,u) max_x (R_vu[i,x] − R_vu[j,x]) ≤ 0     and, with a limit, m_v[i] ≤ m_v[j]

   Of two equivalent strategies the lower index is kept.
3. Duplicate edges are summed; a node left with one strategy is folded into the unary costs of its
   neighbours (``c_u += R_uv[:, j]``).
4. Without an active memory limit, variable elimination (min-sum dynamic programming): a leaf
   ``v`` with neighbour ``u`` is folded as ``c_u[a] += min_i (R_uv[a,i] + c_v[i])``, and a node of degree
   two between ``u`` and ``w`` becomes an edge ``R'_uw[a,b] = min_i (R_uv[a,i] + c_v[i] + R_vw[i,b])``.
   A forest (in particular a chain) is solved exactly this way, without CP-SAT; on a general graph
   only the 3-core-like remainder goes to CP-SAT.  A memory limit that even the largest strategies
   meet (``Σ_v max m_v ≤ M``) is dropped first, so that this applies.

Integer costs
-------------
CP-SAT needs integers.  After the reductions, every remaining cost term (unary or pair) is
multiplied by ``scale = min(2^30 / C_max, 2^52 / UB)`` and rounded, where ``C_max`` is the largest finite
term and ``UB`` the sum of every node's and edge's largest term, so coefficients stay below ~1e9 and
any objective below 2^52.  Each term is then off by at most ``0.5 / scale`` seconds (≈ 5e-10 · C_max), so
the scaled optimum is within ``(#terms) / scale`` seconds of the true optimum; ``stats`` reports that
bound as ``rounding_bound_s``, and "OPTIMAL" means optimal for the scaled objective.  Memory is
counted in units of a power of two ``u`` (the smallest with ``Σ_v (max m_v − min m_v) ≤ 2^40 u``,
so 1 byte or less for up to a TB), coefficients rounded up and the limit rounded down: a returned
choice always meets the limit, and integral byte counts are exact.  (Otherwise a choice within
``N·u`` bytes of the limit may be cut off; ``stats["memory_unit_bytes"]`` reports ``u``.)

Determinism
-----------
Each rank of a distributed job solves the same problem independently, and the plans' hashes are
compared, so the same problem must give the same choice in every process.  Reductions iterate in
node order and break ties towards the lowest strategy index; the hint heuristic uses a fixed-seed
generator and counts rounds, never seconds.  CP-SAT runs with ``interleave_search=True`` (its
deterministic parallel mode: tasks run in batches and share information only between batches), a
fixed ``random_seed``, and ``max_deterministic_time = time_limit_s`` (CP-SAT's work units, meant to
be about a second each; see the measurements in ``benchmarks/solver_scaling.py``) instead of a
wall-clock limit.  The same inputs, ``workers`` and OR-Tools version therefore give the same choice;
``tests/solvers/test_intra_op.py`` checks this across processes.  A wall-clock safety net of
``10 · time_limit_s + 30`` seconds also applies; if it fires (``stats["wall_limit_hit"]``, only on a
badly overloaded machine) the choice may differ between processes.  The price: wall time is not
bounded by ``time_limit_s``.  On 2 cores it was 1-2× on cores of up to ~35k pair variables, and
up to ~5× on 1000-node random DAGs (~200k pair variables), whose LP and LNS tasks run several wall
seconds per deterministic unit (``benchmarks/solver_scaling.py``).
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from autopar.errors import AutoparError, InfeasibleError

__all__ = ["ShardingProblem", "Solution", "evaluate", "peak_memory", "solve"]

_FORMAT_VERSION = 1
_SEED = 20220711  # fixed: part of the determinism contract
_SUBSOLVERS = ["max_lp", "core"]  # measured in benchmarks/solver_scaling.py; see FACTS.md "Solvers"
_LINEARISATION = "marginal"  # or "compact" (see the module docstring)
# CP-SAT runs in phases over the same model, each with a share of time_limit_s.  The first has no
# LNS: LP-guided search alone proves most structured problems optimal quickly, and LNS tasks cost
# far more wall time than their deterministic time.  The second adds LNS from the first's best
# solution and bound, which matters on hard (frustrated) problems.  Measured in
# benchmarks/solver_scaling.py.
_PHASES: list[tuple[float, dict]] = [(0.4, {"use_lns": False}), (0.6, {})]
_GB = 1e9
_WALL_SAFETY_FACTOR = 10.0  # wall-clock net = 10 · time_limit_s + 30 s (see "Determinism")
# Block moves of the heuristic per second of time_limit_s, and moves without progress before it
# stops: counts, not times, for determinism.  ~4 ms per move on a 500-node core.
_LOCAL_SEARCH_ROUNDS_PER_S = 20
_LOCAL_SEARCH_PATIENCE = 60


# --------------------------------------------------------------------------------------------------
# Problem and solution
# --------------------------------------------------------------------------------------------------


@dataclass
class ShardingProblem:
    """Arrays of one intra-op sharding problem (see the module docstring for the math).

    ``node_costs[v]`` and ``node_memory[v]`` have shape ``(k_v,)``; ``edge_costs[e]`` has shape
    ``(k_u, k_v)`` for ``edges[e] = (u, v)``.  A node cost or an edge entry may be ``inf`` (forbidden);
    nothing may be NaN or negative.  Duplicate edges are allowed and summed.
    """

    node_costs: list[np.ndarray]
    node_memory: list[np.ndarray]
    edges: list[tuple[int, int]]
    edge_costs: list[np.ndarray]
    memory_limit: float | None = None
    names: list[str] | None = None

    @property
    def num_nodes(self) -> int:
        return len(self.node_costs)

    def name(self, v: int) -> str:
        if self.names is not None and 0 <= v < len(self.names):
            return str(self.names[v])
        return f"node {v}"

    def validate(self) -> None:
        """Check shapes and values; raise ValueError naming every offending node or edge."""
        errs: list[str] = []
        n = len(self.node_costs)
        if len(self.node_memory) != n:
            errs.append(f"node_memory has {len(self.node_memory)} entries, node_costs has {n}")
        if self.names is not None and len(self.names) != n:
            errs.append(f"names has {len(self.names)} entries, node_costs has {n}")
        if len(self.edge_costs) != len(self.edges):
            errs.append(f"edge_costs has {len(self.edge_costs)} entries, edges has {len(self.edges)}")
        ks: list[int] = []
        for v in range(n):
            c = np.asarray(self.node_costs[v])
            what = f"{self.name(v)} (index {v})"
            if c.ndim != 1 or c.shape[0] < 1:
                errs.append(f"node_costs of {what} has shape {c.shape}, expected (k,) with k >= 1")
                ks.append(-1)
                continue
            ks.append(c.shape[0])
            if np.isnan(c).any() or (c < 0).any():
                errs.append(f"node_costs of {what} has NaN or negative values: {c.tolist()}")
            if v < len(self.node_memory):
                m = np.asarray(self.node_memory[v])
                if m.shape != c.shape:
                    errs.append(f"node_memory of {what} has shape {m.shape}, expected {c.shape}")
                elif not np.isfinite(m).all() or (m < 0).any():
                    errs.append(f"node_memory of {what} must be finite and >= 0: {m.tolist()}")
        for e, uv in enumerate(self.edges):
            try:
                u, v = (int(uv[0]), int(uv[1]))
            except (TypeError, ValueError, IndexError):
                errs.append(f"edge {e} is {uv!r}, expected a pair of node indices")
                continue
            if not (0 <= u < n and 0 <= v < n):
                errs.append(f"edge {e} ({u}, {v}) refers to a node outside 0..{n - 1}")
                continue
            if u == v:
                errs.append(f"edge {e} ({u}, {v}) is a self-loop on {self.name(u)}")
                continue
            if e >= len(self.edge_costs):
                continue
            r = np.asarray(self.edge_costs[e])
            want = (ks[u], ks[v])
            if r.shape != want:
                errs.append(
                    f"edge {e} {self.name(u)} -> {self.name(v)} has cost shape {r.shape}, "
                    f"expected {want}"
                )
            elif np.isnan(r).any() or (r < 0).any():
                errs.append(f"edge {e} {self.name(u)} -> {self.name(v)} has NaN or negative costs")
        if self.memory_limit is not None and not (
            isinstance(self.memory_limit, (int, float, np.floating, np.integer))
            and self.memory_limit >= 0
            and not math.isnan(self.memory_limit)
        ):
            errs.append(f"memory_limit must be None or a number >= 0, got {self.memory_limit!r}")
        if errs:
            raise ValueError("invalid ShardingProblem:\n  " + "\n  ".join(errs))

    # -- replay format -----------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the problem to a ``.npz`` file that :meth:`load` reads back (no pickle)."""
        ks = np.array([len(c) for c in self.node_costs], dtype=np.int64)
        shapes = np.array([np.shape(r) for r in self.edge_costs], dtype=np.int64).reshape(-1, 2)
        arrays = {
            "format_version": np.array(_FORMAT_VERSION, dtype=np.int64),
            "k": ks,
            "node_costs": _concat([np.asarray(c, dtype=np.float64).ravel() for c in self.node_costs]),
            "node_memory": _concat(
                [np.asarray(m, dtype=np.float64).ravel() for m in self.node_memory]
            ),
            "edges": np.array(self.edges, dtype=np.int64).reshape(-1, 2),
            "edge_shapes": shapes,
            "edge_costs": _concat([np.asarray(r, dtype=np.float64).ravel() for r in self.edge_costs]),
            "memory_limit": np.array(
                np.nan if self.memory_limit is None else float(self.memory_limit)
            ),
        }
        if self.names is not None:
            arrays["names"] = np.array([str(s) for s in self.names], dtype=np.str_)
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "ShardingProblem":
        with np.load(path, allow_pickle=False) as z:
            version = int(z["format_version"])
            if version != _FORMAT_VERSION:
                raise ValueError(f"{path}: sharding problem format {version}, expected {_FORMAT_VERSION}")
            ks = z["k"]
            offs = np.concatenate([[0], np.cumsum(ks)])
            nc, nm = z["node_costs"], z["node_memory"]
            shapes = z["edge_shapes"]
            sizes = shapes[:, 0] * shapes[:, 1] if len(shapes) else np.zeros(0, np.int64)
            eoffs = np.concatenate([[0], np.cumsum(sizes)])
            ec = z["edge_costs"]
            limit = float(z["memory_limit"])
            names = [str(s) for s in z["names"]] if "names" in z.files else None
            return cls(
                node_costs=[nc[offs[v] : offs[v + 1]].copy() for v in range(len(ks))],
                node_memory=[nm[offs[v] : offs[v + 1]].copy() for v in range(len(ks))],
                edges=[(int(u), int(v)) for u, v in z["edges"]],
                edge_costs=[
                    ec[eoffs[e] : eoffs[e + 1]].reshape(tuple(shapes[e])).copy()
                    for e in range(len(shapes))
                ],
                memory_limit=None if math.isnan(limit) else limit,
                names=names,
            )


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)


@dataclass
class Solution:
    choice: list[int]  # chosen strategy index per node
    objective: float  # seconds, recomputed exactly from the arrays (see evaluate)
    status: str  # "OPTIMAL" (proven) or "FEASIBLE"
    solve_time_s: float
    stats: dict = field(default_factory=dict)


def evaluate(problem: ShardingProblem, choice: list[int]) -> float:
    """Objective ``Σ_v c_v[choice_v] + Σ_(u,v) R_uv[choice_u, choice_v]``, correctly rounded (fsum).

    ``inf`` if the choice uses a forbidden pair or strategy.
    """
    terms = [float(problem.node_costs[v][choice[v]]) for v in range(problem.num_nodes)]
    terms += [
        float(r[choice[u], choice[v]]) for (u, v), r in zip(problem.edges, problem.edge_costs)
    ]
    if any(math.isinf(t) for t in terms):
        return math.inf
    return math.fsum(terms)


def peak_memory(problem: ShardingProblem, choice: list[int]) -> float:
    """Bytes per device, ``Σ_v m_v[choice_v]`` (the quantity bounded by ``memory_limit``)."""
    return math.fsum(float(problem.node_memory[v][choice[v]]) for v in range(problem.num_nodes))


# --------------------------------------------------------------------------------------------------
# Presolve: a mutable reduced problem plus a trail for back-substitution
# --------------------------------------------------------------------------------------------------


class _Infeasible(Exception):
    """Raised inside presolve; solve() turns it into an InfeasibleError with an explanation."""


class _Reduced:
    """The problem restricted to live strategies, with folded and eliminated nodes on a trail.

    ``dom[v]`` holds the original indices of v's live strategies (sorted), or None once v has been
    fixed or eliminated.  Edge matrices ``R[(a, b)]`` (a < b) have shape (|dom a|, |dom b|).
    """

    def __init__(self, p: ShardingProblem, mem_limit: float | None):
        n = p.num_nodes
        self.n = n
        self.mem_limit = mem_limit  # None = memory constraint inactive
        self.dom: list[np.ndarray | None] = []
        self.unary: list[np.ndarray] = []
        self.mem: list[np.ndarray] = []
        for v in range(n):
            c = np.asarray(p.node_costs[v], dtype=np.float64)
            self.dom.append(np.arange(len(c), dtype=np.int64))
            self.unary.append(c.copy())
            self.mem.append(np.asarray(p.node_memory[v], dtype=np.float64).copy())
        self.adj: list[set[int]] = [set() for _ in range(n)]
        self.R: dict[tuple[int, int], np.ndarray] = {}
        for (u, v), r in zip(p.edges, p.edge_costs):
            u, v = int(u), int(v)
            r = np.asarray(r, dtype=np.float64)
            if u > v:
                u, v, r = v, u, r.T
            self._add_edge(u, v, r)
        self.offset = 0.0  # constant part of the objective
        self.mem_offset = 0.0  # memory of fixed/eliminated nodes (only when mem_limit is set)
        self.trail: list[tuple] = []
        self.dirty: list[int] = []  # heap of nodes to revisit
        self.in_dirty: set[int] = set()

    # -- helpers -----------------------------------------------------------------------------------

    def _add_edge(self, u: int, v: int, r: np.ndarray) -> None:
        key = (u, v)
        if key in self.R:
            self.R[key] = self.R[key] + r
        else:
            self.R[key] = np.array(r, dtype=np.float64)
            self.adj[u].add(v)
            self.adj[v].add(u)

    def mat(self, v: int, u: int) -> np.ndarray:
        """Edge matrix oriented with v's strategies as rows."""
        return self.R[(v, u)] if v < u else self.R[(u, v)].T

    def _del_edge(self, a: int, b: int) -> None:
        del self.R[(min(a, b), max(a, b))]
        self.adj[a].discard(b)
        self.adj[b].discard(a)

    def push(self, v: int) -> None:
        if self.dom[v] is not None and v not in self.in_dirty:
            self.in_dirty.add(v)
            heapq.heappush(self.dirty, v)

    def live(self) -> list[int]:
        return [v for v in range(self.n) if self.dom[v] is not None]

    def restrict(self, v: int, keep: np.ndarray) -> None:
        if keep.all():
            return
        if not keep.any():
            raise _Infeasible(f"node {v} has no strategy left")
        self.dom[v] = self.dom[v][keep]
        self.unary[v] = self.unary[v][keep]
        self.mem[v] = self.mem[v][keep]
        for u in sorted(self.adj[v]):
            if v < u:
                self.R[(v, u)] = self.R[(v, u)][keep, :]
            else:
                self.R[(u, v)] = self.R[(u, v)][:, keep]
            self.push(u)
        self.push(v)

    def remove(self, v: int, record: tuple) -> None:
        for u in sorted(self.adj[v]):
            self._del_edge(v, u)
            self.push(u)
        self.dom[v] = None
        self.trail.append(record)

    # -- reductions --------------------------------------------------------------------------------

    def prune(self, v: int) -> None:
        """Arc consistency and dominance at v."""
        keep = np.isfinite(self.unary[v])
        nbrs = sorted(self.adj[v])
        mats = [self.mat(v, u) for u in nbrs]
        for m in mats:
            keep &= np.isfinite(m).any(axis=1)
        self.restrict(v, keep)
        if self.dom[v] is None or len(self.dom[v]) < 2:
            return
        mats = [self.mat(v, u) for u in nbrs]
        k = len(self.dom[v])
        # worst[i, j] = c[i] - c[j] + Σ_e max_x (R[i,x] - R[j,x]); i dominates j when <= 0.
        worst = self.unary[v][:, None] - self.unary[v][None, :]
        for m in mats:
            a = m[:, None, :]
            b = m[None, :, :]
            fin_b = np.isfinite(b)
            with np.errstate(invalid="ignore"):
                d = np.where(fin_b, a - b, -np.inf)  # x forbidden for j: no constraint
            worst = worst + d.max(axis=2)
        dom_mat = worst <= 0
        if self.mem_limit is not None:
            dom_mat &= self.mem[v][:, None] <= self.mem[v][None, :]
        np.fill_diagonal(dom_mat, False)
        if not dom_mat.any():
            return
        alive = np.ones(k, dtype=bool)
        for j in range(k):  # sequential, so that one of equivalent strategies always survives
            dominators = dom_mat[:, j] & alive
            strict = dominators & ~dom_mat[j, :]
            equivalent_before = dominators & dom_mat[j, :]
            equivalent_before[j:] = False
            if strict.any() or equivalent_before.any():
                alive[j] = False
        self.restrict(v, alive)

    def fix_single(self, v: int) -> None:
        idx = int(self.dom[v][0])
        self.offset += float(self.unary[v][0])
        if self.mem_limit is not None:
            self.mem_offset += float(self.mem[v][0])
        for u in sorted(self.adj[v]):
            self.unary[u] = self.unary[u] + self.mat(u, v)[:, 0]
        self.remove(v, ("fixed", v, idx))

    def eliminate(self, v: int) -> bool:
        """Variable elimination of a node of degree <= 2 (only without an active memory limit)."""
        nbrs = sorted(self.adj[v])
        if len(nbrs) == 0:
            i = int(np.argmin(self.unary[v]))
            if not np.isfinite(self.unary[v][i]):
                raise _Infeasible(f"node {v} has no strategy left")
            self.offset += float(self.unary[v][i])
            self.remove(v, ("fixed", v, int(self.dom[v][i])))
            return True
        if len(nbrs) == 1:
            (u,) = nbrs
            m = self.mat(u, v) + self.unary[v][None, :]
            best = np.argmin(m, axis=1)  # first minimum: lowest strategy index
            msg = m[np.arange(m.shape[0]), best]
            self.unary[u] = self.unary[u] + msg
            self.remove(v, ("leaf", v, u, self.dom[u].copy(), self.dom[v][best]))
            return True
        if len(nbrs) == 2:
            u, w = nbrs
            t = self.mat(u, v)[:, :, None] + self.unary[v][None, :, None] + self.mat(v, w)[None, :, :]
            best = np.argmin(t, axis=1)
            new = np.take_along_axis(t, best[:, None, :], axis=1)[:, 0, :]
            rec = ("series", v, u, w, self.dom[u].copy(), self.dom[w].copy(), self.dom[v][best])
            self.remove(v, rec)
            self._add_edge(u, w, new)
            return True
        return False

    def memory_prune(self) -> bool:
        """Drop strategies that alone overshoot the memory slack; True if something changed."""
        if self.mem_limit is None:
            return False
        live = self.live()
        mins = {v: float(self.mem[v].min()) for v in live}
        slack = self.mem_limit - self.mem_offset - math.fsum(mins.values())
        if slack < 0:
            raise _Infeasible("memory")
        changed = False
        for v in live:
            keep = self.mem[v] - mins[v] <= slack
            if not keep.all():
                changed = True
                self.restrict(v, keep)
        return changed

    def run(self, eliminate: bool) -> None:
        for v in range(self.n):
            self.push(v)
        while True:
            while self.dirty:
                v = heapq.heappop(self.dirty)
                self.in_dirty.discard(v)
                if self.dom[v] is None:
                    continue
                self.prune(v)
                if self.dom[v] is None:
                    continue
                if len(self.dom[v]) == 1:
                    self.fix_single(v)
                elif eliminate and len(self.adj[v]) <= 2:
                    self.eliminate(v)
            if not self.memory_prune():
                break

    def back_substitute(self, core_choice: dict[int, int]) -> list[int]:
        """Original strategy index per node, given the original index for every core node."""
        choice = [-1] * self.n
        for v, i in core_choice.items():
            choice[v] = int(i)
        for rec in reversed(self.trail):
            kind, v = rec[0], rec[1]
            if kind == "fixed":
                choice[v] = rec[2]
            elif kind == "leaf":
                _, _, u, dom_u, best = rec
                choice[v] = int(best[np.searchsorted(dom_u, choice[u])])
            else:
                _, _, u, w, dom_u, dom_w, best = rec
                a = np.searchsorted(dom_u, choice[u])
                b = np.searchsorted(dom_w, choice[w])
                choice[v] = int(best[a, b])
        return choice


# --------------------------------------------------------------------------------------------------
# Heuristic hint on the reduced core
# --------------------------------------------------------------------------------------------------


def _core_cost(red: _Reduced, nodes: list[int], loc: dict[int, int]) -> float:
    tot = sum(float(red.unary[v][loc[v]]) for v in nodes)
    tot += sum(float(r[loc[a], loc[b]]) for (a, b), r in red.R.items())
    return tot


def _memory_price(red: _Reduced, nodes: list[int]) -> float:
    """A small starting price (seconds per byte) for the Lagrangian memory repair."""
    spread_c = math.fsum(float(np.ptp(red.unary[v])) for v in nodes)
    spread_m = math.fsum(float(np.ptp(red.mem[v])) for v in nodes)
    return 1e-3 * (spread_c / spread_m if spread_m > 0 and spread_c > 0 else 1e-12)


def _greedy_hint(
    red: _Reduced, nodes: list[int], init: dict[int, int] | None = None
) -> dict[int, int] | None:
    """Greedy in node order (or ``init``), then best-response sweeps; repaired to meet memory.

    Local indices.  The repair raises a price λ on memory (``score = cost + λ·m``) until the
    choice fits.
    """
    loc: dict[int, int] = dict(init or {})

    def score_of(v: int) -> np.ndarray:
        score = red.unary[v].copy()
        for u in red.adj[v]:
            if u in loc:
                score = score + red.mat(u, v)[loc[u], :]
        return score

    for v in nodes if init is None else ():
        score = score_of(v)
        i = int(np.argmin(score))
        if not np.isfinite(score[i]):
            return None
        loc[v] = i
    limit = None if red.mem_limit is None else red.mem_limit - red.mem_offset

    def used() -> float:
        return math.fsum(float(red.mem[v][loc[v]]) for v in nodes)

    def sweeps(lam: float, constrained: bool, rounds: int) -> None:
        cur = used() if constrained else 0.0
        for _ in range(rounds):
            changed = False
            for v in nodes:
                score = score_of(v)
                if lam:
                    score = score + lam * red.mem[v]
                if constrained:
                    room = limit - (cur - red.mem[v][loc[v]])
                    score = np.where(red.mem[v] <= room, score, np.inf)
                i = int(np.argmin(score))
                if i != loc[v] and np.isfinite(score[i]) and score[i] < score[loc[v]]:
                    if constrained:
                        cur += red.mem[v][i] - red.mem[v][loc[v]]
                    loc[v] = i
                    changed = True
            if not changed:
                break

    if limit is None:
        sweeps(0.0, False, 4)
        return loc
    if used() > limit:
        lam = _memory_price(red, nodes)
        for _ in range(60):
            sweeps(lam, False, 2)
            if used() <= limit:
                break
            lam *= 4.0
        if used() > limit:
            return None
    sweeps(0.0, True, 4)
    return loc


def _forest_dp(
    red: _Reduced, block: list[int], in_block: set[int], unary: dict[int, np.ndarray]
) -> dict[int, int]:
    """Exact min-sum DP on the forest induced by ``block``; local indices, lowest index on ties."""
    out: dict[int, int] = {}
    seen: set[int] = set()
    for root in block:
        if root in seen:
            continue
        order, parent = [root], {root: -1}
        seen.add(root)
        for v in order:  # BFS; the list grows while iterating
            for u in sorted(red.adj[v]):
                if u in in_block and u not in seen:
                    seen.add(u)
                    parent[u] = v
                    order.append(u)
        belief = {v: unary[v].copy() for v in order}
        best_child: dict[int, np.ndarray] = {}
        for v in reversed(order[1:]):
            p = parent[v]
            m = red.mat(p, v) + belief[v][None, :]
            b = np.argmin(m, axis=1)
            best_child[v] = b
            belief[p] = belief[p] + m[np.arange(m.shape[0]), b]
        out[root] = int(np.argmin(belief[root]))
        for v in order[1:]:
            out[v] = int(best_child[v][out[parent[v]]])
    return out


def _tree_search(
    red: _Reduced, nodes: list[int], loc: dict[int, int], rounds: int, patience: int
) -> dict[int, int]:
    """Block coordinate descent: re-solve a random induced forest exactly, given the rest.

    Each round picks (with a fixed seed) a set S of nodes whose induced subgraph is a forest,
    folds the edges to fixed neighbours into unary costs and solves S by :func:`_forest_dp`.  The
    move is kept when it lowers the objective (and, with a memory limit, still fits).
    """
    rng = np.random.default_rng(_SEED)
    limit = None if red.mem_limit is None else red.mem_limit - red.mem_offset
    node_arr = np.array(nodes)
    cur = _core_cost(red, nodes, loc)
    stale = 0
    for _ in range(rounds):
        parent: dict[int, int] = {}

        def find(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        block: list[int] = []
        for v in rng.permutation(node_arr).tolist():
            roots = [find(u) for u in red.adj[v] if u in parent]
            if len(set(roots)) != len(roots):
                continue
            parent[v] = v
            for r in roots:
                parent[r] = v
            block.append(v)
        in_block = set(block)
        unary = {}
        for v in block:
            un = red.unary[v].copy()
            for u in red.adj[v]:
                if u not in in_block:
                    un = un + red.mat(u, v)[loc[u], :]
            unary[v] = un
        trial = None
        lam = 0.0
        for _attempt in range(1 if limit is None else 12):
            priced = unary if not lam else {v: unary[v] + lam * red.mem[v] for v in block}
            cand = dict(loc)
            cand.update(_forest_dp(red, sorted(block), in_block, priced))
            if limit is None or math.fsum(float(red.mem[v][cand[v]]) for v in nodes) <= limit:
                trial = cand
                break
            lam = 4.0 * lam if lam else _memory_price(red, nodes)
        if trial is None:
            stale += 1
            if stale >= patience:
                break
            continue
        cost = _core_cost(red, nodes, trial)
        if cost < cur:
            loc, cur, stale = trial, cost, 0
        else:
            stale += 1
            if stale >= patience:
                break
    return loc


# --------------------------------------------------------------------------------------------------
# CP-SAT on the reduced core
# --------------------------------------------------------------------------------------------------


def _cpsat(
    red: _Reduced,
    nodes: list[int],
    hint: dict[int, int] | None,
    time_limit_s: float,
    workers: int,
    progress: Callable[[str], None] | None,
    t0: float,
    stats: dict,
) -> tuple[dict[int, int] | None, str]:
    from ortools.sat.python import cp_model

    # Reparametrise edges: move row minima, then column minima, into the unary costs.
    unary = {v: red.unary[v].copy() for v in nodes}
    edges: list[tuple[int, int, np.ndarray]] = []
    for (a, b) in sorted(red.R):
        r = red.R[(a, b)].copy()
        fin = np.isfinite(r)
        rmin = np.where(fin, r, np.inf).min(axis=1)
        unary[a] = unary[a] + rmin
        r = r - rmin[:, None]
        cmin = np.where(fin, r, np.inf).min(axis=0)
        cmin = np.where(np.isfinite(cmin), cmin, 0.0)
        unary[b] = unary[b] + cmin
        r = r - cmin[None, :]
        edges.append((a, b, r))
    offset = 0.0
    for v in nodes:
        mn = float(unary[v].min())
        offset += mn
        unary[v] = np.maximum(unary[v] - mn, 0.0)

    # Integer scaling (see module docstring).
    cmax, ub = 0.0, 0.0
    for v in nodes:
        cmax = max(cmax, float(unary[v].max()))
        ub += float(unary[v].max())
    for _, _, r in edges:
        f = r[np.isfinite(r)]
        if f.size:
            cmax = max(cmax, float(f.max()))
            ub += float(f.max())
    scale = 1.0 if cmax <= 0 else min(2.0**30 / cmax, 2.0**52 / max(ub, 1e-300))

    model = cp_model.CpModel()
    proto = model.proto
    nvars = 0

    def new_bool() -> int:
        nonlocal nvars
        var = proto.variables.add()
        var.domain.extend([0, 1])
        nvars += 1
        return nvars - 1

    obj_vars: list[int] = []
    obj_coeffs: list[int] = []
    x: dict[int, list[int]] = {}
    for v in nodes:
        x[v] = [new_bool() for _ in range(len(unary[v]))]
        ct = proto.constraints.add()
        ct.exactly_one.literals.extend(x[v])
        coeffs = np.rint(unary[v] * scale).astype(np.int64)
        for i, c in enumerate(coeffs):
            if c:
                obj_vars.append(x[v][i])
                obj_coeffs.append(int(c))
    n_terms = len(nodes)
    n_pair_vars = 0
    n_forbidden = 0
    pair_index: list[tuple[int, int, int, int, int]] = []  # (var, a, i, b, j) for hints
    for a, b, r in edges:
        n_terms += 1
        xa, xb = x[a], x[b]
        coeffs = np.where(np.isfinite(r), np.rint(np.where(np.isfinite(r), r, 0) * scale), -1)
        coeffs = coeffs.astype(np.int64)
        if _LINEARISATION == "marginal":
            rows, cols = r.shape
            ev = [[-1] * cols for _ in range(rows)]
            for i, crow in enumerate(coeffs.tolist()):
                for j, c in enumerate(crow):
                    if c >= 0:
                        e = ev[i][j] = new_bool()
                        n_pair_vars += 1
                        pair_index.append((e, a, i, b, j))
                        if c > 0:
                            obj_vars.append(e)
                            obj_coeffs.append(c)
                    else:
                        n_forbidden += 1
            for i in range(rows):
                row = [e for e in ev[i] if e >= 0]
                lin = proto.constraints.add().linear
                lin.vars.extend(row + [xa[i]])
                lin.coeffs.extend([1] * len(row) + [-1])
                lin.domain.extend([0, 0])
            for j in range(cols):
                col = [ev[i][j] for i in range(rows) if ev[i][j] >= 0]
                lin = proto.constraints.add().linear
                lin.vars.extend(col + [xb[j]])
                lin.coeffs.extend([1] * len(col) + [-1])
                lin.domain.extend([0, 0])
            continue
        for i, j in zip(*np.nonzero(coeffs != 0)):
            c = int(coeffs[i, j])
            if c < 0:  # forbidden pair: s_a[i] + s_b[j] <= 1
                ct = proto.constraints.add()
                ct.bool_or.literals.extend([-xa[i] - 1, -xb[j] - 1])
                n_forbidden += 1
            else:  # e >= s_a[i] + s_b[j] - 1
                e = new_bool()
                n_pair_vars += 1
                ct = proto.constraints.add()
                ct.bool_or.literals.extend([-xa[i] - 1, -xb[j] - 1, e])
                obj_vars.append(e)
                obj_coeffs.append(c)
                pair_index.append((e, a, int(i), b, int(j)))
    proto.objective.vars.extend(obj_vars)
    proto.objective.coeffs.extend(obj_coeffs)

    mem_unit = 1.0
    if red.mem_limit is not None:
        mins = {v: float(red.mem[v].min()) for v in nodes}
        slack = red.mem_limit - red.mem_offset - math.fsum(mins.values())
        extra = {v: red.mem[v] - mins[v] for v in nodes}
        total = math.fsum(float(e.max()) for e in extra.values())
        # a power of two, so that integral byte counts stay exact while the total stays <= 2^40
        mem_unit = 2.0 ** math.ceil(math.log2(total / 2.0**40)) if total > 0 else 1.0
        ct = proto.constraints.add()
        lin = ct.linear
        for v in nodes:
            co = np.ceil(extra[v] / mem_unit).astype(np.int64)
            for i, c in enumerate(co):
                if c:
                    lin.vars.append(x[v][i])
                    lin.coeffs.append(int(c))
        lin.domain.extend([0, int(math.floor(slack / mem_unit))])
        stats["memory_unit_bytes"] = mem_unit

    if hint is not None:
        for v in nodes:
            for i, var in enumerate(x[v]):
                proto.solution_hint.vars.append(var)
                proto.solution_hint.values.append(1 if hint[v] == i else 0)
        for var, a, i, b, j in pair_index:
            proto.solution_hint.vars.append(var)
            proto.solution_hint.values.append(1 if (hint[a] == i and hint[b] == j) else 0)

    stats.update(
        cp_vars=nvars,
        cp_constraints=len(proto.constraints),
        cp_pair_vars=n_pair_vars,
        cp_forbidden_pairs=n_forbidden,
        scale=scale,
        rounding_bound_s=n_terms / scale,
        linearisation=_LINEARISATION,
        subsolvers=list(_SUBSOLVERS),
    )

    class _Cb(cp_model.CpSolverSolutionCallback):
        def on_solution_callback(self) -> None:
            obj = offset + red.offset + self.ObjectiveValue() / scale
            progress(f"cp-sat: objective {obj:.4g} s after {time.perf_counter() - t0:.1f} s")

    stats["build_time_s"] = time.perf_counter() - t0 - stats.get("presolve_time_s", 0.0)
    if progress is not None:
        progress(f"cp-sat: {nvars} vars, {len(proto.constraints)} constraints, {workers} workers")
    best: list[int] | None = None  # full assignment of the best solution so far
    best_obj = lb = None
    status_name = "UNKNOWN"
    phases = []
    wall = dtime = 0.0
    wall_hit = False
    for frac, extra in _PHASES:
        solver = cp_model.CpSolver()
        prm = solver.parameters
        prm.num_workers = max(1, int(workers))
        prm.interleave_search = True
        prm.random_seed = _SEED
        prm.subsolvers.extend(_SUBSOLVERS)
        prm.cp_model_probing_level = 0
        for key, val in extra.items():
            setattr(prm, key, val)
        prm.max_deterministic_time = frac * float(time_limit_s)
        prm.max_time_in_seconds = _WALL_SAFETY_FACTOR * frac * float(time_limit_s) + 30.0
        if best is not None:  # continue from the previous phase: its solution and bounds
            proto.clear_solution_hint()
            proto.solution_hint.vars.extend(range(nvars))
            proto.solution_hint.values.extend(best)
            proto.objective.domain.clear()
            proto.objective.domain.extend([lb, best_obj])
        status = solver.solve(model, _Cb()) if progress is not None else solver.solve(model)
        wall += solver.wall_time
        dtime += solver.deterministic_time
        wall_hit |= solver.wall_time >= prm.max_time_in_seconds * 0.99
        phases.append((solver.status_name(status), round(solver.deterministic_time, 3)))
        if status == cp_model.INFEASIBLE and best is None:
            raise _Infeasible("cp-sat")
        if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            obj = int(round(solver.objective_value))
            if best is None or obj <= best_obj:
                best = [int(val) for val in solver.response_proto.solution]
                best_obj = obj
            bound = int(math.ceil(solver.best_objective_bound - 1e-6))
            lb = bound if lb is None else max(lb, bound)
            status_name = "OPTIMAL" if (status == cp_model.OPTIMAL or lb >= best_obj) else "FEASIBLE"
            if status_name == "OPTIMAL":
                break
    stats.update(
        cp_wall_time_s=wall,
        cp_deterministic_time=dtime,
        cp_phases=phases,
        cp_status=status_name,
        wall_limit_hit=wall_hit,
    )
    if best is None:
        return None, "UNKNOWN"
    stats["cp_objective_s"] = offset + red.offset + best_obj / scale
    stats["cp_bound_s"] = offset + red.offset + min(lb, best_obj) / scale
    loc = {v: next(i for i, var in enumerate(x[v]) if best[var]) for v in nodes}
    return loc, status_name


# --------------------------------------------------------------------------------------------------
# Explanations
# --------------------------------------------------------------------------------------------------


def _fmt_bytes(b: float) -> str:
    return f"{b / _GB:.2f} GB ({b:.0f} bytes)"


def _memory_range(p: ShardingProblem, v: int) -> tuple[float, float] | None:
    """(least, most) memory of node v's allowed (finite-cost) strategies; None if it has none."""
    m = np.asarray(p.node_memory[v], dtype=np.float64)
    ok = np.isfinite(np.asarray(p.node_costs[v], dtype=np.float64))
    return (float(m[ok].min()), float(m[ok].max())) if ok.any() else None


def check_memory_floor(node_costs, node_memory, names, limit: float) -> None:
    """InfeasibleError (the message ``solve`` would give) when Σ_v min_i m_v,i over allowed
    strategies exceeds ``limit``: a test on the nodes alone, before any edge is priced. A node
    with no allowed strategy counts 0 here; ``solve`` explains it."""
    p = ShardingProblem(node_costs=node_costs, node_memory=node_memory, edges=[], edge_costs=[],
                        memory_limit=limit, names=names)
    spans = [_memory_range(p, v) for v in range(p.num_nodes)]
    need = math.fsum(span[0] for span in spans if span)
    if need > limit:
        raise InfeasibleError(_memory_message(p, limit, "memory limit cannot be met"), need)


def _memory_message(p: ShardingProblem, limit: float, lead: str) -> str:
    mins = []
    for v in range(p.num_nodes):
        span = _memory_range(p, v)  # a node with no allowed strategy: its least of all
        mins.append(span[0] if span else float(np.min(p.node_memory[v])))
    need = math.fsum(mins)
    order = sorted(range(p.num_nodes), key=lambda v: (-mins[v], v))[:5]
    top = ", ".join(f"{p.name(v)} {mins[v] / _GB:.2f} GB" for v in order if mins[v] > 0)
    return (
        f"{lead}: the smallest strategies of all nodes together need {_fmt_bytes(need)} per "
        f"device, more than the limit of {_fmt_bytes(limit)}. Largest contributors (their smallest "
        f"strategy): {top or 'none'}."
    )


def _explain(p: ShardingProblem) -> str:
    """Why no choice is feasible: memory lower bound, dead nodes, or an unsat core of edges."""
    limit = p.memory_limit if p.memory_limit is not None and math.isfinite(p.memory_limit) else None
    for v in range(p.num_nodes):
        if not np.isfinite(np.asarray(p.node_costs[v], dtype=np.float64)).any():
            return f"{p.name(v)} has no allowed strategy: every node cost is inf."
    if limit is not None:
        mins = [
            float(np.asarray(p.node_memory[v])[np.isfinite(np.asarray(p.node_costs[v]))].min())
            for v in range(p.num_nodes)
        ]
        if math.fsum(mins) > limit:
            return _memory_message(p, limit, "memory limit cannot be met")
    from ortools.sat.python import cp_model

    model = cp_model.CpModel()
    x = []
    for v in range(p.num_nodes):
        c = np.asarray(p.node_costs[v], dtype=np.float64)
        xs = [model.new_bool_var(f"s{v}_{i}") for i in range(len(c))]
        model.add_exactly_one(xs)
        for i in range(len(c)):
            if not np.isfinite(c[i]):
                model.add(xs[i] == 0)
        x.append(xs)
    lits = {}
    for e, ((u, v), r) in enumerate(zip(p.edges, p.edge_costs)):
        r = np.asarray(r, dtype=np.float64)
        bad = np.argwhere(~np.isfinite(r))
        if len(bad) == 0:
            continue
        lit = model.new_bool_var(f"edge{e}")
        lits[lit.index] = ("edge", e)
        for i, j in bad:
            model.add_bool_or([~lit, ~x[u][i], ~x[v][j]])
        model.add_assumption(lit)
    if limit is not None:
        lit = model.new_bool_var("memory")
        lits[lit.index] = ("memory", None)
        mins_total = []
        terms = []
        for v in range(p.num_nodes):
            m = np.asarray(p.node_memory[v], dtype=np.float64)
            mn = float(m.min())
            mins_total.append(mn)
            terms += [(x[v][i], int(math.ceil(m[i] - mn))) for i in range(len(m)) if m[i] > mn]
        rhs = int(math.floor(limit - math.fsum(mins_total)))
        if terms:
            model.add(cp_model.LinearExpr.weighted_sum(
                [xv for xv, _ in terms], [c for _, c in terms]) <= rhs).only_enforce_if(lit)
            model.add_assumption(lit)
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = _SEED
    solver.parameters.max_deterministic_time = 30.0
    status = solver.solve(model)
    if status != cp_model.INFEASIBLE:
        return "no feasible choice was found, and the conflict could not be isolated in time."
    core = [lits[i] for i in solver.sufficient_assumptions_for_infeasibility() if i in lits]
    parts = []
    edge_names = [
        f"{p.name(p.edges[e][0])} -> {p.name(p.edges[e][1])} (edge {e})"
        for kind, e in core
        if kind == "edge"
    ]
    if edge_names:
        parts.append(
            "every choice uses a forbidden (inf) resharding pair on "
            + ("edge " if len(edge_names) == 1 else "one of the edges ")
            + ", ".join(edge_names)
        )
    if any(kind == "memory" for kind, _ in core):
        parts.append(
            f"the memory limit of {_fmt_bytes(limit)} per device cannot be met"
            + (" together with those forbidden pairs" if edge_names else "")
        )
    return "; ".join(parts) + "." if parts else "no feasible choice exists."


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def fold_copies(problem: ShardingProblem, copies: list) -> tuple[ShardingProblem, list[int]]:
    r"""Tie repeated layers: the problem in which every copy of a layer takes its representative's
    strategies, and ``rep`` (node of ``problem`` -> node of the folded problem).

    ``copies`` is a list of classes; a class is a list of layers of equal length, each a list of
    node ids, position ``j`` of every layer being the same op with the same strategy list (layer 0
    is the representative).  With ``m(v)`` a node's representative, the folded problem has::

        c'_m(v) += c_v,   m'_m(v) += m_v                      for every node v
        R'_(m(u),m(v)) += R_uv                                 for every edge with m(u) ≠ m(v)
        c'_m(v)[i] += R_uv[i, i]                               for every edge with m(u) = m(v)

    (the last: an edge between two copies of one position, both taking strategy i).  For every
    tied choice the two objectives, and the two memory sums, are term-by-term equal: solving the
    folded problem is exact over tied choices, and the inter-layer edges are all still priced.
    """
    rep = list(range(problem.num_nodes))
    for cls in copies:
        for layer in cls[1:]:
            for v, r in zip(layer, cls[0]):
                rep[v] = r
    keep = sorted(set(rep))
    index = {v: i for i, v in enumerate(keep)}
    costs = [np.zeros(len(problem.node_costs[v])) for v in keep]
    memory = [np.zeros(len(problem.node_memory[v])) for v in keep]
    for v in range(problem.num_nodes):
        costs[index[rep[v]]] = costs[index[rep[v]]] + problem.node_costs[v]
        memory[index[rep[v]]] = memory[index[rep[v]]] + problem.node_memory[v]
    edges, edge_costs = [], []
    for (u, v), r in zip(problem.edges, problem.edge_costs):
        a, b = index[rep[u]], index[rep[v]]
        if a == b:
            costs[a] = costs[a] + np.diagonal(r)
        else:
            edges.append((a, b))
            edge_costs.append(r)
    names = [problem.name(v) for v in keep] if problem.names is not None else None
    folded = ShardingProblem(costs, memory, edges, edge_costs, problem.memory_limit, names)
    return folded, [index[r] for r in rep]


def solve(
    problem: ShardingProblem,
    *,
    time_limit_s: float = 20.0,
    workers: int = 2,
    progress: Callable[[str], None] | None = None,
    copies: list | None = None,
) -> Solution:
    r"""Choose one strategy per node minimising the total time, within the memory limit.

    Solves::

        min_{s,e}  Σ_v s_vᵀ c_v + Σ_(u,v) ⟨e_uv, R_uv⟩
        s.t.       Σ_i s_v[i] = 1                        ∀v,   s_v ∈ {0,1}^{k_v}
                   Σ_j e_uv[i,j] = s_u[i],  Σ_i e_uv[i,j] = s_v[j]     ∀(u,v), i, j
                   e_uv[i,j] = 0                         where R_uv[i,j] = inf
                   Σ_v s_vᵀ m_v ≤ M                      if problem.memory_limit = M is set

    after the exact reductions of the module docstring; a problem that reduces away entirely (a
    forest without an active memory limit, or whose unconstrained DP optimum fits the limit) is
    solved by dynamic programming alone.  Otherwise a greedy + block-coordinate-descent heuristic
    builds a hint and CP-SAT solves the remaining core (see ``_PHASES``).

    ``time_limit_s`` bounds CP-SAT's deterministic time, not wall time (see the module docstring);
    ``workers`` is CP-SAT's thread count.  ``progress``, if callable, gets short status strings.
    ``status`` is "OPTIMAL" only when optimality was proven (by the reductions or by CP-SAT, up to
    ``stats["rounding_bound_s"]``); otherwise "FEASIBLE", and ``stats["cp_bound_s"]`` is a proven
    lower bound on the objective.

    Raises InfeasibleError when no choice meets the memory limit or avoids the forbidden pairs,
    with an explanation (minimum memory vs. limit and the largest contributors, or the edges).

    ``copies`` (repeated layers, see :func:`fold_copies`) ties every copy of a layer to its
    representative's strategies: the folded problem is solved and its choice copied back; the
    objective is still evaluated on the whole problem.
    """
    if copies:
        t0 = time.perf_counter()
        folded, rep = fold_copies(problem, copies)
        say = progress if callable(progress) else (lambda _msg: None)
        say(f"dedup: {sum(len(c) for c in copies)} repeated layers in {len(copies)} class(es): "
            f"{problem.num_nodes} -> {folded.num_nodes} nodes")
        sol = solve(folded, time_limit_s=time_limit_s, workers=workers, progress=progress)
        choice = [sol.choice[r] for r in rep]
        stats = {**sol.stats, "nodes_in": problem.num_nodes, "edges_in": len(problem.edges),
                 "folded_nodes": folded.num_nodes, "repeated_layers": sum(len(c) for c in copies)}
        return Solution(choice, evaluate(problem, choice), sol.status, time.perf_counter() - t0, stats)
    t0 = time.perf_counter()
    problem.validate()
    say = progress if callable(progress) else (lambda _msg: None)
    n = problem.num_nodes
    n_edges_in = len(problem.edges)
    stats: dict = {"nodes_in": n, "edges_in": n_edges_in}
    if n == 0:
        return Solution([], 0.0, "OPTIMAL", time.perf_counter() - t0, {**stats, "solver": "trivial"})

    limit = problem.memory_limit
    mem_limit = None
    if limit is not None:
        los, his = [], []
        for v in range(n):
            span = _memory_range(problem, v)
            if span is None:
                raise InfeasibleError(_explain(problem))
            los.append(span[0])
            his.append(span[1])
        lo, hi = math.fsum(los), math.fsum(his)
        if lo > limit:
            raise InfeasibleError(_memory_message(problem, limit, "memory limit cannot be met"), lo)
        mem_limit = None if hi <= limit else float(limit)
        stats["memory_constraint"] = "active" if mem_limit is not None else "slack"

    red = _Reduced(problem, mem_limit)
    stats["edges_merged"] = len(red.R)
    try:
        red.run(eliminate=mem_limit is None)
    except _Infeasible:
        raise InfeasibleError(_explain(problem)) from None
    nodes = red.live()
    t_pre = time.perf_counter()
    stats.update(
        nodes_after=len(nodes),
        edges_after=len(red.R),
        strategies_in=int(sum(len(c) for c in problem.node_costs)),
        strategies_after=int(sum(len(red.dom[v]) for v in nodes)),
        presolve_time_s=t_pre - t0,
    )
    say(
        f"presolve: {n} -> {len(nodes)} nodes, {n_edges_in} -> {len(red.R)} edges "
        f"({t_pre - t0:.2f} s)"
    )

    free_choice = None
    if nodes and mem_limit is not None:
        # The unconstrained problem may be a forest: if its DP optimum fits, it is optimal here too.
        free = _Reduced(problem, None)
        try:
            free.run(eliminate=True)
        except _Infeasible:
            raise InfeasibleError(_explain(problem)) from None
        if not free.live():
            free_choice = free.back_substitute({})
            if peak_memory(problem, free_choice) <= limit:
                red, nodes = free, []
                say("dp: the unconstrained optimum meets the memory limit")

    if not nodes:
        choice = red.back_substitute({})
        stats["solver"] = "dp" if (mem_limit is None or free_choice is not None) else "presolve"
        status = "OPTIMAL"
    else:
        rounds = max(40, int(_LOCAL_SEARCH_ROUNDS_PER_S * time_limit_s))
        init = None
        if free_choice is not None and all(free_choice[v] in red.dom[v] for v in nodes):
            init = {v: int(np.searchsorted(red.dom[v], free_choice[v])) for v in nodes}
        hint = _greedy_hint(red, nodes, init)
        stats["hint"] = hint is not None
        if hint is not None:
            stats["greedy_objective_s"] = red.offset + _core_cost(red, nodes, hint)
            hint = _tree_search(red, nodes, hint, rounds, _LOCAL_SEARCH_PATIENCE)
        stats["heuristic_time_s"] = time.perf_counter() - t_pre
        if hint is not None:
            stats["hint_objective_s"] = red.offset + _core_cost(red, nodes, hint)
            say(f"heuristic: objective {stats['hint_objective_s']:.4g} s after "
                f"{time.perf_counter() - t0:.2f} s")
        try:
            loc, status = _cpsat(red, nodes, hint, time_limit_s, workers, progress, t0, stats)
        except _Infeasible:
            raise InfeasibleError(_explain(problem)) from None
        stats["solver"] = "cp-sat"
        if loc is None:
            if hint is None:
                raise AutoparError(
                    f"intra-op solver found no feasible choice within {time_limit_s} s of "
                    f"deterministic time ({len(nodes)} nodes after presolve); raise time_limit_s"
                )
            loc, status = hint, "FEASIBLE"
            stats["solver"] = "greedy (cp-sat found nothing)"
        elif status == "FEASIBLE":  # polish CP-SAT's solution with the same block moves
            loc = _tree_search(red, nodes, loc, rounds, _LOCAL_SEARCH_PATIENCE)
        if hint is not None and _core_cost(red, nodes, hint) < _core_cost(red, nodes, loc):
            loc = hint  # equal after integer rounding, better in float
        choice = red.back_substitute({v: int(red.dom[v][loc[v]]) for v in nodes})

    objective = evaluate(problem, choice)
    if not math.isfinite(objective):  # pragma: no cover - would be a solver bug
        raise AssertionError("intra-op solver returned a choice with a forbidden pair")
    if limit is not None:
        used = peak_memory(problem, choice)
        stats["memory_bytes"] = used
        if used > limit:  # pragma: no cover - would be a solver bug
            raise AssertionError(f"intra-op solver exceeded the memory limit: {used} > {limit}")
    dt = time.perf_counter() - t0
    say(f"{stats['solver']}: {status} objective {objective:.4g} s after {dt:.2f} s")
    return Solution(choice, objective, status, dt, stats)
