"""The ``autopar`` command line: plan, inspect, explain, diff, run.

Every command reads or writes plans through :mod:`autopar.plan` (plain JSON, never code). Errors
that autopar raises on purpose are printed as ``autopar: error: <message>`` with exit code 1.
"""

from __future__ import annotations

import argparse
import difflib
import html
import math
import os
import socket
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cost_models.memory import OPTIMIZERS
from .errors import AutoparError, InfeasibleError
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
    solve = s.get("solve_time_s")
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
        ["step time", format_seconds(plan.step_time_s)],
        ["peak memory", format_bytes(plan.peak_memory_bytes)],
    ]
    sections = [Section("Plan", ["field", "value"], header)]

    axes = list(plan.mesh)
    pnodes = param_nodes(plan)
    # Graph order (JSON sorts the dict keys); parameters without a node go last, by name.
    fqns = sorted(plan.param_placements, key=lambda f: (pnodes[f][0], "") if f in pnodes else (len(plan.nodes), f))
    items = [
        (
            fqn,
            (
                fmt_shape(pnodes[fqn][1].get("shape")) if fqn in pnodes else "-",
                tuple(plan.param_placements[fqn].get(a, "-") for a in axes),
            ),
        )
        for fqn in fqns
    ]
    rows = [[name, shape, *pls] for name, (shape, pls), _ in group_names(items)]
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

    hw = _hardware(plan.hardware)
    capacity = getattr(hw, "memory_capacity_bytes", None) if hw is not None else None
    rows = [[f"optimizer ({plan.optimizer})" if k == "optimizer" else k, format_bytes(v), _pct(v, capacity)]
            for k, v in plan.memory.items()]
    rows.append(["peak", format_bytes(plan.peak_memory_bytes), _pct(plan.peak_memory_bytes, capacity)])
    notes = [
        f"capacity of one {plan.hardware} device: {format_bytes(capacity)}"
        if capacity
        else f"capacity unknown: no hardware preset {plan.hardware!r} here"
    ]
    if capacity and plan.peak_memory_bytes > capacity:
        notes.append("peak memory EXCEEDS device capacity")
    sections.append(Section("Memory per device", ["kind", "bytes", "of capacity"], rows, right={1, 2}, notes=notes))

    rows = [[k, format_seconds(v), _pct(v, plan.step_time_s)] for k, v in plan.time_breakdown.items()]
    rows.append(["step (predicted)", format_seconds(plan.step_time_s), _pct(plan.step_time_s, plan.step_time_s)])
    sections.append(Section("Predicted step time", ["part", "time", "of step"], rows, right={1, 2}))

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


def _svg_schedule(timeline) -> str:
    """A Gantt chart of the simulated schedule: one row per rank, one rect per pass coloured by its
    kind, each with a tooltip naming its stage, microbatch, kind and times."""
    label_w, plot_w, row_h = 70, 840, 24
    scale = plot_w / timeline.makespan if timeline.makespan > 0 else 0.0
    axis_y = 4 + row_h * timeline.p
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + plot_w + 80}" height="{axis_y + 44}" role="img">']
    for r in range(timeline.p):
        y = 4 + r * row_h
        out.append(f'<text x="0" y="{y + 16}" font-size="13">rank {r}</text>')
        out.append(f'<rect x="{label_w}" y="{y + 2}" width="{plot_w}" height="{row_h - 4}" fill="#f2f2f2"/>')
    for e in timeline.events:
        x, w, y = label_w + e.start * scale, max((e.end - e.start) * scale, 0.5), 4 + e.rank * row_h
        tip = f"stage {e.stage}, microbatch {e.microbatch}, {e.kind}, {e.start * 1e3:.4g}-{e.end * 1e3:.4g} ms"
        out.append(f'<rect class="pp-{e.kind}" x="{x:.2f}" y="{y + 2}" width="{w:.2f}" height="{row_h - 4}" '
                   f'fill="{_COLOURS[e.kind]}" stroke="#fff" stroke-width="0.5"><title>{html.escape(tip)}</title></rect>')
        if w >= 14:
            out.append(f'<text x="{x + w / 2:.2f}" y="{y + 16}" font-size="11" text-anchor="middle" fill="#fff" '
                       f'pointer-events="none">{e.microbatch}</text>')
    out.append(f'<line x1="{label_w}" y1="{axis_y}" x2="{label_w + plot_w}" y2="{axis_y}" stroke="#888"/>')
    out.append(f'<text x="{label_w}" y="{axis_y + 14}" font-size="11">0</text>')
    out.append(f'<text x="{label_w + plot_w}" y="{axis_y + 14}" font-size="11" text-anchor="end">'
               f'{html.escape(format_seconds(timeline.makespan))}</text>')
    x = label_w
    for k, name, _, colour in _PASSES:
        if k == "W" and not any(e.kind == "W" for e in timeline.events):
            continue
        out.append(f'<rect x="{x}" y="{axis_y + 24}" width="12" height="12" fill="{colour}"/>')
        out.append(f'<text x="{x + 16}" y="{axis_y + 34}" font-size="12">{k} {name}</text>')
        x += 40 + 8 * len(name)
    out.append("</svg>")
    return "\n".join(out)


def _svg_bars(items: list[tuple[str, float]], total: float) -> str:
    """A horizontal bar chart, one bar per item, scaled to the largest of the items and ``total``."""
    scale = max([v for _, v in items] + [total, 1e-30])
    label_w, bar_w, row_h = 160, 420, 24
    height = row_h * len(items) + 8
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 120}" height="{height}" role="img">']
    for i, (name, v) in enumerate(items):
        y = 4 + i * row_h
        w = max(0.0, bar_w * v / scale) if math.isfinite(v) else 0.0
        out.append(f'<text x="0" y="{y + 16}" font-size="13">{html.escape(name)}</text>')
        out.append(f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" fill="#4878a8"/>')
        out.append(f'<text x="{label_w + w + 6:.1f}" y="{y + 16}" font-size="12">{html.escape(format_seconds(v))}</text>')
    out.append("</svg>")
    return "\n".join(out)


def render_html(plan: Plan, sections: list[Section]) -> str:
    body = []
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.title == SCHEDULE_TITLE and plan.pipeline:  # drawn as a chart, not as the text rows
            timeline, summary = pipeline_timeline(plan.pipeline, plan.mesh.get("pp"))
            if timeline is not None:
                body.append(_svg_schedule(timeline))
            body.append(f"<p>{html.escape(summary)}</p>")
            continue
        if s.title == "Predicted step time":
            items = list(plan.time_breakdown.items()) + [("step (predicted)", plan.step_time_s)]
            body.append(_svg_bars(items, plan.step_time_s))
        if s.headers:
            head = "".join(f"<th>{html.escape(h)}</th>" for h in s.headers)
            rows = "".join(
                "<tr>"
                + "".join(
                    f'<td class="num">{html.escape(c)}</td>' if i in s.right else f"<td>{html.escape(c)}</td>"
                    for i, c in enumerate(r)
                )
                + "</tr>"
                for r in s.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        body.extend(f"<p>{html.escape(n)}</p>" for n in s.notes)
    title = html.escape(f"autopar plan: {plan.model} on {fmt_mesh(plan.mesh)} ({plan.hardware})")
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:80em}"
        "table{border-collapse:collapse;margin-bottom:1em}"
        "th,td{border:1px solid #ccc;padding:2px 8px;font-family:monospace;text-align:left}"
        "td.num{text-align:right}th{background:#eee}"
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{title}</title><style>{style}</style></head>\n<body>\n<h1>{title}</h1>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


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


def cmd_inspect(args) -> int:
    plan = Plan.load(args.plan)
    if args.json:
        print(plan.to_json())
    sections = inspect_sections(plan)
    if args.html:
        _write_text(args.html, render_html(plan, sections))
        print(f"wrote HTML report to {args.html}", file=sys.stderr)
    if not args.json:
        sys.stdout.write(render_text(sections))
    return 0


def _write_text(path: str, text: str) -> None:
    p = Path(path)
    if not p.parent.is_dir():
        raise AutoparError(f"cannot write {path!r}: directory {str(p.parent)!r} does not exist")
    if p.is_dir():
        raise AutoparError(f"cannot write {path!r}: it is a directory")
    p.write_text(text, encoding="utf-8")


# ---- explain -----------------------------------------------------------------------------------


def cmd_explain(args) -> int:
    plan = Plan.load(args.plan)
    target = args.target
    node_by_name = {n["name"]: n for n in plan.nodes}
    known = set(plan.param_placements) | set(node_by_name) | set(plan.explanations)
    if target not in known:
        close = difflib.get_close_matches(target, sorted(known), n=5, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else "; list targets with `autopar inspect`"
        raise AutoparError(f"{target!r} is neither a parameter nor a graph node of this plan{hint}")

    lines = [f"{target}"]
    names = {target}
    if target in plan.param_placements:
        lines.append(f"  parameter placement: {fmt_placements(plan.param_placements[target])}")
        node = _node_for_param(plan, target)
        if node is not None:
            names.add(node["name"])
    else:
        node = node_by_name.get(target)
    if node is not None:
        lines.append(f"  node: {node['name']} = {node['op']}")
        lines.append(f"  shape: {fmt_shape(node.get('shape'))}  dtype: {node.get('dtype', '-')}")
        lines.append(f"  placements: {fmt_placements(node.get('placements'))}")
        if node.get("inputs"):
            lines.append(f"  input placements: {fmt_placements(node['inputs'])}")
        if node.get("source"):
            lines.append(f"  sharding rule from: {node['source']}")
        if "compute_s" in node:
            lines.append(f"  compute: {format_seconds(node['compute_s'])}")
    print("\n".join(lines))

    expl = next((plan.explanations[n] for n in (target, *sorted(names)) if n in plan.explanations), None)
    print()
    if expl is None:
        print("no recorded explanation for this target (the solver records explanations for chosen decisions only)")
    else:
        print(f"chosen: {_fmt_choice(expl.get('chosen'))}")
        if expl.get("reason"):
            print(f"reason: {expl['reason']}")
        alts = expl.get("alternatives") or []
        if alts:
            alts = sorted(alts, key=lambda a: (a.get("cost_s") is None, a.get("cost_s") or 0.0))
            headers, right = ["alternative", "cost"], {1}
            with_delta = any(isinstance(a.get("delta_s"), (int, float)) for a in alts)
            with_note = any(a.get("note") or a.get("reason") for a in alts)
            if with_delta:
                headers.append("vs chosen")
                right.add(2)
            if with_note:
                headers.append("note")
            rows = []
            for a in alts:
                cost = a.get("cost_s")
                row = [_fmt_choice(a.get("placements", a.get("attention", a.get("moe")))), format_seconds(cost) if isinstance(cost, (int, float)) else "-"]
                if with_delta:
                    d = a.get("delta_s")
                    row.append(("+" if d > 0 else "") + format_seconds(d) if isinstance(d, (int, float)) else "-")
                if with_note:
                    row.append(str(a.get("note") or a.get("reason") or ""))
                rows.append(row)
            print(render_table(headers, rows, right=right))

    comp = ((plan.compression or {}).get("grads") or {}).get(target)
    if comp:
        print(f"\ngradient compression: {comp['method']} on {comp.get('axis')} (the solver's choice of each option's "
              "exposed communication + codec time within the error budget; solvers/compression.py)")
        rows = [[a["method"], format_seconds(a["comm_s"]), format_seconds(a["codec_s"]), f"{a['rel_error']:.2g}"]
                for a in comp.get("alternatives", [])]
        print(render_table(["method", "comm", "codec", "rel. error"], rows, right={1, 2, 3}))
    touching = [c for c in plan.collectives if c.get("tensor") in names or c.get("node") in names]
    print()
    if touching:
        rows = [collective_row(c) for c in touching]
        print(f"collectives touching {target} ({len(touching)}):")
        print(render_table(COLLECTIVE_HEADERS, rows, right={6, 7}))
    else:
        print(f"no collectives touch {target}")
    return 0


def _fmt_choice(x: Any) -> str:
    if isinstance(x, dict):
        return fmt_placements(x)
    return "-" if x is None else str(x)


# ---- diff --------------------------------------------------------------------------------------


def cmd_diff(args) -> int:
    a, b = Plan.load(args.a), Plan.load(args.b)
    if a.hash() == b.hash():
        print("plans are identical")
        return 0
    print(f"--- {args.a}\n+++ {args.b}\n")

    rows = []
    for name, va, vb in [
        ("model", a.model, b.model),
        ("mode", a.mode, b.mode),
        ("mesh", fmt_mesh(a.mesh), fmt_mesh(b.mesh)),
        ("hardware", a.hardware, b.hardware),
        ("graph hash", a.graph_hash, b.graph_hash),
    ]:
        if va != vb:
            rows.append([name, va, vb, ""])
    rows.append(["step time", format_seconds(a.step_time_s), format_seconds(b.step_time_s), _delta(a.step_time_s, b.step_time_s)])
    rows.append(
        ["peak memory", format_bytes(a.peak_memory_bytes), format_bytes(b.peak_memory_bytes), _delta(a.peak_memory_bytes, b.peak_memory_bytes)]
    )
    for k in _union(a.memory, b.memory):
        va, vb = a.memory.get(k), b.memory.get(k)
        if va != vb:
            rows.append([f"memory.{k}", _opt(va, format_bytes), _opt(vb, format_bytes), _delta(va, vb)])
    for k in _union(a.time_breakdown, b.time_breakdown):
        va, vb = a.time_breakdown.get(k), b.time_breakdown.get(k)
        if va != vb:
            rows.append([f"time.{k}", _opt(va, format_seconds), _opt(vb, format_seconds), _delta(va, vb)])
    print(render_text([Section("Summary", ["", "a", "b", "change"], rows, right={3})]))

    changed = []
    for fqn in _union(a.param_placements, b.param_placements):
        pa, pb = a.param_placements.get(fqn), b.param_placements.get(fqn)
        if pa != pb:
            changed.append((fqn, (_opt(pa, fmt_placements), _opt(pb, fmt_placements))))
    rows = [[name, va, vb] for name, (va, vb), _ in group_names(changed)]
    print(render_text([Section(f"Parameter placements that differ ({len(changed)})", ["parameter", "a", "b"], rows)]))

    ta, tb = collective_totals(a), collective_totals(b)
    rows = []
    for key in sorted(set(ta) | set(tb)):
        ca, cb = ta.get(key, [0, 0, 0.0]), tb.get(key, [0, 0, 0.0])
        if ca != cb:
            rows.append(
                [*key, f"{ca[0]} -> {cb[0]}", f"{format_bytes(ca[1])} -> {format_bytes(cb[1])}", f"{format_seconds(ca[2])} -> {format_seconds(cb[2])}"]
            )
    print(render_text([Section("Collective totals that differ", ["phase", "op", "axis", "count", "bytes", "time"], rows, right={3, 4, 5})]), end="")
    return 0


def _union(x: dict, y: dict) -> list:
    return list(dict.fromkeys([*x, *y]))


def _opt(v: Any, fmt) -> str:
    return "-" if v is None else fmt(v)


def _delta(va: float | None, vb: float | None) -> str:
    if va is None or vb is None:
        return "added" if va is None else "removed"
    if va == vb:
        return "same"
    if not va:
        return "new"
    return f"{100 * (vb - va) / va:+.1f}%"


# ---- plan --------------------------------------------------------------------------------------


_QUIET = {"on": False}  # set per command by main() from --quiet


def _progress(*args: Any, **_: Any) -> None:
    if not _QUIET["on"]:
        print("autopar:", *args, file=sys.stderr, flush=True)


PP_SIZES = (1, 2, 4, 8, 16)  # pipeline depths the --devices search tries


CP_SIZES = (1, 2, 4, 8)  # context-parallel degrees the --devices search tries for long sequences
CP_MIN_SEQ = 16384  # from this sequence length on, the --devices search also tries cp
EP_SIZES = (2, 4, 8, 16, 32, 64)  # for MoE models, the expert-parallel degrees the --devices search tries (dividing the experts)
# Without --time-limit the search solves each mesh for SEARCH_TIME_LIMIT_S, then solves again the
# REFINE fastest meshes whose solve stopped short of optimal, with the full default limit.
SEARCH_TIME_LIMIT_S, REFINE = 3.0, 2


def _state_floor(model, optimizer: str) -> float:
    """Bytes of parameters, gradients and optimizer state of ``model`` (tied ones once): what a
    mesh must split over its tp, pp and ep axes (nothing shards them on dp or cp)."""
    from .cost_models.memory import state_bytes

    params = {id(p): p for p in model.parameters()}.values()
    return sum(2 * p.numel() * p.element_size() + state_bytes(p.numel(), optimizer) for p in params if p.requires_grad)


def candidate_meshes(devices: int, devices_per_node: int, pp_sizes=(1,), cp_sizes=(1,), ep_sizes=(1,)) -> list[dict[str, int]]:
    """Every ``{"pp": p, "dp": d, "ep": e, "cp": c, "tp": t}`` with ``p * d * e * c * t == devices``,
    ``p`` in ``pp_sizes``, ``e`` in ``ep_sizes`` (an MoE model's expert-parallel degrees, carved
    out of dp), ``c`` in ``cp_sizes`` and ``c * t <= devices_per_node``, by p, then c, then t, then e.

    Size-1 axes are left out (``{"tp": 8}`` rather than ``{"dp": 1, "tp": 8}``).
    """
    out = []
    for p in pp_sizes:
        for c in cp_sizes:
            if devices % (p * c):
                continue
            rest = devices // (p * c)
            for t in range(1, min(rest, devices_per_node // c) + 1):
                if rest % t:
                    continue
                for e in ep_sizes:
                    if (rest // t) % e:
                        continue
                    d = rest // t // e
                    mesh = {k: v for k, v in (("pp", p), ("dp", d), ("ep", e), ("cp", c), ("tp", t)) if v > 1} or {"dp": 1}
                    out.append(mesh)
    return out


def cmd_plan(args) -> int:
    from . import models
    from .api import plan as make_plan
    from .mesh import Mesh

    if args.devices is not None and args.devices < 1:
        raise AutoparError(f"--devices must be a positive int, got {args.devices}")
    batch = args.batch
    if args.devices is not None and batch is None and args.model in models.PRESETS:
        # a mesh search needs a batch every data-parallel degree divides: one sequence per device at least
        batch = max(models.PRESETS[args.model].batch, args.devices)
        _progress(f"batch {batch} x {models.PRESETS[args.model].seq if args.seq is None else args.seq} tokens "
                  f"(the preset's, at least one sequence per device; --batch sets it)")
    model, example_inputs = models.build(args.model, batch=batch, seq=args.seq, device="meta")
    options = {"mode": args.mode, "progress": _progress, "optimizer": args.optimizer,
               "context_parallel": args.context_parallel,
               "sequence_parallel": {"auto": None, "on": True, "off": False}[args.sequence_parallel],
               "expert_parallel": {"auto": None, "on": True, "off": False}[args.expert_parallel],
               "capacity_factor": args.capacity_factor}
    if args.routing:
        options["routing"] = args.routing
    if args.compression or args.compress_pipeline:
        options["compression"] = {"grads": args.compression or "none", "pipeline": args.compress_pipeline,
                                  **({"error_budget": args.error_budget} if args.error_budget is not None else {}),
                                  **({"calibration": args.calibration} if args.calibration else {})}
    if args.pin:
        bad = [x for x in args.pin if "=" not in x]
        if bad:
            raise AutoparError(f"--pin takes PATTERN=PLACEMENT, e.g. 'blocks.*.fc1.weight=S(0)'; got {bad[0]!r}")
        options["pins"] = dict(x.split("=", 1) for x in args.pin)
    if args.time_limit is not None:
        options["time_limit_s"] = args.time_limit

    if args.mesh is not None:
        mesh = Mesh.parse(args.mesh, hardware=args.hardware)
        result = make_plan(model, mesh, example_inputs, **options)
    else:
        from .cost_models.hardware import load_hardware

        from .passes.replicate import trace_deep

        per_node = load_hardware(args.hardware).devices_per_node
        tried = []
        seq = max((x.shape[1] for x in example_inputs if getattr(x, "dim", lambda: 0)() >= 2), default=0)
        cp_sizes = CP_SIZES if seq >= CP_MIN_SEQ else (1,)
        t0 = time.perf_counter()
        traced = trace_deep(model, example_inputs, progress=_progress)  # once, for every mesh
        _progress(f"traced {traced.model_name} in {time.perf_counter() - t0:.1f} s")
        experts = {m.experts for m in traced.moe}
        ep_sizes = (1,) + tuple(e for e in EP_SIZES if all(n % e == 0 for n in experts)) if experts else (1,)
        if options.get("expert_parallel") is False:
            ep_sizes = (1,)
        floor = _state_floor(model, args.optimizer)
        capacity = load_hardware(args.hardware).memory_capacity_bytes

        def plan_on(axes, **limit):
            return make_plan(model, Mesh(axes, hardware=args.hardware), example_inputs, traced=traced,
                             fusion_preview=False, **{**limit, **options})
        for axes in candidate_meshes(args.devices, per_node, PP_SIZES, cp_sizes, ep_sizes):
            split = axes.get("tp", 1) * axes.get("pp", 1) * axes.get("ep", 1)
            if floor / split > capacity:  # parameters are replicated on dp and cp: no layout can fit
                tried.append((axes, None, f"parameters, gradients and {args.optimizer} state alone need "
                                          f"{format_bytes(floor / split)} per device even split {split} ways "
                                          f"(tp x pp x ep), over {format_bytes(capacity)}"))
                continue
            _progress(f"planning mesh {fmt_mesh(axes)}")
            try:
                p = plan_on(axes, time_limit_s=SEARCH_TIME_LIMIT_S)
                tried.append((axes, p, None))
            except InfeasibleError as e:
                tried.append((axes, None, e.explanation))
            except AutoparError as e:  # e.g. a mesh this model cannot use; keep going with the others
                tried.append((axes, None, str(e)))
        rows = [
            [
                fmt_mesh(axes),
                format_seconds(p.step_time_s) if p else "-",
                format_bytes(p.peak_memory_bytes) if p else "-",
                "feasible" if p else f"infeasible: {why}",
            ]
            for axes, p, why in tried
        ]
        print(render_text([Section(f"Meshes for {args.devices} devices", ["mesh", "step time", "peak memory", "status"], rows, right={1, 2})]))
        feasible = [(axes, p) for axes, p, _ in tried if p is not None]
        if not feasible:
            reasons = "; ".join(f"{fmt_mesh(axes)}: {why}" for axes, _, why in tried)
            raise InfeasibleError(f"no mesh of {args.devices} devices is feasible for {args.model}: {reasons}")
        feasible.sort(key=lambda x: x[1].step_time_s)
        if "time_limit_s" not in options:  # solve the front runners to the full default limit
            for k, (axes, p) in enumerate(feasible[:REFINE]):
                if p.solver.get("status") != "OPTIMAL":
                    _progress(f"solving mesh {fmt_mesh(axes)} again without the search's {SEARCH_TIME_LIMIT_S:g} s limit")
                    feasible[k] = (axes, plan_on(axes))
        axes, result = min(feasible, key=lambda x: x[1].step_time_s)
        if result.pipeline is None:  # pipelined programs are not fused (yet)
            from .api import preview_fusion

            result.fusion = preview_fusion(traced, result, Mesh(axes, hardware=args.hardware))
        print(f"chosen mesh: {fmt_mesh(axes)} (fastest feasible)\n")

    sys.stdout.write(render_text(inspect_sections(result)))
    if args.out:
        out = Path(args.out)
        if not out.parent.is_dir():
            raise AutoparError(f"cannot write {args.out!r}: directory {str(out.parent)!r} does not exist")
        result.save(out)
        print(f"saved plan to {args.out}", file=sys.stderr)
    return 0


# ---- run ---------------------------------------------------------------------------------------


def _free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr if addr in ("127.0.0.1", "localhost") else "", 0))
        return s.getsockname()[1]


def cmd_run(args, script_args: list[str]) -> int:
    if args.nproc < 1:
        raise AutoparError(f"--nproc must be a positive int, got {args.nproc}")
    if not Path(args.script).is_file():
        raise AutoparError(f"script {args.script!r} does not exist")
    addr = args.master_addr or "127.0.0.1"  # loopback unless told otherwise
    port = args.master_port or _free_port(addr)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(args.nproc),
        "--master-addr",
        addr,
        "--master-port",
        str(port),
        args.script,
        *script_args,
    ]
    # Ranks import the same autopar as this launcher, installed or not.
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        return subprocess.run(cmd, env=env).returncode
    except KeyboardInterrupt:
        return 130


# ---- profile -----------------------------------------------------------------------------------


def profile_sections(times: dict, fits: dict, failed: dict, n: int, threshold: float = 0.25) -> list[Section]:
    """Tables for ``autopar profile --collectives``: measured vs fitted per collective, then the fits
    ({op: (SegmentedLink, max rel error)}) and whether each is within ``threshold`` at every size."""
    from .cost_models.calibrate import LATENCY_ONLY_BW
    from .cost_models.comm import collective_time

    sections, summary, headers = [], [], ["size", "measured", "fitted", "rel. error"]
    for op, per_size in times.items():
        sizes = sorted(per_size)
        if op not in fits:
            rows = [[format_bytes(nb), format_seconds(per_size[nb]), "-", "-"] for nb in sizes]
            sections.append(Section(f"{op} ({n} ranks)", headers, rows, {0, 1, 2, 3}, [f"not fitted: {failed.get(op, 'not measured')}"]))
            summary.append([op, "-", "-", "-", "-", f"SKIP ({failed.get(op, 'not measured')})"])
            continue
        link, err = fits[op]
        rows = []
        for nb in sizes:
            f = collective_time(op, nb, n, link)
            rows.append([format_bytes(nb), format_seconds(per_size[nb]), format_seconds(f), f"{100 * (f - per_size[nb]) / per_size[nb]:+.1f}%"])
        verdict = "PASS" if err <= threshold else "FAIL"
        sections.append(Section(f"{op} ({n} ranks)", headers, rows, {0, 1, 2, 3},
                                [f"max |relative error| {100 * err:.1f}%: {verdict} (threshold {100 * threshold:.0f}%)"]))
        for i, (_, x) in enumerate(link.segments):
            own = [nb for nb in sizes if link.at(nb) is x]
            span = f"{format_bytes(own[0])}..{format_bytes(own[-1])}" if own else "-"
            bw = f"{x.bandwidth_Bps / 1e9:.3g} GB/s" if x.bandwidth_Bps < LATENCY_ONLY_BW else "(latency only)"
            summary.append([op if i == 0 else "", span, format_seconds(x.latency_s), bw,
                            f"{100 * err:.1f}%" if i == 0 else "", verdict if i == 0 else ""])
    sections.append(Section(f"Fitted links (t = k_a*latency + k_b*S/bandwidth per size regime, ring factors of collective_time); "
                            f"check: every size within {100 * threshold:.0f}%",
                            ["collective", "sizes", "latency", "bandwidth", "max rel. error", "check"], summary, {2, 3, 4}))
    return sections


def cmd_validate(args) -> int:
    from .mesh import Mesh
    from .plan import Plan
    from .validate import report, validate

    mesh = Mesh.parse(args.mesh, hardware=args.hardware)  # checks names, sizes and the preset first
    if args.steps < 1:
        raise AutoparError(f"--steps must be at least 1, got {args.steps}")
    if args.rounds < 1:
        raise AutoparError(f"--rounds must be at least 1, got {args.rounds}")
    res = validate(args.model, mesh.axes, hardware=args.hardware, mode=args.mode, steps=args.steps,
                   rounds=args.rounds, batch=args.batch, seq=args.seq)
    print(f"validated {args.model} on {args.mesh} ({mesh.size} local ranks, costed with {args.hardware})")
    print(report(res))
    if args.out:
        Plan.from_json(res["plan"]).save(args.out)
        print(f"saved plan to {args.out}")
    return 0


def cmd_profile_ops(args) -> int:
    from .cost_models.hardware import load_hardware
    from .mesh import Mesh
    from .profiler import profile_model, report

    if load_hardware(args.hardware).name != "local":
        raise AutoparError(f"op profiling times the ops on this machine, which the preset 'local' describes; "
                           f"got --hardware {args.hardware}. Run `autopar profile --hardware local`")
    args.repeats = 7 if args.repeats is None else args.repeats
    if args.repeats < 1:
        raise AutoparError(f"--repeats must be a positive int, got {args.repeats}")
    mesh = Mesh.parse(args.mesh, hardware=args.hardware)
    _progress(f"profiling the ops of {args.model} for mesh {args.mesh} on this device (one rank, one thread)")
    res = profile_model(args.model, mesh.axes, mode=args.mode, batch=args.batch, seq=args.seq, repeats=args.repeats,
                        refresh=args.refresh)
    print(report(res))
    return 0


def cmd_profile(args) -> int:
    if not args.collectives:
        return cmd_profile_ops(args)
    from .cost_models.calibrate import DEFAULT_SIZES, calibrated_preset, fit_all, launch_local
    from .cost_models.hardware import load_hardware

    if args.nproc < 2:
        raise AutoparError(f"--nproc must be at least 2 to measure collectives, got {args.nproc}")
    args.repeats = 3 if args.repeats is None else args.repeats
    if args.repeats < 1 or args.rounds < 1:
        raise AutoparError(f"--repeats and --rounds must be positive ints, got {args.repeats} and {args.rounds}")
    sizes = [s for s in DEFAULT_SIZES if args.max_bytes is None or s <= args.max_bytes]
    if len(sizes) < 2:
        raise AutoparError(f"--max-bytes {args.max_bytes} leaves fewer than two sizes to fit (the smallest are 1 KiB, 2 KiB)")
    base = load_hardware(args.hardware)
    out = Path(args.out) if args.out else None
    if out is not None and not out.parent.is_dir():
        raise AutoparError(f"cannot write {args.out!r}: directory {str(out.parent)!r} does not exist")
    _progress(f"measuring collectives on {args.nproc} local gloo ranks, {format_bytes(sizes[0])}..{format_bytes(sizes[-1])}")
    try:
        times = launch_local(args.nproc, sizes=sizes, repeats=args.repeats, rounds=args.rounds,
                             gap_s=args.gap_ms * 1e-3)
    except (RuntimeError, ValueError) as e:
        raise AutoparError(str(e)) from None
    fits, failed = fit_all(times, args.nproc)
    sys.stdout.write(render_text(profile_sections(times, fits, failed, args.nproc)))
    if out is not None:
        if "all_reduce" not in fits:
            raise AutoparError(f"cannot write a preset without an all_reduce fit: {failed.get('all_reduce')}")
        import json

        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        how = (f"median of {args.rounds} rounds x {args.repeats} single calls, each after {args.gap_ms} ms of compute"
               if args.gap_ms > 0 else f"fastest of {args.rounds} rounds x {args.repeats} bursts")
        doc = calibrated_preset(base, fits, notes=f"{args.nproc} local gloo ranks, {how}, sizes "
                                f"{sizes[0]}..{sizes[-1]} bytes, 1-min load average {load:.2f} after.")
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote calibrated preset to {args.out}", file=sys.stderr)
    return 0


# ---- main --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autopar", description="Plan, inspect and run automatically parallelized PyTorch models.", allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("plan", help="plan a model on a mesh (or choose the mesh for --devices N)", allow_abbrev=False)
    p.add_argument("model", help="a built-in preset (gpt2, llama3-8b, ...) or path/to/file.py:factory")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--mesh", help="mesh axes and sizes, outer to inner, e.g. dp=2,tp=4")
    where.add_argument("--devices", type=int,
                       help=f"number of devices; autopar chooses the pp x dp x cp x tp mesh (pp in {list(PP_SIZES)}; "
                            f"cp in {list(CP_SIZES)} for sequences of {CP_MIN_SEQ} tokens or more)")
    p.add_argument("--hardware", default="local", help="hardware preset, e.g. h100-sxm (default: local)")
    p.add_argument("--out", help="write the plan JSON here")
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--batch", type=int, help="batch size (presets only)")
    p.add_argument("--seq", type=int, help="sequence length (presets only)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr (errors still print)")
    p.add_argument("--time-limit", type=float, help="solver time limit per plan, seconds (default 20; a --devices "
                   f"search uses {SEARCH_TIME_LIMIT_S:g} per mesh, then 20 for the {REFINE} fastest)")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw", help="optimizer whose state counts in memory")
    p.add_argument("--context-parallel", choices=["auto", "ring", "ulysses"], default="auto",
                   help="attention on a cp axis: the solver's choice per layer (auto), ring attention or Ulysses")
    p.add_argument("--sequence-parallel", choices=["auto", "on", "off"], default="auto",
                   help="Megatron sequence parallelism on tp: the solver's choice (auto), forced on, or off")
    p.add_argument("--expert-parallel", choices=["auto", "on", "off"], default="auto",
                   help="MoE layers: all-to-all expert parallelism the solver's choice (auto), on every layer, or never")
    p.add_argument("--capacity-factor", type=float,
                   help="MoE dispatch drops assignments past this factor of the even share (default: dropless)")
    p.add_argument("--routing", metavar="FILE", help="routing statistics (RoutingStats.save) to place experts by")
    p.add_argument("--compression", metavar="auto|METHOD",
                   help="compress data-parallel gradient all-reduces: 'auto' (the solver picks none, int8, top-k or "
                        "PowerSGD per layer within --error-budget) or one method everywhere (int8, topk:0.01, powersgd:4)")
    p.add_argument("--error-budget", type=float, help="--compression auto: relative L2 error allowed for the whole "
                                                     "gradient (default 0.1)")
    p.add_argument("--calibration", metavar="FILE", help="--compression: measured errors (CompressionStats.save); "
                                                        "without it a meta model is calibrated on Gaussian gradients")
    p.add_argument("--compress-pipeline", choices=["int8"], help="quantize pipeline stage-to-stage sends")
    p.add_argument("--pin", action="append", metavar="PATTERN=PLACEMENT",
                   help="fix the placement of matching parameters/nodes, e.g. 'blocks.*.fc1.weight=S(0)' "
                        "(one placement per mesh axis, comma-separated); repeatable")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("inspect", help="show a plan as tables (or JSON, or an HTML report)", allow_abbrev=False)
    p.add_argument("plan", help="plan JSON file")
    p.add_argument("--json", action="store_true", help="print the plan JSON")
    p.add_argument("--html", metavar="REPORT", help="also write a self-contained HTML report to this path")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("explain", help="say why a parameter or node was placed as it was", allow_abbrev=False)
    p.add_argument("plan", help="plan JSON file")
    p.add_argument("target", help="a parameter FQN or a graph node name")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("diff", help="show what changed between two plans", allow_abbrev=False)
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser(
        "run",
        help="launch local ranks with torch.distributed.run",
        usage="autopar run SCRIPT --nproc N [--master-addr A] [--master-port P] [--] [script args...]",
        allow_abbrev=False,
    )
    p.add_argument("script")
    p.add_argument("--nproc", type=int, required=True, help="number of local ranks")
    p.add_argument("--master-addr", help="rendezvous address (default: 127.0.0.1, loopback only)")
    p.add_argument("--master-port", type=int, help="rendezvous port (default: a free port)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("profile", help="time a model's ops on this device (cached), or with --collectives "
                       "measure collectives and fit their links", allow_abbrev=False)
    p.add_argument("--collectives", action="store_true", help="measure collectives on local gloo ranks and fit alpha-beta links")
    p.add_argument("--hardware", default="local", help="the preset of this machine; base preset for --out (default: local)")
    p.add_argument("--model", default="tiny-gpt2", help="op profiling: the model whose ops to time (default: tiny-gpt2)")
    p.add_argument("--mesh", default="tp=2", help="op profiling: the mesh whose local shapes to time (default: tp=2)")
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--batch", type=int, help="op profiling: batch size (presets only)")
    p.add_argument("--seq", type=int, help="op profiling: sequence length (presets only)")
    p.add_argument("--refresh", action="store_true", help="op profiling: re-time everything, ignoring the cache")
    p.add_argument("--nproc", type=int, default=2, help="number of local ranks (default: 2)")
    p.add_argument("--out", help="write the calibrated preset JSON here")
    p.add_argument("--max-bytes", type=int, help="--collectives: largest size to measure (default: 128 MiB)")
    p.add_argument("--repeats", type=int, help="op profiling: timed samples per op, the median is kept (default: 7); "
                   "--collectives: timed bursts per size and round, one for calls over 10 ms (default: 3)")
    p.add_argument("--gap-ms", type=float, default=0.0,
                   help="--collectives: time each call alone after this much compute and keep the median, as a "
                        "training step meets them (default 0: the fastest of back-to-back bursts)")
    p.add_argument("--rounds", type=int, default=10,
                   help="--collectives: interleaved rounds over all sizes; the fastest burst is kept, or with --gap-ms the "
                        "median of the single calls (default: 10)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("validate", help="plan a model, run it on local ranks, compare predicted with measured",
                       allow_abbrev=False)
    p.add_argument("--model", required=True, help="a preset name (e.g. tiny-gpt2) or path/to/file.py:factory")
    p.add_argument("--mesh", required=True, help="axis sizes, e.g. tp=2 or dp=2,tp=2 (local ranks = their product)")
    p.add_argument("--hardware", default="local", help="preset the plan is costed with (default: local)")
    p.add_argument("--mode", default="train", choices=["train", "infer"])
    p.add_argument("--steps", type=int, default=5, help="timed steps per round; the median counts (default: 5)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of steps; the fastest round's median is reported "
                   "(default: 3)")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--out", help="save the plan that was run here")
    p.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    # torch's pytree deprecation notice fires inside torch.export for every model; it is not the user's concern
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and args.command != "run":  # only `autopar run` passes arguments on (to the script)
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    _QUIET["on"] = bool(getattr(args, "quiet", False))
    try:
        if args.command == "run":
            if extra[:1] == ["--"]:
                extra = extra[1:]
            return cmd_run(args, extra)
        return args.func(args)
    except AutoparError as e:
        print(f"autopar: error: {e}", file=sys.stderr)
        return 1


def entry() -> None:
    """The ``autopar`` command: ``main``, then exit without tearing the interpreter down (freeing
    a traced 32-layer graph object by object takes about a second; the plan is written by then).
    Planning allocates millions of small objects that live to the end (graphs, FakeTensor meta,
    strategies): the cyclic collector runs 500x less often (about 1 s of a Llama-3-8B plan)."""
    import gc

    gc.set_threshold(50_000, 20, 20)
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    entry()
