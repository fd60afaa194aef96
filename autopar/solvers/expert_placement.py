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

Model, :func:`solve_placement`
------------------------------
    x[l, e, g] ∈ {0, 1},  Σ_g x[l, e, g] = 1          ∀ l, e      (every expert once)
    Σ_e x[l, e, g] = E/G                              ∀ l, g      (equal shards: ``Placement.permutation``)
    Σ_e c[l, e]·x[l, e, g] ≤ M_l                      ∀ l, g      (M_l: the layer's max load)
    min  cross/T + w·(1/L)·Σ_l M_l/m_l
    cross/T = 1 − (1/T)·Σ_l Σ_{i,j} t[l, i, j]·Σ_g x[l, i, g]·x[l+1, j, g]

T = Σ t, m_l = Σ_e c[l, e]/G (the mean load) and w = ``balance_weight``: a 1-point cut of the
cross-device share is worth a 1/w-point cut of the mean max/mean load ratio.  Per-layer maxima are
summed, not the global max, because a step waits for the slowest device of every layer.  With
top-k > 1 about (k−1)/k of the pairs join two picks that only share a device by luck, so the
cross-device share has a floor well above 0 whatever the placement.

The products x·x make the model quadratic.  Linearised (s[l,i,j,g] ≤ x[l,i,g], s ≤ x[l+1,j,g],
maximise Σ t·s over each expert's 3–4 heaviest partners), the 8 layers × 64 experts × 8 devices
instance has 15,000–18,000 Booleans, and CP-SAT (2 workers, 8 s) barely moved a greedy hint.  So it is
solved in two phases:

1. Block-coordinate descent on exact subproblems.  With every layer but l fixed the objective is
   linear in x[l, ·, ·] (gain[e, g]: the t pairs of e with its neighbours on device g in layers
   l ± 1), a 512-Boolean multi-knapsack that CP-SAT mostly solves to optimality
   within its 0.2 deterministic s.  Sweeps over the
   layers repeat until one improves nothing; a step is kept only when the exact objective drops.
   The start is greedy: LPT with E/G slots per device at layer 0, then each expert of layer l+1,
   heaviest first, to the device holding most of its layer-l traffic unless that overloads it.
2. If the linearisation is exact ((L−1)·E²·G ≤ 16384 products, e.g. small test instances), the
   joint model hinted with phase 1's answer for the time left: there it finds the brute-force
   optimum that phase 1 can miss by a few %.  On larger instances (only the few heaviest partners
   fit) it did not improve phase 1 in the time left, so it is skipped.

Loads are rescaled to 1000·G units per layer and both terms multiplied by 10⁶ for CP-SAT's integer
coefficients.  On the default synthetic trace (8 × 64, 8 devices) phase 1 converges in 2–4 s on 2
cores with every layer's max load within 3% of the bound max(m_l, c_max + the E/G − 1 smallest c);
on traces with weaker affinity it keeps improving slowly and stops at ``time_limit_s``.  With
``workers=1`` (the default; 2 workers made phase 1 slower) the result is deterministic whenever
phase 1 converges before the time limit.
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
_JOINT_VARS = 16384  # phase 2 runs when the joint model has at most this many products (L−1)·E²·G
_STEP_DTIME = 0.2  # deterministic seconds per layer subproblem (most of 64 experts x 8 devices end OPTIMAL)


def _as_counts(name: str, v) -> np.ndarray:
    """``v`` as an int64 array of non-negative counts (whole floats accepted)."""
    try:
        f = np.asarray(v, dtype=float)
    except (ValueError, TypeError) as e:
        raise AutoparError(f"RoutingStats.{name} must be a numeric array: {e}") from e
    if not np.isfinite(f).all() or (f < 0).any() or (f != np.rint(f)).any():
        raise AutoparError(f"RoutingStats.{name} must hold non-negative whole token counts")
    return f.astype(np.int64)


@dataclass
class RoutingStats:
    """Routing profile: ``counts`` [L, E], ``transitions`` [L-1, E, E] (module docstring), over ``tokens`` tokens."""

    counts: np.ndarray
    transitions: np.ndarray
    tokens: int
    top_k: int
    # optional [L, S, E]: counts[l, e] split over S equal, contiguous slices of the profiled tokens
    # (the token shards of S data-parallel ranks): what each rank sends where
    shard_counts: np.ndarray | None = None

    def __post_init__(self):
        self.counts, self.transitions = _as_counts("counts", self.counts), _as_counts("transitions", self.transitions)
        if self.counts.ndim != 2 or self.counts.shape[0] < 1 or self.counts.shape[1] < 1:
            raise AutoparError(f"RoutingStats.counts must have shape [layers, experts], got {self.counts.shape}")
        L, E = self.counts.shape
        if self.transitions.shape != (L - 1, E, E):
            raise AutoparError(f"RoutingStats.transitions must have shape [layers-1, experts, experts] = "
                               f"{(L - 1, E, E)} for counts of shape {(L, E)}, got {self.transitions.shape}")
        if int(self.top_k) < 1 or int(self.tokens) < 0:
            raise AutoparError(f"RoutingStats needs top_k >= 1 and tokens >= 0, got {self.top_k}, {self.tokens}")
        self.tokens, self.top_k = int(self.tokens), int(self.top_k)
        if self.shard_counts is not None:
            self.shard_counts = _as_counts("shard_counts", self.shard_counts)
            if self.shard_counts.ndim != 3 or self.shard_counts.shape[::2] != (L, E) or \
                    not np.array_equal(self.shard_counts.sum(1), self.counts):
                raise AutoparError(f"RoutingStats.shard_counts must have shape [layers, shards, experts] and sum "
                                   f"over shards to counts; got shape {self.shard_counts.shape}")

    @property
    def layers(self) -> int:
        return self.counts.shape[0]

    @property
    def experts(self) -> int:
        return self.counts.shape[1]

    def to_json(self) -> dict:
        doc = {"version": 1, "tokens": self.tokens, "top_k": self.top_k, "counts": self.counts.tolist(),
               "transitions": self.transitions.tolist()}
        if self.shard_counts is not None:
            doc["shard_counts"] = self.shard_counts.tolist()
        return doc

    @classmethod
    def from_json(cls, d: dict) -> "RoutingStats":
        if not isinstance(d, dict) or d.get("version") != 1:
            got = d.get("version") if isinstance(d, dict) else type(d).__name__
            raise AutoparError(f"not a version-1 RoutingStats document (version {got!r})")
        try:
            counts, trans = np.asarray(d["counts"]), np.asarray(d["transitions"])
            if trans.size == 0 and counts.ndim == 2:  # one layer: [] stands for shape [0, E, E]
                trans = trans.reshape(0, counts.shape[1], counts.shape[1])
            return cls(counts, trans, d["tokens"], d["top_k"],
                       np.asarray(d["shard_counts"]) if d.get("shard_counts") is not None else None)
        except (KeyError, ValueError, TypeError) as e:
            raise AutoparError(f"malformed RoutingStats document: {e}") from e

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path) -> "RoutingStats":
        try:
            doc = json.loads(Path(path).read_text())
        except OSError as e:
            raise AutoparError(f"cannot read routing statistics {str(path)!r}: {e.strerror or e}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AutoparError(f"routing statistics {str(path)!r} are not JSON ({e}); save them with "
                               "RoutingStats.save") from None
        return cls.from_json(doc)


def synthetic_routing(layers: int = 8, experts: int = 64, tokens: int = 16384, top_k: int = 2, skew: float = 0.6,
                      affinity: float = 0.9, seed: int = 0) -> RoutingStats:
    """Sampled token paths with skewed popularity and inter-layer affinity.

    Layer l's popularity is Zipf, p[l, σ_l(r)] ∝ (r+1)^-skew for a random permutation σ_l.  Layer 0's
    top-k picks are drawn without replacement from p[0] (Gumbel top-k).  At layer l+1 each pick i is
    kept as its partner π_l(i) with probability ``affinity`` (π_l a random permutation), and the
    remaining slots are drawn from p[l+1] without replacement among the other experts."""
    if not 1 <= top_k <= experts or layers < 1 or tokens < 0:
        raise AutoparError("synthetic_routing needs layers >= 1, tokens >= 0 and 1 <= top_k <= experts")
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
        if len({len(row) for row in self.assignment}) > 1:
            raise AutoparError("every layer must have the same number of experts, got "
                               f"{[len(r) for r in self.assignment]}")
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


def _layer_step(c: np.ndarray, gain: np.ndarray, G: int, w_m: float, hint: np.ndarray, workers: int,
                deadline: float) -> np.ndarray | None:
    """One layer's exact subproblem: max Σ gain·x − w_m·M over x[e, g] with E/G experts a device and
    load ≤ M (the other layers fixed); None if CP-SAT found nothing."""
    from ortools.sat.python import cp_model

    E = len(c)
    m = cp_model.CpModel()
    x = [[m.new_bool_var(f"x{e}_{g}") for g in range(G)] for e in range(E)]
    big = m.new_int_var(0, int(c.sum()), "M")
    for e in range(E):
        m.add_exactly_one(x[e])
        for g in range(G):
            m.add_hint(x[e][g], bool(hint[e] == g))
    for g in range(G):
        m.add(sum(x[e][g] for e in range(E)) == E // G)
        m.add(sum(int(c[e]) * x[e][g] for e in range(E)) <= big)
    m.add_hint(big, int(np.bincount(hint, weights=c, minlength=G).max()))
    m.minimize(int(round(w_m)) * big - sum(int(gain[e, g]) * x[e][g] for e in range(E) for g in range(G) if gain[e, g]))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers, solver.parameters.random_seed = workers, _SEED
    solver.parameters.max_deterministic_time = _STEP_DTIME
    solver.parameters.max_time_in_seconds = max(deadline - time.perf_counter(), 0.01)
    if solver.solve(m) not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    return np.array([next(g for g in range(G) if solver.value(x[e][g])) for e in range(E)])


def _joint_step(stats: RoutingStats, cq: np.ndarray, G: int, w: float, hint: np.ndarray, workers: int,
                deadline: float) -> np.ndarray | None:
    """The whole model, every product with t > 0 linearised, hinted with ``hint``; None if CP-SAT found nothing."""
    from ortools.sat.python import cp_model

    (L, E), t = cq.shape, stats.transitions
    tot = max(int(t.sum()), 1)
    m = cp_model.CpModel()
    x = {(l, e, g): m.new_bool_var(f"x{l}_{e}_{g}") for l in range(L) for e in range(E) for g in range(G)}
    obj = []
    for l in range(L):
        big = m.new_int_var(0, int(cq[l].sum()), f"M{l}")
        m.add_hint(big, int(np.bincount(hint[l], weights=cq[l], minlength=G).max()))
        obj.append(int(round(_SCALE * w * G / (L * max(int(cq[l].sum()), 1)))) * big)
        for e in range(E):
            m.add_exactly_one(x[l, e, g] for g in range(G))
        for g in range(G):
            m.add(sum(x[l, e, g] for e in range(E)) == E // G)
            m.add(sum(int(cq[l, e]) * x[l, e, g] for e in range(E)) <= big)
    for (l, e, g), v in x.items():
        m.add_hint(v, bool(hint[l, e] == g))
    for l in range(L - 1):
        for i in range(E):
            for j in np.flatnonzero(t[l, i]):
                coef = int(round(_SCALE * t[l, i, j] / tot))
                for g in range(G) if coef else ():
                    s = m.new_bool_var(f"s{l}_{i}_{j}_{g}")
                    m.add_implication(s, x[l, i, g])
                    m.add_implication(s, x[l + 1, j, g])
                    m.add_hint(s, bool(hint[l, i] == g == hint[l + 1, j]))
                    obj.append(-coef * s)
    m.minimize(sum(obj))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers, solver.parameters.random_seed = workers, _SEED
    solver.parameters.max_time_in_seconds = max(deadline - time.perf_counter(), 0.01)
    status = solver.solve(m)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    return np.array([[next(g for g in range(G) if solver.value(x[l, e, g])) for e in range(E)] for l in range(L)])


def solve_placement(stats: RoutingStats, devices: int, *, time_limit_s: float = 8.0, balance_weight: float = 1.0,
                    workers: int = 1, progress: Callable[[float, float], None] | None = None,
                    max_sweeps: int = 20, joint: bool = True) -> Placement:
    """The best placement found in ``time_limit_s`` for the module docstring's objective.

    ``progress(elapsed_s, objective)`` is called on the greedy start and on every improvement
    (objective: cross-device fraction + balance_weight·mean over layers of max/mean load).
    ``max_sweeps`` caps phase 1's sweeps over the layers; ``joint=False`` skips phase 2.
    AutoparError if ``devices`` does not divide the expert count."""
    L, E, G = stats.layers, stats.experts, int(devices)
    _check_split(E, G)
    if G == 1:
        return Placement(1, [[0] * E for _ in range(L)])
    t0, w = time.perf_counter(), float(balance_weight)
    c, t = stats.counts, stats.transitions
    tot = max(int(t.sum()), 1)
    cq = np.rint(c * (1000 * G) / np.maximum(c.sum(axis=1, keepdims=True), 1)).astype(np.int64)
    a = _greedy(c.astype(float), t.astype(float), G, w)
    best = _objective(stats, a, G, w)
    if progress is not None:
        progress(time.perf_counter() - t0, best)
    for _ in range(max_sweeps):
        improved = False
        for l in range(L):
            left = time_limit_s - (time.perf_counter() - t0)
            if left <= 0:
                return Placement(G, a.tolist())
            gain = np.zeros((E, G))  # pairs kept on device g by putting e there, the neighbours fixed
            for g in range(G):
                if l > 0:
                    gain[:, g] += t[l - 1][a[l - 1] == g].sum(axis=0)
                if l < L - 1:
                    gain[:, g] += t[l][:, a[l + 1] == g].sum(axis=1)
            w_m = _SCALE * w * G / (L * max(int(cq[l].sum()), 1))
            new = _layer_step(cq[l], np.rint(_SCALE * gain / tot), G, w_m, a[l], workers, t0 + time_limit_s)
            if new is None:
                continue
            b = a.copy()
            b[l] = new
            score = _objective(stats, b, G, w)
            if score < best - 1e-12:
                a, best, improved = b, score, True
                if progress is not None:
                    progress(time.perf_counter() - t0, best)
        if not improved:
            break
    left = time_limit_s - (time.perf_counter() - t0)
    if joint and left > 0 and _JOINT_VARS >= (L - 1) * E * E * G:  # exact linearisation only (see docstring)
        got = _joint_step(stats, cq, G, w, a, workers, t0 + time_limit_s)
        if got is not None and _objective(stats, got, G, w) < best - 1e-12:
            a, best = got, _objective(stats, got, G, w)
            if progress is not None:
                progress(time.perf_counter() - t0, best)
    return Placement(G, a.tolist())
