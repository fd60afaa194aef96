r"""Why a plan request cannot be met: a z3 model of the request, its unsat core said as a sentence.

Pure numbers in (the caller reads them off the model and mesh), a sentence or ``None`` out.

Model
-----
Integers ``p, d, e, c, t ≥ 1`` (the pp, dp, ep, cp, tp sizes), ``D = p·d·e·c·t``, a boolean ``α``.
Each requirement below is one tracked assertion with a label::

    memory       S_d·e + S_e ≤ (M − α·L)·t·p·e       (S_e = 0: S_d ≤ (M − α·L)·t·p)
    activations  α
    ulysses      c | H                                 context_parallel="ulysses"
    experts      (e > 1 ∧ e | X) ∨ (t > 1 ∧ t | X)     expert_parallel=True
    blocks       p ≤ B                                 stages are runs of whole blocks
    sequence     c | S                                 cp shards the sequence
    batch        p > 1 ⇒ d ≤ G                         a pipeline cuts each dp rank's rows into microbatches
    pp=p₀ ...    a = a₀ for each of the five axes      the mesh the request fixes
    devices=D₀   D = D₀                                or only the device count it fixes

``S_d``: bytes of weights, gradients and optimizer state that only tp and pp split (nothing
shards them over dp or cp: ZeRO is not planned); ``S_e``: the experts' share, which ep splits
too; ``M``: device memory. The memory row is ``S_d/(t·p) + S_e/(t·p·e) + α·L ≤ M``: the state
evenly split is a lower bound of every layout's per-device memory, a pipeline's busiest rank
included. ``L``: when an exact check proved that every layout of the fixed mesh needs ``N`` bytes
per device, ``L = N −`` (the state's even split on that mesh); ``α`` holds ``L`` to that mesh.
Every row is a necessary condition of the planner (never a preference), so *unsat* proves the
request infeasible, and *sat* says nothing. Divisibility is membership in the divisor lists;
with ``D`` fixed every axis ranges over the divisors of ``D``.

Explanation
-----------
The unsat core, shrunk to a minimal one by deletion, names the requirements and the mesh sizes
that together cannot hold. The suggestions drop the blamed mesh assertions (and ``α``, which
holds on the given mesh only), keep the model's facts, and ask z3's Optimize for: the nearest
mesh of the same device count, ``min Σ_a |a − a₀|`` with ``D = D₀``; failing that, with memory
to blame, the least ``p`` with the other axes kept, and the least ``s`` that meets the memory
row with ``t·p = s`` at the given ``e`` (only ``D`` fixed: the least device count, ``e = 1``).
z3 decides each question in milliseconds when the axes are fixed or range over divisors; a
Solver check comes before each Optimize (which proves unsat slowly on products), and every
call has a timeout: an undecided request is not explained, never refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

AXES = ("pp", "dp", "ep", "cp", "tp")


@dataclass(frozen=True)
class Request:
    """A plan request in numbers. ``mesh``: the axes it fixes (a missing one is 1), or ``None``
    with ``devices`` when only the device count is fixed; ``memory``: M, bytes per device;
    ``dense_state`` / ``expert_state``: S_d / S_e (``state`` says what they hold); ``least``: N,
    bytes per device that an exact check proved every layout of ``mesh`` needs. The model's facts
    (None: unknown): ``heads`` H, ``experts`` X, ``blocks`` B, ``seq`` S, ``batch`` G."""

    memory: float
    mesh: dict | None = None
    devices: int | None = None
    hardware: str = ""
    dense_state: float = 0.0
    expert_state: float = 0.0
    state: str = "parameters, gradients and adamw state"
    least: float | None = None
    heads: int | None = None
    experts: int | None = None
    blocks: int | None = None
    seq: int | None = None
    batch: int | None = None
    context_parallel: str = "auto"
    expert_parallel: bool | None = None


def _fmt(b: float) -> str:  # as autopar.plan.format_bytes, without importing torch
    k = 0
    while abs(b) >= 1024 and k < 4:
        b, k = b / 1024, k + 1
    return f"{b:.0f} B" if k == 0 else f"{b:.2f} {('KiB', 'MiB', 'GiB', 'TiB')[k - 1]}"


def _mesh(sizes: dict) -> str:
    return ",".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "dp=1"


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, int(n) + 1) if n % k == 0]


def explain(r: Request, timeout_ms: int = 3000) -> str | None:
    """One sentence saying why no plan can meet ``r`` and what would (module docstring), or None
    when z3 finds the request's necessary conditions satisfiable (or cannot decide in time)."""
    import z3

    x = {a: z3.Int(a) for a in AXES}
    p, d, e, c, t = x.values()
    act = z3.Bool("activations")
    g = {a: int((r.mesh or {}).get(a, 1)) for a in AXES}
    name = {a: f"{a}={g[a]}" if r.mesh is not None else a for a in AXES}
    total = r.dense_state + r.expert_state
    share = r.dense_state / (g["tp"] * g["pp"]) + r.expert_state / (g["tp"] * g["pp"] * g["ep"])
    spare = int(r.least - share) if r.least is not None and r.mesh is not None and r.least > share else 0

    def on(n):  # every axis a divisor of n, their product n
        return [z3.Or([v == k for k in _divisors(n)]) for v in x.values()] + [math.prod(x.values()) == n]

    def mem(s, e, a=act):  # the memory row with t·p = s; rounded so that unsat stays a proof
        room = (math.ceil(r.memory) - z3.If(a, spare, 0)) * s
        return int(r.dense_state) * e + int(r.expert_state) <= room * e if r.expert_state else int(r.dense_state) <= room

    base = [v >= 1 for v in x.values()] + [v <= 1 << 16 for v in x.values()]
    facts, why = {}, {}
    if total > 0 and math.isfinite(r.memory):
        facts["memory"] = mem(t * p, e)
        if r.mesh is None:
            split = f"{_fmt(total / r.devices)} per device even split {r.devices} ways"
        else:
            split = f"{_fmt(share)} per device at tp*pp = {g['tp'] * g['pp']}"
            split += f" and ep={g['ep']} for the experts' {_fmt(r.expert_state)}" if r.expert_state else ""
        why["memory"] = f"{r.state} need {_fmt(total)}, {split}"
        if spare:
            facts["activations"] = act
            why["activations"] = f"with activations and what no axis divides, every layout needs {_fmt(r.least)} per device"
    if r.context_parallel == "ulysses" and r.heads:
        facts["ulysses"] = z3.Or([c == k for k in _divisors(r.heads)])
        why["ulysses"] = (f"context_parallel='ulysses' shards the {r.heads} attention heads over {name['cp']}, which must "
                          "divide them (ring attention need not)")
    if r.expert_parallel and r.experts:
        facts["experts"] = z3.Or([v == k for v in (e, t) for k in _divisors(r.experts)[1:]])
        why["experts"] = f"expert_parallel=True needs an ep or tp axis whose size (over 1) divides the {r.experts} experts"
    if r.blocks is not None:
        facts["blocks"] = p <= max(1, r.blocks)
        why["blocks"] = f"{name['pp']} pipeline stages need as many blocks, and the model has {r.blocks}"
    if r.seq:
        facts["sequence"] = z3.Or([c == k for k in _divisors(r.seq)])
        why["sequence"] = f"{name['cp']} must divide the sequence length {r.seq}"
    if r.batch:
        facts["batch"] = z3.Implies(p > 1, d <= r.batch)
        why["batch"] = f"a pipeline needs a sequence per dp rank at least, and the batch {r.batch} is under {name['dp']}"
    if r.mesh is not None:
        facts.update({f"{a}={n}": x[a] == n for a, n in g.items()})
    else:
        base += on(r.devices)  # the device count is the request's last fact: D = D₀
    solver = z3.Solver()
    solver.set("timeout", timeout_ms)
    solver.add(*base)
    lit = {k: z3.Bool(f"?{k}") for k in facts}
    solver.add(*[z3.Implies(lit[k], f) for k, f in facts.items()])
    if solver.check(*lit.values()) != z3.unsat:
        return None
    core = [k for k in facts if lit[k] in set(solver.unsat_core())]
    for k in sorted(core, key=lambda k: k != "activations"):  # deletion to a minimal core, activations first
        if solver.check(*[lit[j] for j in core if j != k]) == z3.unsat:
            core.remove(k)

    def best(extra, goal, keep=(), mesh=True):  # z3's least ``goal`` over the model's facts, ``keep`` and ``extra``
        rules = [*base, *extra, *[facts[k] for k in (*why, *keep) if k != "activations"]] if mesh else extra
        s = z3.Solver()  # a quick no first: Optimize proves unsat slowly on products
        s.set("timeout", timeout_ms)
        s.add(*rules)
        if s.check() != z3.sat:
            return None
        o = z3.Optimize()
        o.set("timeout", timeout_ms)
        o.add(*rules)
        o.minimize(goal)
        return o.model() if o.check() == z3.sat else s.model()

    def fmt(m, same=""):
        sizes = {a: m.eval(v).as_long() for a, v in x.items()}
        return f"{_mesh(sizes)} on {same}{math.prod(sizes.values())} devices"

    k, hint = z3.Int("split"), ""
    least_split = best([k >= 1, mem(k, g["ep"], False)], k, mesh=False) if "memory" in core else None
    if "activations" in core:
        hint = "lower the batch or the sequence length, or spread the activations over more devices"
    elif r.mesh is None:
        hint = f"use at least {least_split[k]} devices" if least_split is not None else ""
    else:
        n0 = math.prod(g.values())
        dist = z3.Sum([z3.If(v >= g[a], v - g[a], g[a] - v) for a, v in x.items()])
        m = best(on(n0), dist)
        if m is not None:
            hint = f"try {fmt(m, 'the same ')}"
        elif "memory" in core:
            m = best([], p, [f"{a}={g[a]}" for a in AXES[1:]])
            ups = [f"pp to at least {m[p]} ({n0 // g['pp'] * m[p].as_long()} devices)"] if m is not None else []
            ups += [f"tp*pp to at least {least_split[k]}"] if least_split is not None else []
            hint = "".join(f"{'raise' if i == 0 else 'or'} {u}, " for i, u in enumerate(ups))
            hint += f"{'or ' if ups else ''}plan fewer parameters per device"
            hint += " (autopar does not shard optimizer state over dp yet)" if g["dp"] * g["cp"] > 1 else ""
        else:
            m = best([], dist)
            hint = f"try {fmt(m)}" if m is not None else ""
    where = _mesh(r.mesh) if r.mesh is not None else f"{r.devices} devices"
    where += f" ({r.hardware + ', ' if r.hardware else ''}{_fmt(r.memory)} per device)"
    return f"no plan fits on {where}: " + "; ".join([why[k] for k in core if k in why] + [hint] * bool(hint))
