"""The self-contained HTML report of ``autopar inspect plan.json --html report.html``: one file,
inline SVG charts and CSS, no scripts from a CDN, no network. A pure function of a Plan and the
sections autopar/report.py lays out.
"""

from __future__ import annotations

import html
import math

from .plan import Plan, format_seconds
from .report import _COLOURS, _PASSES, SCHEDULE_TITLE, Section, fmt_mesh, pipeline_timeline

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
