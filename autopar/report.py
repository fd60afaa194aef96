"""What a plan says, laid out for people: the tables of ``autopar inspect`` (as plain text, as rich
renderables for a terminal, and as JSON data) and the pipeline timeline. Pure functions of a
:class:`autopar.plan.Plan`; the CLI (autopar/cli.py) prints or writes what they return.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from .mesh import AXIS_ORDER
from .plan import Plan, format_bytes, format_seconds

# ---- tables ------------------------------------------------------------------------------------


@dataclass
class Section:
    """One table of a report, rendered either as aligned text or as HTML."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    right: set[int] = field(default_factory=set)  # indexes of right-aligned (numeric) columns
    notes: list[str] = field(default_factory=list)
    bar: int | None = None  # index of a column of text bars (BAR_WIDTH chars, '#' filled), drawn as bars by rich


def render_table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def render_text(sections: list[Section]) -> str:
    parts = []
    for s in sections:
        block = [s.title, "=" * len(s.title)]
        if s.headers:
            block.append(render_table(s.headers, s.rows, s.right) if s.rows else "(none)")
        block.extend(s.notes)
        parts.append("\n".join(block))
    return "\n\n".join(parts) + "\n"


# ---- plan helpers ------------------------------------------------------------------------------


def fmt_placements(pl: dict[str, str] | list | None) -> str:
    """``{"tp": "S(0)", "dp": "R"}`` -> ``"dp=R tp=S(0)"`` (axes outer to inner)."""
    if pl is None:
        return "-"
    if isinstance(pl, list):
        return "; ".join(fmt_placements(p) for p in pl)
    rank = {a: i for i, a in enumerate(AXIS_ORDER)}
    return " ".join(f"{a}={pl[a]}" for a in sorted(pl, key=lambda a: rank.get(a, len(rank)))) or "-"


def fmt_transition(c: dict) -> str:
    if c.get("src") is None and c.get("dst") is None:
        return "-"
    return f"{fmt_placements(c.get('src'))} -> {fmt_placements(c.get('dst'))}"


COLLECTIVE_HEADERS = ["phase", "op", "axis", "tensor", "consumer", "src -> dst", "bytes", "time"]


def collective_row(c: dict) -> list[str]:
    """One collective as a table row, in COLLECTIVE_HEADERS order."""
    return [str(c.get("phase") or "-"), c["op"], c["axis"], str(c.get("tensor") or "-"), str(c.get("node") or "-"),
            fmt_transition(c), format_bytes(c["bytes"]), format_seconds(c["time_s"])]


def fmt_mesh(mesh: dict[str, int]) -> str:
    return ",".join(f"{a}={n}" for a, n in mesh.items())


def fmt_shape(shape: Any) -> str:
    if shape is None:
        return "-"
    if isinstance(shape, list) and shape and all(isinstance(x, list) or x is None for x in shape):
        return "; ".join(fmt_shape(s) for s in shape)
    return "(" + ", ".join(str(x) for x in shape) + ")"


def param_nodes(plan: Plan) -> dict[str, tuple[int, dict]]:
    """FQN -> (index in ``plan.nodes``, node) for every parameter whose graph node is in the plan.

    Export names a parameter's placeholder ``p_<fqn with dots as underscores>``; a node may also
    carry the FQN itself under ``fqn`` or ``target``.
    """
    by_name = {}
    for i, n in enumerate(plan.nodes):
        for key in (n.get("name"), n.get("fqn"), n.get("target")):
            if isinstance(key, str):
                by_name.setdefault(key, (i, n))
    out = {}
    for fqn in plan.param_placements:
        flat = fqn.replace(".", "_")
        for key in (fqn, f"p_{flat}", flat):
            if key in by_name:
                out[fqn] = by_name[key]
                break
    return out


def _node_for_param(plan: Plan, fqn: str) -> dict | None:
    hit = param_nodes(plan).get(fqn)
    return None if hit is None else hit[1]


def _fmt_index_set(values: set[int]) -> str:
    vals = sorted(values)
    runs: list[str] = []
    start = prev = vals[0]
    for v in vals[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        runs.append(str(start) if start == prev else f"{start}..{prev}")
        if v is not None:
            start = prev = v
    return "{" + ",".join(runs) + "}"


def group_names(items: list[tuple[str, Any]]) -> list[tuple[str, Any, int]]:
    """Collapse names that differ only in numeric components and share the same value.

    ``[("h.0.w", v), ("h.1.w", v)]`` -> ``[("h.{0..1}.w", v, 2)]``. Numeric positions are collapsed
    from the innermost out, so nested indexes (layers x experts) collapse into rectangles.
    Returns ``(display_name, value, count)`` in first-seen order.
    """
    # Each entry: parts (str or frozenset of ints), value key, value, first index, count.
    entries = []
    for i, (name, value) in enumerate(items):
        parts = tuple(frozenset([int(p)]) if p.isdigit() else p for p in name.split("."))
        entries.append((parts, repr(value), value, i, 1))
    max_len = max((len(e[0]) for e in entries), default=0)
    for pos in reversed(range(max_len)):
        merged: dict[Any, list] = {}
        order: list[Any] = []
        for parts, vkey, value, first, count in entries:
            if pos < len(parts) and isinstance(parts[pos], frozenset):
                key = (parts[:pos], parts[pos + 1 :], len(parts), vkey)
            else:
                key = ("#", first)  # not collapsible at this position: keep as is
            if key in merged:
                m = merged[key]
                m[0] = m[0][:pos] + (m[0][pos] | parts[pos],) + m[0][pos + 1 :]
                m[3] = min(m[3], first)
                m[4] += count
            else:
                merged[key] = [parts, vkey, value, first, count]
                order.append(key)
        entries = [tuple(merged[k]) for k in order]
    entries.sort(key=lambda e: e[3])
    out = []
    for parts, _, value, _, count in entries:
        name = ".".join(p if isinstance(p, str) else (str(next(iter(p))) if len(p) == 1 else _fmt_index_set(p)) for p in parts)
        out.append((name, value, count))
    return out


def _hardware(name: str):
    try:
        from .cost_models.hardware import load_hardware

        return load_hardware(name)
    except Exception:  # the report still works without the preset (e.g. a plan from elsewhere)
        return None


def collective_totals(plan: Plan) -> dict[tuple[str, str, str], list]:
    """(phase, op, axis) -> [count, total bytes, total seconds]."""
    totals: dict[tuple[str, str, str], list] = defaultdict(lambda: [0, 0, 0.0])
    for c in plan.collectives:
        t = totals[(str(c.get("phase") or "-"), c["op"], c["axis"])]
        t[0] += 1
        t[1] += c["bytes"]
        t[2] += c["time_s"]
    return dict(sorted(totals.items()))


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole and math.isfinite(whole) else "-"


BAR_WIDTH = 30


def _bar(part: float, whole: float | None) -> str:
    """``part / whole`` as BAR_WIDTH characters: '#' filled (at least one for any part), '.' empty."""
    if not whole or not math.isfinite(whole):
        return ""
    k = min(BAR_WIDTH, math.ceil(BAR_WIDTH * max(0.0, part) / whole))
    return "#" * k + "." * (BAR_WIDTH - k)


def _mfu(plan: Plan, hw) -> tuple[float | None, str]:
    """Model FLOPs utilisation ``F / (T · n · peak)``: the model's FLOPs per step ``F`` over what
    the ``n`` devices do at their peak FLOP/s (for the dtype most ops run in) in the predicted step
    time ``T``; or None and why it cannot be given."""
    flops = getattr(plan, "model_flops", None)
    if not flops:
        return None, "the plan records no model FLOPs per step"
    if hw is None:
        return None, f"no hardware preset {plan.hardware!r} here to give the peak FLOP/s"
    dtypes = Counter(n["dtype"] for n in plan.nodes if n.get("kind") == "op" and n.get("dtype"))
    peak = hw.peak(dtypes.most_common(1)[0][0] if dtypes else "float32")
    return flops / (plan.step_time_s * math.prod(plan.mesh.values()) * peak), ""


def _param_groups(plan: Plan) -> list[tuple[str, tuple, int]]:
    """``group_names`` of (FQN, (shape or None, placement per mesh axis)) in graph order
    (parameters without a node last, by name)."""
    pnodes = param_nodes(plan)
    fqns = sorted(plan.param_placements, key=lambda f: (pnodes[f][0], "") if f in pnodes else (len(plan.nodes), f))
    shape = {f: tuple(pnodes[f][1]["shape"]) if f in pnodes and pnodes[f][1].get("shape") is not None else None for f in fqns}
    return group_names([(f, (shape[f], tuple(plan.param_placements[f].get(a, "-") for a in plan.mesh))) for f in fqns])


def _rank_memory(plan: Plan) -> list[float]:
    """Bytes per pp rank of a pipelined plan (``rank_memory_bytes``, else its stages'
    ``stage_memory_bytes`` summed), else []."""
    pipe = plan.pipeline or {}
    if pipe.get("rank_memory_bytes"):
        return [float(b) for b in pipe["rank_memory_bytes"]]
    mem, v = pipe.get("stage_memory_bytes") or [], int(pipe.get("virtual_stages") or 1)
    p = len(mem) // v if v > 0 and len(mem) % v == 0 else len(mem)
    return [float(sum(mem[r::p])) for r in range(p)]


# ---- inspect -----------------------------------------------------------------------------------


def _gap(s: dict) -> str:
    """How far a plan may be from optimal: CP-SAT's proven bound against the objective it found,
    and the folded problem's size when repeated layers were tied."""
    out = ""
    if s.get("folded_nodes") is not None:
        out += f"; {s.get('repeated_layers')} repeated layers tied, {s['nodes_in']} -> {s['folded_nodes']} nodes"
    obj, bound = s.get("cp_objective_s"), s.get("cp_bound_s")
    if s.get("status") == "FEASIBLE" and isinstance(obj, (int, float)) and isinstance(bound, (int, float)) and obj > 0:
        out += f"; optimality gap <= {(obj - bound) / obj:.2%} (proven bound {format_seconds(bound)})"
    return out


def inspect_sections(plan: Plan, *, top: int = 10) -> list[Section]:
    s = plan.solver
    devices = math.prod(plan.mesh.values()) if plan.mesh else 0
    solve = plan.timings.get("solve_time_s", s.get("solve_time_s"))  # a plan saved before Plan.timings kept it in solver
    hw = _hardware(plan.hardware)
    capacity = getattr(hw, "memory_capacity_bytes", None) if hw is not None else None
    mfu, why = _mfu(plan, hw)
    header = [
        ["model", plan.model],
        ["mode", plan.mode],
        ["mesh", f"{fmt_mesh(plan.mesh)} ({devices} devices)"],
        ["hardware", plan.hardware],
        ["graph hash", plan.graph_hash],
        ["plan hash", plan.hash()],
        [
            "solver",
            f"{s.get('name', '?')}: {s.get('status', '?')}"
            + (f" in {format_seconds(solve)}" if isinstance(solve, (int, float)) else "") + _gap(s),
        ],
        ["predicted step time", format_seconds(plan.step_time_s)],
        ["MFU", f"{mfu:.1%}" if mfu is not None else f"- ({why})"],
        ["peak memory", f"{format_bytes(plan.peak_memory_bytes)} per device"
         + (f", {_pct(plan.peak_memory_bytes, capacity)} of {format_bytes(capacity)}" if capacity else "")],
    ]
    sections = [Section("Plan", ["field", "value"], header)]

    axes = list(plan.mesh)
    rows = [[name, fmt_shape(shape), *pls] for name, (shape, pls), _ in _param_groups(plan)]
    sections.append(
        Section(
            f"Parameter placements ({len(plan.param_placements)} parameters)",
            ["parameter", "shape", *axes],
            rows,
        )
    )

    if plan.input_placements:
        rows = [[str(i), fmt_placements(pl)] for i, pl in enumerate(plan.input_placements)]
        sections.append(Section("Input placements", ["input", "placements"], rows))

    attn = [n for n in plan.nodes if n.get("attention")]
    if attn:
        rows = []
        for n in attn:
            alts = (plan.explanations.get(n["name"]) or {}).get("alternatives") or []
            rows.append([n["name"], n["attention"], fmt_placements(n.get("placements")),
                         ", ".join(f"{a['attention']} {format_seconds(a['cost_s'])}" for a in alts)])
        sections.append(Section(f"Attention on cp ({len(attn)} layers)", ["node", "scheme", "placements", "predicted cost of each scheme"],
                                rows, notes=["ring: K/V blocks pass round the cp ring (causal: zig-zag balanced); ulysses: "
                                             "all-to-all to head-sharded and back; batch/replicated: cp not used by attention"]))

    moe = [n for n in plan.nodes if n.get("moe")]
    if moe:
        rows = []
        for n in moe:
            e = n["moe"]
            alts = (plan.explanations.get(n["name"]) or {}).get("alternatives") or []
            best_other = next((a for a in alts if a["moe"] != e["layout"]), None)
            dispatch = "dropless" if e.get("dispatch", "dropless") == "dropless" else f"capacity {e['capacity_factor']:g}"
            rows.append([n["name"], f"{e['experts']}/top-{e['top_k']}", e["layout"], dispatch,
                         "yes" if e.get("placement") else "contiguous", format_seconds(n.get("compute_s", 0.0)),
                         f"{best_other['moe']} +{format_seconds(best_other['delta_s'])}" if best_other else "-"])
        notes = ["all-to-all: tokens go to the experts' owners and back on that axis; own-experts: each rank runs its "
                 "experts on every token, the outputs are summed; data: experts replicated, tokens split"]
        if plan.solver.get("expert_placement"):
            p = plan.solver["expert_placement"]
            notes.append(f"placement from routing statistics on {p['devices']} devices: cross-device token pairs "
                         f"{p['cross_device_tokens']} (contiguous {p['contiguous_cross_device_tokens']}), max device "
                         f"load {p['max_device_load']} (contiguous {p['contiguous_max_device_load']})")
        sections.append(Section(f"MoE layers ({len(moe)})", ["node", "experts", "layout", "dispatch", "placement",
                                                             "time", "next best layout"], rows, notes=notes))

    sections.extend(_compression_sections(plan))
    rows = [
        [phase, op, axis, str(n), format_bytes(b), format_seconds(t)]
        for (phase, op, axis), (n, b, t) in collective_totals(plan).items()
    ]
    sections.append(
        Section(
            f"Collectives ({len(plan.collectives)} in all)",
            ["phase", "op", "axis", "count", "bytes", "time"],
            rows,
            right={3, 4, 5},
        )
    )
    ranked = sorted(plan.collectives, key=lambda c: -c["time_s"])[:top]
    rows = [collective_row(c) for c in ranked]
    sections.append(
        Section(
            f"Top {len(ranked)} collectives by time",
            COLLECTIVE_HEADERS,
            rows,
            right={6, 7},
        )
    )

    scale = max(capacity or 0, plan.peak_memory_bytes)
    rows = [[f"optimizer ({plan.optimizer})" if k == "optimizer" else k, format_bytes(v), _pct(v, capacity), _bar(v, scale)]
            for k, v in plan.memory.items()]
    rows.append(["peak", format_bytes(plan.peak_memory_bytes), _pct(plan.peak_memory_bytes, capacity),
                 _bar(plan.peak_memory_bytes, scale)])
    rows += [[f"pp rank {r}", format_bytes(m), _pct(m, capacity), _bar(m, scale)] for r, m in enumerate(_rank_memory(plan))]
    notes = [
        f"capacity of one {plan.hardware} device: {format_bytes(capacity)}"
        if capacity
        else f"capacity unknown: no hardware preset {plan.hardware!r} here"
    ]
    if capacity and plan.peak_memory_bytes > capacity:
        notes.append("peak memory EXCEEDS device capacity")
    if plan.pipeline:
        notes.append("the kinds are the intra-op plan's, before the split into stages; a pp rank's row is its total")
    sections.append(Section("Memory per device", ["kind", "bytes", "of capacity", "bar (of capacity)" if capacity else "bar"],
                            rows, right={1, 2}, notes=notes, bar=3))

    rows = [[k, format_seconds(v), _pct(v, plan.step_time_s)] for k, v in plan.time_breakdown.items()]
    rows.append(["step (predicted)", format_seconds(plan.step_time_s), _pct(plan.step_time_s, plan.step_time_s)])
    sections.append(Section("Predicted step time", ["part", "time", "of step"], rows, right={1, 2}))
    sections.extend(comm_schedule_sections(plan))

    if plan.pipeline:
        pipe = plan.pipeline
        rows = [[str(s), f"{pipe['layers'][a]}..{pipe['layers'][b - 1]}", str(b - a), format_seconds(t), format_bytes(m)]
                for s, ((a, b), t, m) in enumerate(zip(pipe["bounds"], pipe["stage_times_s"], pipe["stage_memory_bytes"]))]
        notes = [f"{pipe['schedule']}, {pipe['microbatches']} microbatches; predicted bubble {pipe['bubble']:.1%} "
                 f"against the analytic {_bubble_formula(pipe['schedule'])} = {pipe['analytic_bubble']:.1%} "
                 "(equal when stages are balanced)"]
        sections.append(Section("Pipeline stages",
                                 ["stage", "layers", "count", "time per microbatch", "memory"], rows, right={2, 3, 4}, notes=notes))
        timeline, summary = pipeline_timeline(pipe, plan.mesh.get("pp"))
        notes = [summary] + (_timeline_text(timeline) if timeline is not None else [])
        sections.append(Section(SCHEDULE_TITLE, [], [], notes=notes))
    sections.append(Section(f"Warnings ({len(plan.warnings)})", [], [], notes=[f"- {w}" for w in plan.warnings] or ["(none)"]))
    return sections


# ---- pipeline schedule -------------------------------------------------------------------------

SCHEDULE_TITLE = "Pipeline schedule"
TIMELINE_COLUMNS = 100
_PASSES = (("F", "forward", "0123456789", "#4878a8"), ("B", "backward", "abcdefghij", "#e0883c"),
           ("W", "weight gradient", "ABCDEFGHIJ", "#6aa84f"))  # kind, name, text marks by microbatch mod 10, colour
_MARKS = {k: marks for k, _, marks, _ in _PASSES}
_COLOURS = {k: colour for k, _, _, colour in _PASSES}


def _bubble_formula(schedule: str) -> str:
    return "(p-1)/(m*v)" if schedule == "interleaved-1f1b" else "(p-1)/m"


def pipeline_timeline(pipe: dict, pp: int | None = None) -> tuple[Any, str]:
    """The plan's pipeline simulated pass by pass (:mod:`autopar.solvers.schedule`) and a line that
    sums it up, or ``(None, why not)``.

    Stage s takes τ_s per microbatch (``stage_times_s``: forward + backward, the send to the next
    stage included, so the simulation adds no transfer): forward f_s = ``stage_forward_s[s]``, else
    τ_s/3; backward τ_s − f_s, which zb-h1 splits into W = ``stage_wgrad_s[s]`` (else half) and B. With ``virtual_stages`` v > 1 the
    times are per global stage (p·v of them), or per rank (``pp`` of them), each rank's then split
    evenly over its v stages.
    """
    from .solvers.schedule import analytic_bubble, simulate

    schedule, m = str(pipe.get("schedule")), int(pipe.get("microbatches") or 0)
    taus = [float(t) for t in pipe.get("stage_times_s") or []]
    fwd = [float(x) for x in pipe.get("stage_forward_s") or [t / 3 for t in taus]]
    v = int(pipe.get("virtual_stages") or 1)
    try:
        if v > 1 and pp and len(taus) == pp:  # per rank: v equal chunks each
            taus, fwd = ([x[s % pp] / v for s in range(pp * v)] for x in (taus, fwd))
        if v < 1 or not taus or len(taus) % v:
            raise ValueError(f"{len(taus)} stage times do not make {v} stages on each rank")
        p = len(taus) // v
        if len(fwd) != len(taus):
            raise ValueError(f"{len(fwd)} forward times for {len(taus)} stages")
        back = [t - x for t, x in zip(taus, fwd)]
        wgrad = [float(x) for x in pipe.get("stage_wgrad_s") or [x / 2 for x in back]]
        if schedule == "zb-h1" and len(wgrad) == len(back):
            timeline = simulate(schedule, p, m, v, f=fwd, b=[x - w for x, w in zip(back, wgrad)], w=wgrad)
        else:
            timeline = simulate(schedule, p, m, v, f=fwd, b=back)
    except ValueError as e:
        return None, f"no timeline: {e}"
    bound = ", an upper bound for zb-h1" if schedule == "zb-h1" else ""
    chunks = f" x {v} stages each" if v > 1 else ""
    return timeline, (f"{schedule} on {p} ranks{chunks}, {m} microbatches: simulated step "
                      f"{format_seconds(timeline.makespan)}, bubble {timeline.bubble:.1%} against the analytic "
                      f"{_bubble_formula(schedule)} = {analytic_bubble(schedule, p, m, v):.1%}{bound}")


def _timeline_text(timeline, width: int = TIMELINE_COLUMNS) -> list[str]:
    """A legend, one row of ``width`` columns per rank, and a time axis. A column shows the pass
    that covers most of it (its microbatch, mod 10, in that kind's marks), or '.' where the rank
    idles for at least half of it. Plain characters only: it reads without colour."""
    dt = timeline.makespan / width if timeline.makespan > 0 else 1.0
    label = len(f"rank {timeline.p - 1}")
    kinds = "FBW" if any(e.kind == "W" for e in timeline.events) else "FB"
    legend = ", ".join(f"{name} {marks[0]}-{marks[-1]}" for k, name, marks, _ in _PASSES if k in kinds)
    lines = [f"{legend}: the microbatch (mod 10); '.' idle; one column = {format_seconds(dt)}"]
    for r in range(timeline.p):
        events = timeline.rank_events(r)
        cells = []
        for j in range(width):
            lo, hi = j * dt, (j + 1) * dt
            cover = [(min(hi, e.end) - max(lo, e.start), e) for e in events if e.end > lo and e.start < hi]
            if sum(x for x, _ in cover) < dt / 2:
                cells.append(".")
            else:
                e = max(cover, key=lambda xe: xe[0])[1]
                cells.append(_MARKS[e.kind][e.microbatch % 10])
        lines.append(f"{f'rank {r}':<{label}} |{''.join(cells)}|")
    lines.append(" " * (label + 1) + "0" + format_seconds(timeline.makespan).rjust(width + 1))
    return lines


COMM_SCHEDULE_TITLE = "Communication schedule"


def comm_schedule_sections(plan, width: int = TIMELINE_COLUMNS, rows: int = 40) -> list:
    """``plan.comm_schedule``'s buckets (the first ``rows``), what they expose against the synchronous
    hooks and DDP, and text lanes of the backward: compute, then each axis's buckets."""
    cs = plan.comm_schedule
    if not cs:
        return []
    p, buckets, T = cs["predicted"], cs["buckets"], cs["predicted"]["backward_s"]
    table = [[str(k), b["axis"], _bucket(b), format_seconds(b["start_s"]), format_seconds(b["end_s"])]
             for k, b in enumerate(buckets[:rows])]
    dt = max(p["makespan_s"], 1e-30) / width
    notes = ([f"... and {len(buckets) - rows} more buckets"] if len(buckets) > rows else []) + [
        f"solver {cs['solver']['name']} ({cs['solver']['status']}); mean bucket "
        f"{format_bytes(sum(b['bytes'] for b in buckets) / len(buckets))}; backward {format_seconds(T)}, exposed "
        f"{format_seconds(p['exposed_s'])} (synchronous hooks {format_seconds(p['synchronous_s'] - T)}, DDP 25 MiB "
        f"buckets {format_seconds(p['ddp_s'] - T)})",
        f"'#' backward compute, digits the bucket (mod 10), '.' idle; one column = {format_seconds(dt)}"]
    lanes = [("compute", [(s, e, "#") for _, s, e in cs["timeline"]["compute"]])]
    lanes += [(f"comm {a}", [(s, e, str(k % 10)) for k, s, e in spans]) for a, spans in cs["timeline"]["comm"].items()]
    for name, spans in lanes:
        cover = [[(min((j + 1) * dt, e) - max(j * dt, s), m) for s, e, m in spans if e > j * dt and s < (j + 1) * dt]
                 for j in range(width)]
        notes.append(f"{name:<8} |{''.join(max(c)[1] if sum(x for x, _ in c) >= dt / 2 else '.' for c in cover)}|")
    notes.append(" " * 9 + "0" + format_seconds(p["makespan_s"]).rjust(width + 1))
    return [Section(f"{COMM_SCHEDULE_TITLE} ({len(buckets)} gradient buckets)",
                    ["bucket", "axis", "gradients", "start", "end"], table, right={3, 4}, notes=notes)]


def _bucket(b: dict) -> str:
    """``3 gradients (ln_f.weight .. blocks.1.fc2.bias), 3.00 KiB``."""
    names = b["params"][0] + (f" .. {b['params'][-1]}" if len(b["params"]) > 1 else "")
    return f"{len(b['params'])} gradient{'s' * (len(b['params']) > 1)} ({names}), {format_bytes(b['bytes'])}"


def _compression_sections(plan) -> list:
    """The fused kernels and each gradient sync's compression, as the plan records them."""
    out = []
    fusion = plan.fusion or {}
    if fusion.get("kernels"):
        rows = [[k["name"], k["pattern"], str(len(k["groups"])), " ".join(o.removeprefix("aten.") for o in k["ops"])]
                for k in fusion["kernels"]]
        out.append(Section(f"Fused kernels ({len(rows)})", ["kernel", "pattern", "uses", "ops"], rows,
                           notes=[f"backend: {fusion.get('backend')} ({fusion.get('reason', '')})"]))
    comp = plan.compression or {}
    grads = comp.get("grads") or {}
    if grads or comp.get("pipeline"):
        rows = []
        for fqn, g in sorted(grads.items(), key=lambda kv: -kv[1].get("numel", 0)):
            base = next((a for a in g.get("alternatives", []) if a["method"] == "none"), None)
            rows.append([fqn, g["method"], g.get("axis", "-"), str(g.get("numel", "-")),
                         format_seconds(base["comm_s"]) if base else "-", format_seconds(g.get("comm_s", 0.0)),
                         format_seconds(g.get("codec_s", 0.0)), f"{g.get('rel_error', 0.0):.2g}"])
        pred = comp.get("predicted") or {}
        notes = [f"pipeline sends: {comp.get('pipeline') or 'uncompressed'}"]
        if pred:
            notes.insert(0, f"grad sync {format_seconds(pred['grad_sync_s'])} -> {format_seconds(pred['compressed_grad_sync_s'])}"
                            f" + codec {format_seconds(pred['codec_s'])}; backward overlap window "
                            f"{format_seconds(pred['overlap_window_s'])}; exposed {format_seconds(pred['exposed_s'])} -> "
                            f"{format_seconds(pred['compressed_exposed_s'])}; gradient error {pred['rel_error']:.3g} "
                            f"(budget {comp.get('error_budget')}, {comp.get('calibration')} calibration)")
        out.append(Section(f"Gradient compression ({sum(g['method'] != 'none' for g in grads.values())} of {len(grads)} "
                           "compressed)", ["parameter", "method", "axis", "elements", "uncompressed", "comm", "codec",
                                          "rel. error"], rows, right={3, 4, 5, 6, 7}, notes=notes))
    return out


# ---- machine-readable and terminal forms -------------------------------------------------------


def inspect_json(plan: Plan, sections: list[Section], *, top: int = 10) -> dict:
    """The data of ``autopar inspect --json``: stable keys, unformatted numbers (bytes, seconds),
    and every section's table as the text shows it (``sections``)."""
    hw = _hardware(plan.hardware)
    capacity = getattr(hw, "memory_capacity_bytes", None) if hw is not None else None
    mfu, why = _mfu(plan, hw)
    pipe = None
    if plan.pipeline:
        timeline, summary = pipeline_timeline(plan.pipeline, plan.mesh.get("pp"))
        events = [] if timeline is None else [{"rank": e.rank, "stage": e.stage, "kind": e.kind, "microbatch": e.microbatch,
                                               "start_s": e.start, "end_s": e.end} for e in timeline.events]
        pipe = {**plan.pipeline, "timeline": {"summary": summary, "makespan_s": getattr(timeline, "makespan", None),
                                              "bubble": getattr(timeline, "bubble", None), "events": events}}
    return {
        "summary": {"model": plan.model, "mode": plan.mode, "mesh": plan.mesh, "devices": math.prod(plan.mesh.values()),
                    "hardware": plan.hardware, "graph_hash": plan.graph_hash, "plan_hash": plan.hash(),
                    "solver": {k: plan.solver.get(k) for k in ("name", "status")} | {
                        "solve_time_s": plan.timings.get("solve_time_s", plan.solver.get("solve_time_s"))},
                    "step_time_s": plan.step_time_s, "mfu": mfu, "mfu_missing": why or None,
                    "peak_memory_bytes": plan.peak_memory_bytes, "memory_capacity_bytes": capacity},
        "parameters": [{"name": name, "count": n, "shape": None if shape is None else list(shape),
                        "placements": dict(zip(plan.mesh, pls))} for name, (shape, pls), n in _param_groups(plan)],
        "collectives": {"count": len(plan.collectives),
                        "totals": [{"phase": ph, "op": op, "axis": axis, "count": n, "bytes": b, "time_s": t}
                                   for (ph, op, axis), (n, b, t) in collective_totals(plan).items()],
                        "top": sorted(plan.collectives, key=lambda c: -c["time_s"])[:top]},
        "memory": {"per_device": plan.memory, "peak_bytes": plan.peak_memory_bytes, "capacity_bytes": capacity,
                   "pp_ranks": _rank_memory(plan)},
        "time": {"breakdown": plan.time_breakdown, "step_time_s": plan.step_time_s},
        "pipeline": pipe,
        "warnings": plan.warnings,
        "sections": [{"title": s.title, "headers": s.headers, "rows": s.rows, "notes": s.notes} for s in sections],
    }


def rich_report(sections: list[Section]):
    """The sections as one rich renderable for a terminal: the "Plan" section as a summary panel,
    tables with titles and right-aligned numbers, bar columns in colour, notes-only sections (the
    pipeline timeline, warnings) in panels, the timeline coloured by pass."""
    from rich import box
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    def cell(s: Section, i: int, c: str) -> Text:
        if i != s.bar or not c:
            return Text(c)
        k = c.count("#")
        return Text.assemble(("█" * k, "red" if k == len(c) else "green"), ("░" * (len(c) - k), "dim"))

    def note(line: str) -> Text:  # a timeline row: each pass in its colour, idle dim
        if not line.startswith("rank ") or "|" not in line:
            return Text(line)
        label, cells = line.split("|", 1)
        style = {m: _COLOURS[k] for k, marks in _MARKS.items() for m in marks}
        return Text.assemble(label + "|", *((ch, style.get(ch, "dim")) for ch in cells))

    out = []
    for s in sections:
        if s.title == "Plan":
            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="bold")
            grid.add_column()
            for row in s.rows:
                grid.add_row(*row)
            out.append(Panel(grid, title="Plan", title_align="left", expand=False))
        elif s.headers:
            t = Table(title=s.title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                      caption="\n".join(s.notes) or None, caption_justify="left")
            for i, h in enumerate(s.headers):
                t.add_column(h, justify="right" if i in s.right else "left", overflow="fold")
            for r in s.rows:
                t.add_row(*(cell(s, i, c) for i, c in enumerate(r)))
            out.append(t)
        else:
            out.append(Panel(Text("\n").join(note(n) for n in s.notes), title=s.title, title_align="left", expand=False))
    return Group(*out)
