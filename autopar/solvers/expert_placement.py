r"""Expert placement for expert parallelism: balance (MoETuner) and inter-layer affinity (ExFlow).

The solver sees numbers, never torch.  An MoE model has L MoE layers of E experts each, and G
expert-parallel devices; a :class:`RoutingStats` profile gives, per layer l,

    c[l, e]        tokens routed to expert e (each of a token's top-k picks counts once)
    t[l, i, j]     tokens routed to i at layer l and to j at layer l+1: a token with picks S_l and
                   S_{l+1} adds 1 to every pair in S_l × S_{l+1} (k² pairs), so Σ_j t[l, i, j] = k·c[l, i]

A placement is x[l, e, g] ∈ {0, 1} (expert e of layer l lives on device g).  :func:`predict` prices
it with

    cross  = Σ_l Σ_{i,j} t[l, i, j]·[dev(l, i) ≠ dev(l+1, j)]      (token pairs that change device)
    load[l, g] = Σ_e c[l, e]·x[l, e, g]
    max_device_load = max_l max_g load[l, g]                       (the worst device of the worst layer)

The contiguous placement (expert e on device ⌊e/(E/G)⌋) is what plain sharding of the expert dim
gives, i.e. what the runtime does without a plan; it is the baseline.

Model (CP-SAT), :func:`solve_placement`
---------------------------------------
    Σ_g x[l, e, g] = 1                 ∀ l, e      (every expert once)
    Σ_e x[l, e, g] = E/G               ∀ l, g      (equal weight shards: ``Placement.permutation``)
    Σ_e ĉ[l, e]·x[l, e, g] ≤ M_l       ∀ l, g      (M_l: the layer's max load)
    s[l, i, j, g] ≤ x[l, i, g],  s[l, i, j, g] ≤ x[l+1, j, g]    ∀ (i, j) ∈ P_l, g
    min  (1/T)·Σ_l Σ_{(i,j) ∈ P_l} t[l, i, j]·(1 − Σ_g s[l, i, j, g]) + w·(1/L)·Σ_l M_l/m_l

T = Σ t (so the first term is the modelled share of cross-device pairs), m_l = Σ_e ĉ[l, e]/G the
mean load and w = ``balance_weight``: a 1% cut of cross-device pairs is worth a 1/w % cut of the
mean max/mean load ratio.  The per-layer maxima are summed (not the global max) because a step
waits for the slowest device of every layer.  ĉ is c rescaled to 1000·G units per layer and both
terms are scaled by 10⁶ to integer coefficients.  P_l keeps, for every i, its heaviest partners j
until they cover ``pair_coverage`` of i's outgoing pairs, at most ``max_pairs`` of them (strong
affinity is concentrated: this keeps the model at a few thousand s without losing traffic).
Devices are interchangeable, so layer 0's r-th heaviest expert may only go to devices ≤ r.  A greedy
placement (LPT at layer 0, then each expert of layer l+1, heaviest first, to the device its layer-l
partners are on, unless that overloads it) is the hint; the best of it and CP-SAT's answer (by the
objective, priced on the full t) is returned.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from autopar.errors import AutoparError

__all__ = ["RoutingStats", "Placement", "synthetic_routing", "contiguous", "round_robin", "predict",
           "solve_placement"]

_SEED = 20240501
_SCALE = 10**6


@dataclass
class RoutingStats:
    """Routing profile: ``counts`` [L, E], ``transitions`` [L-1, E, E] (module docstring), over ``tokens`` tokens."""

    counts: np.ndarray
    transitions: np.ndarray
    tokens: int
    top_k: int

    def __post_init__(self):
        self.counts = np.asarray(self.counts, dtype=np.int64)
        self.transitions = np.asarray(self.transitions, dtype=np.int64)
        if self.counts.ndim != 2 or self.counts.shape[0] < 1 or self.counts.shape[1] < 1:
            raise AutoparError(f"RoutingStats.counts must have shape [layers, experts], got {self.counts.shape}")
        L, E = self.counts.shape
        if self.transitions.shape != (L - 1, E, E):
            raise AutoparError(f"RoutingStats.transitions must have shape [layers-1, experts, experts] = "
                               f"{(L - 1, E, E)} for counts of shape {(L, E)}, got {self.transitions.shape}")
        if (self.counts < 0).any() or (self.transitions < 0).any():
            raise AutoparError("RoutingStats.counts and transitions must be non-negative")
        if int(self.top_k) < 1 or int(self.tokens) < 0:
            raise AutoparError(f"RoutingStats needs top_k >= 1 and tokens >= 0, got {self.top_k}, {self.tokens}")
        self.tokens, self.top_k = int(self.tokens), int(self.top_k)

    @property
    def layers(self) -> int:
        return self.counts.shape[0]

    @property
    def experts(self) -> int:
        return self.counts.shape[1]

    def to_json(self) -> dict:
        return {"version": 1, "tokens": self.tokens, "top_k": self.top_k, "counts": self.counts.tolist(),
                "transitions": self.transitions.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> "RoutingStats":
        if not isinstance(d, dict) or d.get("version") != 1:
            raise AutoparError(f"not a version-1 RoutingStats document (version {d.get('version') if isinstance(d, dict) else None!r})")
        try:
            counts, trans = np.asarray(d["counts"]), np.asarray(d["transitions"])
            if trans.size == 0 and counts.ndim == 2:  # one layer: [] stands for shape [0, E, E]
                trans = trans.reshape(0, counts.shape[1], counts.shape[1])
            return cls(counts, trans, d["tokens"], d["top_k"])
        except (KeyError, ValueError, TypeError) as e:
            raise AutoparError(f"malformed RoutingStats document: {e}") from e

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path) -> "RoutingStats":
        return cls.from_json(json.loads(Path(path).read_text()))


def synthetic_routing(layers: int = 8, experts: int = 64, tokens: int = 16384, top_k: int = 2, skew: float = 1.0,
                      affinity: float = 0.8, seed: int = 0) -> RoutingStats:
    """Sampled token paths with skewed popularity and inter-layer affinity.

    Layer l's popularity is Zipf, p[l, σ_l(r)] ∝ (r+1)^-skew for a random permutation σ_l.  Layer 0's
    top-k picks are drawn without replacement from p[0] (Gumbel top-k).  At layer l+1 each pick i is
    kept as its partner π_l(i) with probability ``affinity`` (π_l a random permutation), and the
    remaining slots are drawn from p[l+1] without replacement among the other experts."""
    if not 1 <= top_k <= experts or layers < 1 or tokens < 0:
        raise AutoparError(f"synthetic_routing needs layers >= 1, tokens >= 0 and 1 <= top_k <= experts")
    rng = np.random.default_rng(seed)
    logp = np.array([np.log((np.arange(experts) + 1.0) ** -skew)[rng.permutation(experts)] for _ in range(layers)])
    partner = np.array([rng.permutation(experts) for _ in range(layers - 1)])
    counts = np.zeros((layers, experts), dtype=np.int64)
    trans = np.zeros((max(layers - 1, 0), experts, experts), dtype=np.int64)
    rows, picks = np.arange(tokens)[:, None], None
    for l in range(layers):
        score = logp[l] + rng.gumbel(size=(tokens, experts))
        if picks is not None:  # forced partners outrank every fresh draw; they are distinct (π is a permutation)
            keep = rng.random(picks.shape) < affinity
            score[np.broadcast_to(rows, picks.shape)[keep], partner[l - 1][picks][keep]] = np.inf
        new = np.argpartition(-score, top_k - 1, axis=1)[:, :top_k]
        counts[l] = np.bincount(new.ravel(), minlength=experts)
        if picks is not None:
            pairs = (picks[:, :, None] * experts + new[:, None, :]).ravel()
            trans[l - 1] = np.bincount(pairs, minlength=experts * experts).reshape(experts, experts)
        picks = new
    return RoutingStats(counts, trans, tokens, top_k)


@dataclass
class Placement:
    """``assignment[l][e]``: the device of expert e of layer l; every device holds E/G experts per layer."""

    devices: int
    assignment: list[list[int]]

    def __post_init__(self):
        self.assignment = [[int(g) for g in row] for row in self.assignment]
        G = self.devices = int(self.devices)
        for l, row in enumerate(self.assignment):
            if G < 1 or len(row) % G:
                raise AutoparError(f"layer {l}: {len(row)} experts do not split evenly over {G} devices")
            held = np.bincount(row, minlength=G) if row and min(row) >= 0 else None
            if held is None or len(held) > G or (held != len(row) // G).any():
                raise AutoparError(f"layer {l}: every one of the {G} devices must hold exactly {len(row) // G} "
                                   f"experts, got per-device counts {None if held is None else held.tolist()}")

    def experts_of(self, layer: int, device: int) -> list[int]:
        """The experts of ``layer`` on ``device``, ascending."""
        return [e for e, g in enumerate(self.assignment[layer]) if g == device]

    def permutation(self, layer: int) -> list[int]:
        """Experts of device 0, then device 1, ...: ``w[perm]`` split into G equal contiguous shards along
        dim 0 gives each device its experts (row r of the permuted tensor is expert perm[r])."""
        return [e for g in range(self.devices) for e in self.experts_of(layer, g)]

    def inverse_permutation(self, layer: int) -> list[int]:
        """inv[e]: the row of expert e in the permuted tensor (device inv[e] // (E/G), local slot inv[e] % (E/G))."""
        inv = [0] * len(self.assignment[layer])
        for r, e in enumerate(self.permutation(layer)):
            inv[e] = r
        return inv

    def to_json(self) -> dict:
        return {"version": 1, "devices": self.devices, "assignment": self.assignment}

    @classmethod
    def from_json(cls, d: dict) -> "Placement":
        if not isinstance(d, dict) or d.get("version") != 1 or "devices" not in d or "assignment" not in d:
            raise AutoparError("not a version-1 Placement document (needs version, devices, assignment)")
        return cls(d["devices"], d["assignment"])


def _check_split(experts: int, devices: int) -> None:
    if devices < 1 or experts % devices:
        raise AutoparError(f"{experts} experts cannot be split evenly over {devices} devices; "
                           f"expert parallelism needs a device count dividing the expert count")


def contiguous(layers: int, experts: int, devices: int) -> Placement:
    """Expert e on device e // (E/G): plain sharding of the expert dim, the runtime's default."""
    _check_split(experts, devices)
    return Placement(devices, [[e // (experts // devices) for e in range(experts)] for _ in range(layers)])


def round_robin(layers: int, experts: int, devices: int) -> Placement:
    """Strided: expert e on device e % G."""
    _check_split(experts, devices)
    return Placement(devices, [[e % devices for e in range(experts)] for _ in range(layers)])


def predict(stats: RoutingStats, placement: Placement) -> dict:
    """Cross-device token pairs and device loads (module docstring) of ``placement`` under ``stats``."""
    a = np.asarray(placement.assignment)
    if a.shape != stats.counts.shape:
        raise AutoparError(f"placement is for {a.shape} layers x experts, the routing stats for {stats.counts.shape}")
    load = np.zeros((stats.layers, placement.devices), dtype=np.int64)
    for l in range(stats.layers):
        np.add.at(load[l], a[l], stats.counts[l])
    total = int(stats.transitions.sum())
    cross = sum(int(stats.transitions[l][a[l][:, None] != a[l + 1][None, :]].sum()) for l in range(stats.layers - 1))
    per_max = load.max(axis=1)
    mean = float(load.mean())
    return {"cross_device_tokens": cross, "total_transitions": total, "cross_device_fraction": cross / max(total, 1),
            "max_device_load": int(per_max.max()), "mean_device_load": mean,
            "per_layer_max_load": per_max.tolist(), "imbalance": float(per_max.max()) / mean if mean else 1.0}


def _objective(stats: RoutingStats, a: np.ndarray, G: int, w: float) -> float:
    """The model's objective (on the full t and exact c) of assignment ``a`` [L, E]."""
    p = predict(stats, Placement(G, a))
    means = np.maximum(stats.counts.sum(axis=1) / G, 1e-9)
    return p["cross_device_fraction"] + w * float(np.mean(np.asarray(p["per_layer_max_load"]) / means))


def _greedy(c: np.ndarray, t: np.ndarray, G: int, w: float) -> np.ndarray:
    """LPT (with E/G slots per device) at layer 0; later layers follow their affinity unless it overloads."""
    L, E = c.shape
    cap, a = E // G, np.zeros((L, E), dtype=np.int64)
    for l in range(L):
        load, slots, mean = np.zeros(G), np.full(G, cap), max(c[l].sum() / G, 1e-9)
        tot = max(t[l - 1].sum(), 1) if l else 1
        for e in np.argsort(-c[l], kind="stable"):
            gain = np.bincount(a[l - 1], weights=t[l - 1][:, e], minlength=G) / tot if l else np.zeros(G)
            over = np.maximum(load + c[l, e] - max(load.max(), mean), 0) / mean
            score = np.where(slots > 0, gain * L - w * over - 1e-6 * load / mean, -np.inf)
            g = int(np.argmax(score))
            a[l, e], load[g], slots[g] = g, load[g] + c[l, e], slots[g] - 1
    return a


def _canonical(a: np.ndarray, order0: np.ndarray) -> np.ndarray:
    """Relabel devices by first appearance along layer 0's ``order0`` (the symmetry breaking's form)."""
    relabel = {}
    for e in order0:
        relabel.setdefault(int(a[0, e]), len(relabel))
    return np.vectorize(relabel.__getitem__)(a)


def solve_placement(stats: RoutingStats, devices: int, *, time_limit_s: float = 8.0, balance_weight: float = 1.0,
                    workers: int = 1, progress: Callable[[float, float], None] | None = None,
                    pair_coverage: float = 0.9, max_pairs: int = 3) -> Placement:
    """The placement minimising the module docstring's objective (best found in ``time_limit_s``).

    ``progress(elapsed_s, objective)`` is called on every improving CP-SAT solution (objective as
    in the module docstring, ≈ cross-device fraction + balance_weight·mean max/mean load)."""
    from ortools.sat.python import cp_model

    L, E, G = stats.layers, stats.experts, int(devices)
    _check_split(E, G)
    if G == 1:
        return Placement(1, [[0] * E for _ in range(L)])
    t0, cap, w = time.perf_counter(), E // G, float(balance_weight)
    tot = max(int(stats.transitions.sum()), 1)
    q = 1000 * G
    cq = np.rint(stats.counts * q / np.maximum(stats.counts.sum(axis=1, keepdims=True), 1)).astype(np.int64)
    order0 = np.argsort(-stats.counts[0], kind="stable")
    hint = _canonical(_greedy(stats.counts.astype(float), stats.transitions.astype(float), G, w), order0)

    m = cp_model.CpModel()
    x = {(l, e, g): m.new_bool_var(f"x{l}_{e}_{g}") for l in range(L) for e in range(E) for g in range(G)}
    for l in range(L):
        for e in range(E):
            m.add_exactly_one(x[l, e, g] for g in range(G))
        for g in range(G):
            m.add(sum(x[l, e, g] for e in range(E)) == cap)
    for r, e in enumerate(order0[:G - 1]):  # symmetry: the r-th heaviest expert of layer 0 on a device ≤ r
        for g in range(r + 1, G):
            m.add(x[0, int(e), g] == 0)
    big = {l: m.new_int_var(0, int(cq[l].sum()), f"M{l}") for l in range(L)}
    for l in range(L):
        for g in range(G):
            m.add(sum(int(cq[l, e]) * x[l, e, g] for e in range(E)) <= big[l])
    kept = []
    for l in range(L - 1):
        for i in range(E):
            row = stats.transitions[l, i]
            js, acc = [], 0
            for j in np.argsort(-row, kind="stable")[:max_pairs]:
                if row[j] == 0 or acc >= pair_coverage * row.sum():
                    break
                js.append(int(j))
                acc += row[j]
            for j in js:
                coef = int(round(_SCALE * row[j] / tot))
                if coef == 0:
                    continue
                for g in range(G):
                    s = m.new_bool_var(f"s{l}_{i}_{j}_{g}")
                    m.add_implication(s, x[l, i, g])
                    m.add_implication(s, x[l + 1, j, g])
                    kept.append((coef, s))
                    m.add_hint(s, bool(hint[l, i] == g and hint[l + 1, j] == g))
    big_coef = {l: int(round(_SCALE * w * G / (L * max(cq[l].sum(), 1)))) for l in range(L)}
    m.minimize(sum(big_coef[l] * big[l] for l in range(L)) - sum(c * s for c, s in kept))
    for (l, e, g), v in x.items():
        m.add_hint(v, bool(hint[l, e] == g))
    for l in range(L):
        m.add_hint(big[l], int(np.bincount(hint[l], weights=cq[l], minlength=G).max()))

    class _Progress(cp_model.CpSolverSolutionCallback):
        def on_solution_callback(self):
            if progress is not None:
                progress(time.perf_counter() - t0, (self.objective_value + sum(c for c, _ in kept)) / _SCALE)

    solver = cp_model.CpSolver()
    solver.parameters.num_workers = max(1, int(workers))
    solver.parameters.random_seed = _SEED
    solver.parameters.max_time_in_seconds = max(0.0, time_limit_s - (time.perf_counter() - t0))
    import os
    solver.parameters.log_search_progress = bool(os.environ.get("EPLOG"))
    status = solver.solve(m, _Progress())
    best = hint
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        got = np.array([[next(g for g in range(G) if solver.value(x[l, e, g])) for e in range(E)] for l in range(L)])
        if _objective(stats, got, G, w) <= _objective(stats, hint, G, w):
            best = got
    return Placement(G, best.tolist())
