"""Per-layer gradient compression under an error budget (L-GreCo, Markov et al. 2024), as an ILP.

Every layer l (one parameter's gradient sync) picks one option o from its menu (none, int8,
top-k at a ratio, PowerSGD at a rank). Option o of layer l has a predicted communication time
c_lo on the layer's data-parallel axis, a codec time k_lo (quantize, select, low-rank products:
compute-stream work that nothing hides) and a measured squared error e_lo = ||C_o(g_l) − g_l||²
on a calibration gradient g_l. With x_lo ∈ {0, 1}:

    minimise    z + Σ_lo k_lo x_lo
    subject to  Σ_o x_lo = 1                                  for every layer l
                z ≥ Σ_lo c_lo x_lo − W,   z ≥ 0               (exposed communication)
                Σ_lo e_lo x_lo ≤ ε² Σ_l ||g_l||²              (error budget)

W is the backward compute the gradient all-reduces overlap with (DDP's buckets run behind the
backward pass), so communication costs only where it exceeds W. Hence the two regimes the model
must get right: on a slow link Σ c_l ≫ W and the solver compresses the layers that save the most
time per unit of error (the large ones: a small layer's all-reduce is latency, which no codec
shrinks, and its codec launches cost more than it saves); on NVLink Σ c_l ≤ W already, every
codec second is pure loss, and nothing is compressed. ε bounds the relative L2 error of the
whole gradient, the quantity error-feedback analyses bound (Karimireddy et al. 2019).

It is a multiple-choice knapsack with one extra continuous variable; CP-SAT solves the models
here (hundreds of layers, a handful of options) to optimality in well under a second. Times are
scaled to integer nanoseconds and errors to integer parts per 10⁹ of the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TIME_UNIT = 1e-9  # seconds per integer unit of the model


@dataclass(frozen=True)
class Option:
    method: str  # "none", "int8", "topk:0.01", "powersgd:4", ...
    comm_s: float  # predicted communication time of this layer's gradient sync with this option
    codec_s: float  # compress + decompress time on the device
    err2: float  # squared L2 error ||C(g) − g||² on the calibration gradient


@dataclass(frozen=True)
class Layer:
    name: str
    norm2: float  # ||g||² of the calibration gradient
    options: tuple  # of Option; options[0] must be "none" (exact, always feasible)


@dataclass
class Choice:
    methods: dict  # layer name -> chosen method
    status: str
    objective_s: float  # exposed communication + codec time
    comm_s: float
    codec_s: float
    rel_error: float  # sqrt(Σ e / Σ ||g||²) of the choice
    solve_time_s: float
    alternatives: dict = field(default_factory=dict)  # layer -> [(method, comm_s, codec_s, rel_err)]


def solve_compression(layers: list[Layer], overlap_s: float, budget: float, *, time_limit_s: float = 5.0) -> Choice:
    """The ILP in the module docstring. ``budget`` is ε, the relative L2 error allowed for the
    whole gradient (0 forbids every lossy option)."""
    import time

    from ortools.sat.python import cp_model

    t0 = time.perf_counter()
    for layer in layers:
        if not layer.options or layer.options[0].method != "none" or layer.options[0].err2 != 0:
            raise ValueError(f"layer {layer.name}: options[0] must be the exact 'none' option")
    m = cp_model.CpModel()
    total_norm2 = sum(layer.norm2 for layer in layers)
    allowed = budget ** 2 * total_norm2
    err_scale = 1e9 / allowed if allowed > 0 else 0.0

    def t(s: float) -> int:
        return int(round(s / TIME_UNIT))

    x = []
    comm_terms, codec_terms, err_terms = [], [], []
    for layer in layers:
        xs = [m.NewBoolVar(f"{layer.name}:{o.method}") for o in layer.options]
        m.AddExactlyOne(xs)
        for var, o in zip(xs, layer.options):
            if o.err2 > 0 and allowed <= 0:
                m.Add(var == 0)
            comm_terms.append(t(o.comm_s) * var)
            codec_terms.append(t(o.codec_s) * var)
            if allowed > 0:
                err_terms.append(int(round(o.err2 * err_scale)) * var)
        x.append(xs)
    if err_terms:
        m.Add(sum(err_terms) <= 10 ** 9)
    bound = sum(max(t(o.comm_s) for o in layer.options) for layer in layers) + 1
    z = m.NewIntVar(0, bound, "exposed")
    m.Add(z >= sum(comm_terms) - t(overlap_s))
    m.Minimize(z + sum(codec_terms))
    solver = cp_model.CpSolver()
    prm = solver.parameters  # deterministic, as in solvers/intra_op.py: interleaved workers, fixed seed, work units
    prm.num_workers, prm.interleave_search, prm.random_seed = 2, True, 20220711  # FACTS.md: two cores here
    prm.max_deterministic_time, prm.max_time_in_seconds = time_limit_s, 10 * time_limit_s + 30  # wall: a safety net
    status = solver.Solve(m)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):  # cannot happen: all-"none" is feasible
        raise RuntimeError(f"compression ILP returned {solver.StatusName(status)}")
    methods, comm, codec, err = {}, 0.0, 0.0, 0.0
    for layer, xs in zip(layers, x):
        o = next(o for var, o in zip(xs, layer.options) if solver.Value(var))
        methods[layer.name] = o.method
        comm, codec, err = comm + o.comm_s, codec + o.codec_s, err + o.err2
    alternatives = {layer.name: [(o.method, o.comm_s, o.codec_s, (o.err2 / layer.norm2) ** 0.5 if layer.norm2 else 0.0)
                                 for o in layer.options] for layer in layers}
    return Choice(methods, solver.StatusName(status).lower(), max(0.0, comm - overlap_s) + codec, comm, codec,
                  (err / total_norm2) ** 0.5 if total_norm2 else 0.0, time.perf_counter() - t0, alternatives)
