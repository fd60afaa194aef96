"""The self-contained HTML report of ``autopar inspect plan.json --html report.html``: one file,
inline SVG charts and CSS, no scripts, nothing fetched from the network. A pure function of a Plan
and the sections autopar/report.py lays out.

The page: a summary of the plan and a table of contents, then the sections of ``autopar inspect``
as tables, with a chart next to the section it draws. Each chart has a stable id:

* ``sharding-diagram``: each layer group's parameters, one glyph per mesh axis (R, S(d), P);
* ``step-timeline``: one step as the cost model prices it, a compute lane and a lane per mesh axis;
* ``memory-chart``: a stacked bar of the memory per device (per pp rank on a pipelined plan), with
  the device's capacity;
* ``pipeline-gantt``: the pipeline schedule, pass by pass (plans with a pp axis);
* ``comm-schedule``: the backward's compute lane and a lane per mesh axis with the gradient
  buckets of ``plan.comm_schedule``, idle time in grey (plans with one);
* ``time-bars``: the step time's parts; ``collectives-table``: every collective, slowest first.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any, Callable

from .plan import Plan, format_bytes, format_seconds
from .report import (
    _COLOURS,
    _PASSES,
    COLLECTIVE_HEADERS,
    COMM_SCHEDULE_TITLE,
    SCHEDULE_TITLE,
    Section,
    _bucket,
    collective_row,
    fmt_mesh,
    group_names,
    param_nodes,
    pipeline_timeline,
)

# ---- palette: every chart's fills are its own, so a screenshot shows which charts were drawn ----

SHARD_COLOURS = {"R": "#cfd8dc", "S": "#26a69a", "P": "#ef6c00", "-": "#ffffff"}
COMPUTE_COLOURS = {"forward": "#42a5f5", "backward": "#1565c0", "optimizer": "#90a4ae", "other": "#bdbdbd"}
COMM_COLOURS = {"all_reduce": "#e53935", "all_gather": "#8e24aa", "reduce_scatter": "#fdd835",
                "all_to_all": "#6d4c41", "send_recv": "#00897b"}
COMM_OTHER = "#757575"
MEMORY_COLOURS = {"parameters": "#5c6bc0", "gradients": "#ab47bc", "optimizer": "#ffa726",
                  "activations": "#66bb6a", "transient": "#26c6da"}
MEMORY_OTHER = ("#8d6e63", "#78909c", "#d4e157", "#ec407a")
MEMORY_STAGE = "#7986cb"  # a pp rank's total: the plan records no breakdown per stage
CAPACITY_COLOUR = "#d50000"
BAR_COLOUR = "#4878a8"
CHART_WIDTH = 1150


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _svg(width: float, height: float, chart_id: str, label: str, body: list[str]) -> str:
    return "\n".join([f'<svg xmlns="http://www.w3.org/2000/svg" id="{chart_id}" class="chart" width="{width:.0f}" '
                      f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{_esc(label)}">',
                      *body, "</svg>"])


def _rect(x: float, y: float, w: float, h: float, fill: str, tip: str = "", cls: str = "", extra: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    t = f"<title>{_esc(tip)}</title>" if tip else ""
    return f'<rect{c} x="{x:.2f}" y="{y:.2f}" width="{max(w, 0.0):.2f}" height="{h:.2f}" fill="{fill}"{extra}>{t}</rect>'


def _text(x: float, y: float, s: str, size: int = 12, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{x:.2f}" y="{y:.2f}" font-size="{size}" text-anchor="{anchor}"{extra}>{_esc(s)}</text>'


def _legend(x: float, y: float, items: list[tuple[str, str]], width: float = CHART_WIDTH) -> tuple[list[str], float]:
    """Colour swatches with names, wrapping at ``width``; returns the elements and the y below them."""
    out, x0 = [], x
    for name, colour in items:
        w = 30 + 7 * len(name)
        if x + w > width and x > x0:
            x, y = x0, y + 18
        out.append(_rect(x, y, 12, 12, colour, extra=' stroke="#999" stroke-width="0.5"'))
        out.append(_text(x + 16, y + 11, name, 12))
        x += w
    return out, y + 18


def _ticks(x0: float, width: float, total: float, y: float, fmt: Callable[[float], str], n: int = 5) -> list[str]:
    """A horizontal axis from 0 to ``total`` at ``y`` with about ``n`` round ticks."""
    out = [f'<line x1="{x0}" y1="{y}" x2="{x0 + width}" y2="{y}" stroke="#888"/>']
    if not (total > 0 and math.isfinite(total)):
        return out
    raw = total / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    k = 0
    while k * step <= total * (1 + 1e-9):
        x = x0 + width * k * step / total
        out.append(f'<line x1="{x:.2f}" y1="{y}" x2="{x:.2f}" y2="{y + 4}" stroke="#888"/>')
        out.append(_text(x, y + 15, fmt(k * step) if k else "0", 11, "middle"))
        k += 1
    return out


# ---- per-layer sharding diagram ------------------------------------------------------------------


def _placement_kind(p: str) -> tuple[str, str]:
    """``"S(1)"`` -> ("S", "S1"), ``"P(sum)"`` -> ("P", "P"), ``"R"`` -> ("R", "R"); else ("-", "?")."""
    m = re.fullmatch(r"S\((-?\d+)\)", p)
    if m:
        return "S", f"S{m.group(1)}"
    if p.startswith("P"):
        return "P", "P"
    return ("R", "R") if p == "R" else ("-", "?")


def _layer_rows(plan: Plan, axes: list[str]) -> list[tuple[str, list[tuple[str, tuple]], int]]:
    """The parameters in graph order, as rows: each repeated block (``blocks.3``) is a row of its
    parameters (named inside it), each run of parameters outside blocks another. Identical blocks
    are grouped as ``report.group_names`` groups them for text (``blocks.{0..3}``), and so are
    identical cells inside a row (``experts.{0..7}.w1``). Returns (row name, cells, count) with a
    cell (name, placements on ``axes``)."""
    pnodes = param_nodes(plan)
    fqns = sorted(plan.param_placements, key=lambda f: (pnodes[f][0], "") if f in pnodes else (len(plan.nodes), f))
    rows: list[tuple[str, list[tuple[str, tuple]]]] = []
    for fqn in fqns:
        parts = fqn.split(".")
        digit = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        layer, local = (".".join(parts[: digit + 1]), ".".join(parts[digit + 1 :])) if digit is not None else (None, fqn)
        pl = tuple(plan.param_placements[fqn].get(a, "-") for a in axes)
        key = layer if layer is not None else "#top"
        if rows and rows[-1][0] == key:
            rows[-1][1].append((local, pl))
        else:
            rows.append((key, [(local, pl)]))
    items = []
    for n, (key, cells) in enumerate(rows):
        grouped = tuple((name, pl, count) for name, pl, count in group_names(cells))
        if key == "#top":  # a run outside the blocks: named by its modules, never merged with another run
            mods = list(dict.fromkeys(c[0].split(".")[0] for c in cells))
            key = f"#{n}:" + (", ".join(mods[:3]) + (", ..." if len(mods) > 3 else ""))
        items.append((key, grouped))
    if len(items) == 1 and items[0][0].startswith("#"):  # no repeated blocks: the model is one row
        items = [(f"#0:{plan.model}", items[0][1])]
    out = []
    for name, grouped, count in group_names(items):
        out.append((name.split(":", 1)[1] if name.startswith("#") else name, [(c, pl) for c, pl, _ in grouped], count))
    return out


def _param_axes(plan: Plan) -> list[str]:
    """The mesh axes the parameters are placed on (not pp: a layer's stage says where it lives)."""
    return [a for a in plan.mesh if any(a in pl for pl in plan.param_placements.values())]


def svg_sharding(plan: Plan) -> str:
    """One row per layer group, one cell per parameter, one glyph per mesh axis: R, S(d) or P."""
    axes = _param_axes(plan)
    rows = _layer_rows(plan, axes)
    label_w, glyph, gap, row_h, x_max = 170, 20, 2, 46, CHART_WIDTH - 10
    cell_w = lambda name: max(len(axes) * (glyph + gap) + 6, min(len(name), 22) * 6.3 + 8)  # noqa: E731
    body, y = [], 6
    body.append(_text(0, y + 12, f"each cell: a parameter, one square per mesh axis ({', '.join(axes)})", 12,
                      extra=' fill="#555"'))
    y += 22
    for name, cells, count in rows:
        x = label_w
        body.append(_text(0, y + 28, name, 13, extra=' font-family="monospace"'))
        if count > 1:
            body.append(_text(0, y + 42, f"x{count} identical", 10, extra=' fill="#777"'))
        for local, pl in cells:
            short = local.removesuffix(".weight") if local != "weight" else "weight"
            w = cell_w(short)
            if x + w > x_max and x > label_w:  # wrap the row
                x, y = label_w, y + row_h
            shown = short if len(short) <= 22 else short[:21] + "\u2026"
            body.append(_text(x + 2, y + 12, shown, 10, extra=' font-family="monospace" fill="#333"'))
            tip = f"{name}.{local}: " + " ".join(f"{a}={p}" for a, p in zip(axes, pl))
            for k, (a, p) in enumerate(zip(axes, pl)):
                kind, mark = _placement_kind(p)
                gx = x + 2 + k * (glyph + gap)
                body.append(_rect(gx, y + 17, glyph, glyph, SHARD_COLOURS[kind], f"{tip} ({a}: {p})", f"shard-{kind}",
                                  ' stroke="#78909c" stroke-width="0.5" rx="2"'))
                body.append(_text(gx + glyph / 2, y + 31, mark, 9, "middle",
                                  f' fill="{"#fff" if kind in "SP" else "#37474f"}" pointer-events="none"'))
            x += w + 6
        y += row_h
        body.append(f'<line x1="0" y1="{y - 2}" x2="{x_max}" y2="{y - 2}" stroke="#eee"/>')
    if not rows:
        body.append(_text(0, y + 14, "(no parameters)", 12))
        y += 24
    legend, y = _legend(0, y + 6, [("R replicated", SHARD_COLOURS["R"]), ("S(d) sharded on tensor dim d", SHARD_COLOURS["S"]),
                                   ("P(op) partial, to be reduced", SHARD_COLOURS["P"])])
    return _svg(CHART_WIDTH, y + 4, "sharding-diagram", "sharding of each layer's parameters", body + legend)


# ---- one step as the cost model sees it --------------------------------------------------------


def _step_segments(plan: Plan) -> tuple[list[tuple], list[tuple[str, float, float]], float]:
    """The step laid out serially, as the cost model adds it up: forward (each op after the
    collectives that feed it), backward in reverse order (each op, then the collectives of its
    gradients), the gradient syncs, the optimizer step, then the fixed costs. Returns segments
    (lane, start, duration, colour, tip), phases (name, start, end) and the end time.

    The plan keeps one training cost per op; the forward is taken as a third of it, as the
    pipeline planner does (passes/pipeline.py)."""
    train = plan.mode == "train"
    order = {n["name"]: i for i, n in enumerate(plan.nodes)}
    ops = [n for n in plan.nodes if n.get("kind", "op") not in ("param", "buffer")]  # inputs and outputs too
    placed = {n["name"] for n in ops}
    by_phase: dict[str, list[dict]] = {"fwd": [], "bwd": [], "grad_sync": []}
    for c in plan.collectives:
        by_phase.setdefault(str(c.get("phase") or "fwd"), []).append(c)
    at: dict[tuple[str, str], list[dict]] = {}
    loose: dict[str, list[dict]] = {}
    for phase, cs in by_phase.items():
        for c in cs:
            if phase in ("fwd", "bwd") and c.get("node") in placed:
                at.setdefault((phase, c["node"]), []).append(c)
            else:
                loose.setdefault(phase, []).append(c)
    segs: list[tuple] = []
    phases: list[tuple[str, float, float]] = []
    t = 0.0

    def comm(c: dict) -> None:
        nonlocal t
        d = float(c["time_s"])
        tip = (f"{c['op']} on {c['axis']}, {c.get('phase') or '-'}: {c.get('tensor') or '-'} for "
               f"{c.get('node') or '-'}, {format_bytes(c['bytes'])}, {format_seconds(d)}")
        segs.append((c["axis"], t, d, COMM_COLOURS.get(c["op"], COMM_OTHER), tip))
        t += d

    def compute(name: str, d: float, kind: str) -> None:
        nonlocal t
        if d > 0:
            segs.append(("compute", t, d, COMPUTE_COLOURS[kind], f"{kind} {name}: {format_seconds(d)}"))
            t += d

    start = t
    for n in ops:
        for c in at.get(("fwd", n["name"]), []):
            comm(c)
        compute(n["name"], float(n.get("compute_s", 0.0)) / (3 if train else 1), "forward")
    for c in loose.get("fwd", []):
        comm(c)
    phases.append(("forward", start, t))
    if train:
        start = t
        for n in reversed(ops):
            compute(n["name"], float(n.get("compute_s", 0.0)) * 2 / 3, "backward")
            for c in at.get(("bwd", n["name"]), []):
                comm(c)
        for c in loose.get("bwd", []):
            comm(c)
        phases.append(("backward", start, t))
        start = t
        for c in sorted(loose.get("grad_sync", []), key=lambda c: -order.get(c.get("node"), -1)):
            comm(c)
        phases.append(("grad sync", start, t))
        start = t
        for n in plan.nodes:
            if n.get("kind") in ("param", "buffer"):
                compute(n["name"], float(n.get("compute_s", 0.0)), "optimizer")
        phases.append(("optimizer", start, t))
    for phase, cs in loose.items():  # phases the report does not know: at the end
        if phase not in ("fwd", "bwd", "grad_sync"):
            for c in cs:
                comm(c)
    start = t
    for key, name in (("codec_s", "gradient codec"), ("runtime_s", "runtime overhead")):
        for k in (key, f"all_stages_{key}"):
            compute(name, float(plan.time_breakdown.get(k, 0.0)), "other")
    if t > start:
        phases.append(("fixed", start, t))
    return segs, [p for p in phases if p[2] > p[1]], t


def _overlap_caption(plan: Plan) -> str:
    """What overlap of communication with compute the cost model assumes, in words."""
    tb = plan.time_breakdown
    pipelined = any(k.startswith("all_stages_") for k in tb)
    first = ("compute_s", "comm_fwd_s", "comm_bwd_s", "grad_sync_s")
    rank = lambda k: (first.index(k.removeprefix("all_stages_")) if k.removeprefix("all_stages_") in first else len(first), k)  # noqa: E731
    parts = {k: tb[k] for k in sorted(tb, key=rank) if k not in ("pipeline_step_s", "grad_sync_exposed_s")}
    summed = sum(v for v in parts.values() if isinstance(v, (int, float)))
    lines = ["This is the cost model's prediction, not a measurement."]
    if pipelined:
        lines.append(f"It is the intra-op plan of the whole model for the whole batch, as if on one pp rank "
                     f"({format_seconds(summed)}); the pipeline splits it into stages and microbatches, and its "
                     f"predicted step is {format_seconds(plan.step_time_s)} (see the pipeline schedule).")
        gap = summed
    else:
        gap = plan.step_time_s
    terms = " + ".join(k.removeprefix("all_stages_").removesuffix("_s").replace("_", " ") for k in parts)
    overlap = summed - gap
    if abs(overlap) <= 1e-9 * max(abs(gap), 1e-30) or pipelined:
        lines.append(f"The model assumes no overlap of communication with compute: the step is the sum "
                     f"{terms}, so every collective is exposed and the compute lane waits while it runs.")
    else:
        lines.append(f"The parts ({terms}) add up to {format_seconds(summed)} and the predicted step is "
                     f"{format_seconds(gap)}: the model counts {format_seconds(overlap)} as hidden.")
    pred = (plan.compression or {}).get("predicted")
    if pred:
        lines.append(f"Gradient compression was chosen assuming the gradient syncs can hide behind up to "
                     f"{format_seconds(pred['overlap_window_s'])} of backward compute (exposed "
                     f"{format_seconds(pred['compressed_exposed_s'])}); the step time still counts them in full.")
    listed = sum(c["time_s"] for c in plan.collectives)
    counted = sum(v for k, v in parts.items() if k.removeprefix("all_stages_") in ("comm_fwd_s", "comm_bwd_s", "grad_sync_s"))
    if abs(listed - counted) > 1e-6 * max(counted, 1e-30):
        lines.append(f"The collectives the plan lists add up to {format_seconds(listed)} of the "
                     f"{format_seconds(counted)} of communication the step counts; the rest is not drawn.")
    if plan.mode == "train":
        lines.append("Forward is taken as a third of each op's training cost, backward as the rest; "
                     "collectives sit at the op that consumes (forward) or produces (backward) their tensor.")
    return " ".join(lines)


def svg_step_timeline(plan: Plan) -> str:
    segs, phases, total = _step_segments(plan)
    axes = [a for a in plan.mesh if a != "pp"]
    axes += sorted({s[0] for s in segs if s[0] != "compute"} - set(axes))
    lanes = ["compute"] + axes
    label_w, plot_w, lane_h, top = 110, CHART_WIDTH - 160, 26, 22
    scale = plot_w / total if total > 0 else 0.0
    body = []
    for k, (name, s, e) in enumerate(phases):
        x, w = label_w + s * scale, (e - s) * scale
        body.append(_rect(x, top - 4, w, lane_h * len(lanes) + 6, "#f7f7f7" if k % 2 else "#efefef"))
        if w > 7 * len(name) + 8:
            body.append(_text(x + w / 2, top - 8, name, 11, "middle", ' fill="#555"'))
    for i, lane in enumerate(lanes):
        y = top + i * lane_h
        body.append(_text(0, y + 17, lane if lane == "compute" else f"comm {lane}", 13))
        body.append(f'<line x1="{label_w}" y1="{y + lane_h - 1}" x2="{label_w + plot_w}" y2="{y + lane_h - 1}" stroke="#ddd"/>')
    row = {lane: i for i, lane in enumerate(lanes)}
    for lane, s, d, colour, tip in segs:
        y = top + row[lane] * lane_h
        body.append(_rect(label_w + s * scale, y + 3, max(d * scale, 0.6), lane_h - 8, colour, tip,
                          "tl-compute" if lane == "compute" else "tl-comm"))
    y = top + len(lanes) * lane_h + 4
    body += _ticks(label_w, plot_w, total, y, format_seconds)
    ops = sorted({c["op"] for c in plan.collectives})
    items = [(k, COMPUTE_COLOURS[k]) for k in ("forward", "backward", "optimizer")]
    if any(s[3] == COMPUTE_COLOURS["other"] for s in segs):
        items.append(("fixed costs", COMPUTE_COLOURS["other"]))
    items += [(op, COMM_COLOURS.get(op, COMM_OTHER)) for op in ops]
    legend, y = _legend(label_w, y + 26, items)
    return _svg(CHART_WIDTH, y + 4, "step-timeline", "one step: compute and communication per mesh axis", body + legend)


def svg_comm_schedule(plan: Plan) -> str:
    """``plan.comm_schedule`` from the start of the backward: the compute stream (cut where
    gradients become ready) and a lane per mesh axis with its buckets; grey is idle time, the dashed
    line the backward's end."""
    cs, p = plan.comm_schedule, plan.comm_schedule["predicted"]
    lanes = [("compute", [(s, e, f"backward to {name}", COMPUTE_COLOURS["backward" if k % 2 else "forward"])
                          for k, (name, s, e) in enumerate(cs["timeline"]["compute"])])]
    lanes += [(f"comm {a}", [(s, e, f"bucket {k} on {a}: {_bucket(cs['buckets'][k])}, {format_seconds(s)} - "
                              f"{format_seconds(e)}", "#ef9a9a" if k % 2 else COMM_COLOURS["all_reduce"])
                             for k, s, e in spans]) for a, spans in cs["timeline"]["comm"].items()]
    label_w, plot_w, lane_h, top = 110, CHART_WIDTH - 160, 26, 10
    scale, body = plot_w / max(p["makespan_s"], 1e-30), []
    for i, (name, items) in enumerate(lanes):
        y = top + i * lane_h
        body += [_text(0, y + 17, name, 13), _rect(label_w, y + 3, plot_w, lane_h - 8, "#eeeeee", "idle", "cs-idle")]
        body += [_rect(label_w + s * scale, y + 3, max((e - s) * scale, 0.6), lane_h - 8, colour, tip,
                       "cs-comm" if i else "cs-compute") for s, e, tip, colour in items]
    x, y = label_w + p["backward_s"] * scale, top + len(lanes) * lane_h
    body.append(f'<line x1="{x:.2f}" y1="{top}" x2="{x:.2f}" y2="{y}" stroke="#333" stroke-dasharray="4 3"/>')
    body += _ticks(label_w, plot_w, p["makespan_s"], y + 4, format_seconds)
    legend, y = _legend(label_w, y + 30, [("backward compute", COMPUTE_COLOURS["backward"]),
                                         ("bucket all-reduce", COMM_COLOURS["all_reduce"]), ("idle", "#eeeeee")])
    return _svg(CHART_WIDTH, y + 4, "comm-schedule", "gradient buckets against the backward pass", body + legend)


# ---- memory per device -------------------------------------------------------------------------


def _capacity(plan: Plan) -> float | None:
    try:
        from .cost_models.hardware import load_hardware

        return float(load_hardware(plan.hardware).memory_capacity_bytes)
    except Exception:  # a plan from elsewhere: no preset here, the chart draws no capacity line
        return None


def svg_memory(plan: Plan) -> str:
    """A stacked bar of the memory kinds of one device; on a pipelined plan, a bar per pp rank (its
    total: the plan records no breakdown per stage) and the intra-op plan's breakdown."""
    capacity = _capacity(plan)
    colour, spare = {}, iter(MEMORY_OTHER * 4)
    kinds = sorted(plan.memory, key=lambda k: (list(MEMORY_COLOURS).index(k) if k in MEMORY_COLOURS else len(MEMORY_COLOURS), k))
    for k in kinds:
        colour[k] = MEMORY_COLOURS.get(k) or next(spare)
    bars: list[tuple[str, list[tuple[str, float, str]]]] = []
    pipe = plan.pipeline or {}
    ranks = pipe.get("rank_memory_bytes") or pipe.get("stage_memory_bytes")
    if ranks:
        for r, b in enumerate(ranks):
            bars.append((f"pp rank {r}", [("stage total (parameter state + in-flight activations)", float(b), MEMORY_STAGE)]))
        label = "whole model, before pp"
    else:
        label = "each device"
    bars.append((label, [(k, float(plan.memory[k]), colour[k]) for k in kinds
                         if isinstance(plan.memory[k], (int, float)) and plan.memory[k] > 0]))
    biggest = max([sum(v for _, v, _ in segs) for _, segs in bars] + [float(plan.peak_memory_bytes), 1.0])
    on_scale = capacity is not None and capacity <= 2.5 * biggest
    scale_max = max(biggest, capacity if on_scale else 0.0) * 1.04
    label_w, plot_w, bar_h, top = 170, CHART_WIDTH - 440, 30, 8
    body = []
    for i, (name, segs) in enumerate(bars):
        y = top + i * (bar_h + 10)
        body.append(_text(0, y + 20, name, 13))
        x = label_w
        for kind, v, c in segs:
            w = plot_w * v / scale_max
            body.append(_rect(x, y, w, bar_h, c, f"{name}: {kind} {format_bytes(v)}", "mem-seg",
                              ' stroke="#fff" stroke-width="0.5"'))
            x += w
        total = sum(v for _, v, _ in segs)
        body.append(_text(x + 6, y + 20, format_bytes(total) + (f" ({total / capacity:.1%} of capacity)" if capacity else ""), 12))
    y = top + len(bars) * (bar_h + 10)
    body += _ticks(label_w, plot_w, scale_max, y, format_bytes)
    if capacity and on_scale:
        x = label_w + plot_w * capacity / scale_max
        body.append(f'<line id="memory-capacity" x1="{x:.2f}" y1="{top - 4}" x2="{x:.2f}" y2="{y}" stroke="{CAPACITY_COLOUR}" '
                    f'stroke-width="2" stroke-dasharray="6 3"><title>capacity {format_bytes(capacity)}</title></line>')
        body.append(_text(x - 4, y - 4, f"capacity {format_bytes(capacity)}", 11, "end", f' fill="{CAPACITY_COLOUR}"'))
    elif capacity:
        body.append(_text(label_w + plot_w, y + 30, f"capacity of one {plan.hardware} device: {format_bytes(capacity)}, "
                          f"off this scale (peak {plan.peak_memory_bytes / capacity:.2%} of it)", 11, "end",
                          f' fill="{CAPACITY_COLOUR}"'))
    else:
        body.append(_text(label_w + plot_w, y + 30, f"capacity unknown: no hardware preset {plan.hardware!r} here", 11, "end"))
    items = [(k, c) for k, c in colour.items()] + ([("pp rank total", MEMORY_STAGE)] if ranks else [])
    legend, y = _legend(label_w, y + 40, items)
    return _svg(CHART_WIDTH, y + 4, "memory-chart", "memory per device", body + legend)


# ---- the pipeline schedule and the time breakdown ----------------------------------------------


def _svg_schedule(timeline) -> str:
    """A Gantt chart of the simulated schedule: one row per rank, one rect per pass coloured by its
    kind, each with a tooltip naming its stage, microbatch, kind and times."""
    label_w, plot_w, row_h = 70, 840, 24
    scale = plot_w / timeline.makespan if timeline.makespan > 0 else 0.0
    axis_y = 4 + row_h * timeline.p
    out = []
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
    return _svg(label_w + plot_w + 80, axis_y + 44, "pipeline-gantt", "pipeline schedule", out)


def _svg_bars(items: list[tuple[str, float]], total: float) -> str:
    """A horizontal bar chart, one bar per item, scaled to the largest of the items and ``total``."""
    scale = max([v for _, v in items] + [total, 1e-30])
    label_w, bar_w, row_h = 190, 420, 24
    out = []
    for i, (name, v) in enumerate(items):
        y = 4 + i * row_h
        w = max(0.0, bar_w * v / scale) if math.isfinite(v) else 0.0
        out.append(_text(0, y + 16, name, 13))
        out.append(f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" fill="{BAR_COLOUR}"/>')
        out.append(_text(label_w + w + 6, y + 16, format_seconds(v), 12))
    return _svg(label_w + bar_w + 120, row_h * len(items) + 8, "time-bars", "parts of the step time", out)


# ---- tables and the page -----------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]], right: set[int] | frozenset = frozenset(), table_id: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="num">{_esc(c)}</td>' if i in right else f"<td>{_esc(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    tid = f' id="{table_id}"' if table_id else ""
    return f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def collectives_table(plan: Plan, limit: int = 500) -> str:
    """Every collective, slowest first, with its bytes, time and share of the step."""
    ranked = sorted(plan.collectives, key=lambda c: (-c["time_s"], -c["bytes"]))
    rows = [collective_row(c) + [f"{c['time_s'] / plan.step_time_s:.1%}" if plan.step_time_s > 0 else "-"]
            for c in ranked[:limit]]
    out = (f'<div class="scroll">{_table(COLLECTIVE_HEADERS + ["of step"], rows, {6, 7, 8}, "collectives-table")}</div>'
           if rows else '<p id="collectives-table">(no collectives)</p>')
    if len(ranked) > limit:
        out += f"<p>the {limit} slowest of {len(ranked)} shown</p>"
    return out


def _slug(title: str, taken: set[str]) -> str:
    base = "sec-" + (re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section")
    slug, k = base, 2
    while slug in taken:
        slug, k = f"{base}-{k}", k + 1
    taken.add(slug)
    return slug


def _summary(plan: Plan) -> str:
    devices = math.prod(plan.mesh.values()) if plan.mesh else 0
    capacity = _capacity(plan)
    peak = format_bytes(plan.peak_memory_bytes) + (f" ({plan.peak_memory_bytes / capacity:.1%} of {format_bytes(capacity)})"
                                                     if capacity else "")
    comm = sum(c["time_s"] for c in plan.collectives)
    pipe = plan.pipeline
    cards = [("model", f"{plan.model} ({plan.mode})"), ("mesh", f"{fmt_mesh(plan.mesh)} ({devices} devices)"),
             ("hardware", plan.hardware), ("predicted step time", format_seconds(plan.step_time_s)),
             ("peak memory per device", peak),
             ("collectives", f"{len(plan.collectives)}, {format_seconds(comm)}"),
             ("solver", f"{plan.solver.get('name', '?')}: {plan.solver.get('status', '?')}")]
    if pipe:
        cards.append(("pipeline", f"{pipe.get('schedule')}, {pipe.get('microbatches')} microbatches, "
                                  f"bubble {float(pipe.get('bubble', 0.0)):.1%}"))
    if plan.warnings:
        cards.append(("warnings", str(len(plan.warnings))))
    return '<div id="summary" class="cards">' + "".join(
        f'<div class="card"><div class="k">{_esc(k)}</div><div class="v">{_esc(v)}</div></div>' for k, v in cards) + "</div>"


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.5em;margin-bottom:.3em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.cards{display:flex;flex-wrap:wrap;gap:.5em;margin:.8em 0}
.card{border:1px solid #ddd;border-radius:6px;padding:.4em .8em;background:#fafafa;min-width:9em}
.card .k{font-size:.75em;color:#666;text-transform:uppercase;letter-spacing:.04em}.card .v{font-weight:600}
nav#toc{background:#f5f7fa;border:1px solid #e0e4ea;border-radius:6px;padding:.4em 1em}
nav#toc ol{columns:2;margin:.3em 0}nav#toc a{color:#1e5aa8;text-decoration:none}
table{border-collapse:collapse;margin:.4em 0 1em}
th,td{border:1px solid #ccc;padding:2px 8px;font-family:ui-monospace,monospace;font-size:.85em;text-align:left;white-space:nowrap}
td.num{text-align:right}th{background:#eee;position:sticky;top:0}
.scroll{max-height:32em;max-width:100%;overflow:auto;display:inline-block;border:1px solid #eee}
.scroll table{margin:0}
figure{margin:.6em 0 1.2em}figcaption{font-size:.85em;color:#555;max-width:75em;margin-top:.3em}
svg.chart{display:block;max-width:100%;height:auto}svg text{font-family:system-ui,sans-serif}
"""


def render_html(plan: Plan, sections: list[Section]) -> str:
    taken: set[str] = set()
    toc: list[tuple[str, str]] = []
    body: list[str] = []
    drawn: set[str] = set()

    def figure(chart_id: str, svg: str, caption: str) -> str:
        drawn.add(chart_id)
        return f'<figure id="fig-{chart_id}">{svg}<figcaption>{_esc(caption)}</figcaption></figure>'

    def sharding() -> str:
        return figure("sharding-diagram", svg_sharding(plan),
                      "Each row is a layer (identical repeated layers grouped, as the table below groups them); "
                      "each cell a parameter, with one square per mesh axis: R replicated, S(d) sharded on "
                      "tensor dim d, P partial. Hover for the full name.")

    def timeline() -> str:
        return figure("step-timeline", svg_step_timeline(plan), _overlap_caption(plan))

    def memory() -> str:
        pp = (" Each pp rank's bar is its total (its stages' parameter state and in-flight activations: the plan "
              "records no breakdown per stage); the last bar is the intra-op plan of the whole model on one pp "
              "rank, before the split into stages, by kind." if plan.pipeline else "")
        return figure("memory-chart", svg_memory(plan),
                      "Predicted memory per device by kind." + pp + " The dashed line is the device's capacity "
                      "from the hardware preset, when it is on scale.")

    def comm_schedule() -> str:
        return figure("comm-schedule", svg_comm_schedule(plan), "The backward pass and its gradient all-reduces in "
                      "the buckets the solver chose, each issued once its last gradient is ready; the section's notes "
                      "compare the synchronous hooks and DDP's 25 MiB buckets.")

    charts: list[tuple[Callable[[str], bool], Callable[[], str]]] = [
        (lambda t: t.startswith("Parameter placements"), sharding),
        (lambda t: t.startswith("Memory per device"), memory),
        (lambda t: t == "Predicted step time", timeline),
        (lambda t: t.startswith(COMM_SCHEDULE_TITLE) and bool(plan.comm_schedule), comm_schedule),
    ]
    for s in sections:
        top_n = s.title.startswith("Top ") and s.title.endswith("collectives by time")
        shown = f"Collectives by time (all {len(plan.collectives)})" if top_n else s.title
        slug = _slug(shown, taken)
        toc.append((slug, shown))
        body.append(f'<h2 id="{slug}">{_esc(shown)}</h2>')
        for match, draw in charts:
            if match(s.title):
                body.append(draw())
        if s.title == SCHEDULE_TITLE and plan.pipeline:  # drawn as a chart, not as the text rows
            tl, summary = pipeline_timeline(plan.pipeline, plan.mesh.get("pp"))
            if tl is not None:
                body.append(figure("pipeline-gantt", _svg_schedule(tl), summary))
            else:
                body.append(f"<p>{_esc(summary)}</p>")
            continue
        if s.title == "Predicted step time":
            items = list(plan.time_breakdown.items()) + [("step (predicted)", plan.step_time_s)]
            body.append(figure("time-bars", _svg_bars(items, plan.step_time_s), "The parts of the predicted step."))
        if top_n:  # the text report's top few; here all of them, slowest first
            body.append(collectives_table(plan))
            drawn.add("collectives-table")
            body.extend(f"<p>{_esc(n)}</p>" for n in s.notes)
            continue
        if s.headers:  # a column of text bars is drawn as the chart above instead
            keep = [i for i in range(len(s.headers)) if i != s.bar]
            body.append(_table([s.headers[i] for i in keep], [[r[i] for i in keep] for r in s.rows],
                               {keep.index(i) for i in s.right if i in keep}))
        body.extend(f"<p>{_esc(n)}</p>" for n in s.notes)
    # charts whose section the tables no longer have (renamed or left out) still go on the page
    rest = [("Sharding per layer", "sharding-diagram", sharding), ("Memory per device (chart)", "memory-chart", memory),
            ("Step timeline", "step-timeline", timeline),
            ("All collectives", "collectives-table", lambda: collectives_table(plan))]
    for title, chart_id, draw in rest:
        if chart_id not in drawn:
            slug = _slug(title, taken)
            toc.append((slug, title))
            body += [f'<h2 id="{slug}">{_esc(title)}</h2>', draw()]
    title = _esc(f"autopar plan: {plan.model} on {fmt_mesh(plan.mesh)} ({plan.hardware})")
    nav = '<nav id="toc"><strong>Contents</strong><ol>' + "".join(
        f'<li><a href="#{slug}">{_esc(t)}</a></li>' for slug, t in toc) + "</ol></nav>"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{title}</title><style>{_STYLE}</style></head>\n<body>\n<h1>{title}</h1>\n"
        + _summary(plan) + "\n" + nav + "\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
