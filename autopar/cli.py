"""The ``autopar`` command line: plan, inspect, explain, diff, run.

Every command reads or writes plans through :mod:`autopar.plan` (plain JSON, never code). Errors
that autopar raises on purpose are printed as ``autopar: error: <message>`` with exit code 1.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .cost_models.memory import OPTIMIZERS
from .errors import AutoparError, InfeasibleError
from .plan import Plan, format_bytes, format_seconds
from .progress import Reporter, phase
from .report import (COLLECTIVE_HEADERS, TIMELINE_COLUMNS, Section, _node_for_param, collective_row,  # noqa: F401
                     collective_totals, fmt_mesh, fmt_placements, fmt_shape, group_names, inspect_sections,
                     inspect_json, pipeline_timeline, render_table, render_text, rich_report)
from .html_report import render_html



def cmd_inspect(args) -> int:
    plan = Plan.load(args.plan)
    sections = inspect_sections(plan)
    if args.html:
        _write_text(args.html, render_html(plan, sections))
        print(f"wrote HTML report to {args.html}", file=sys.stderr)
    if args.json:
        print(json.dumps(inspect_json(plan, sections), indent=1))
    else:
        show(sections)
    return 0


def show(sections: list[Section]) -> None:
    """Print report sections: rich tables on a terminal (rich's test, so TTY_COMPATIBLE=1 or
    FORCE_COLOR force it), plain aligned text that greps well elsewhere (pipes, logs)."""
    from rich.console import Console

    console = Console(file=sys.stdout, highlight=False)
    if console.is_terminal:
        console.print(rich_report(sections))
    else:
        sys.stdout.write(render_text(sections))


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
        if _non_replicated(pa) != _non_replicated(pb):  # replicated on every axis is one layout, whatever the mesh
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


def _non_replicated(pl: dict | None) -> dict | None:
    return None if pl is None else {a: p for a, p in pl.items() if p != "R"}


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


PP_SIZES = (1, 2, 4, 8, 16)  # pipeline depths the --devices search tries


CP_SIZES = (1, 2, 4, 8)  # context-parallel degrees the --devices search tries for long sequences
CP_MIN_SEQ = 16384  # from this sequence length on, the --devices search also tries cp
EP_SIZES = (2, 4, 8, 16, 32, 64)  # for MoE models, the expert-parallel degrees the --devices search tries (dividing the experts)
# Without --time-limit the search solves each mesh for SEARCH_TIME_LIMIT_S, then solves again the
# REFINE fastest meshes whose solve stopped short of optimal, with the full default limit.
SEARCH_TIME_LIMIT_S, REFINE = 3.0, 2


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

    say = args.progress
    if args.devices is not None and args.devices < 1:
        raise AutoparError(f"--devices must be a positive int, got {args.devices}")
    batch = args.batch
    if args.devices is not None and batch is None and args.model in models.PRESETS:
        # a mesh search needs a batch every data-parallel degree divides: one sequence per device at least
        batch = max(models.PRESETS[args.model].batch, args.devices)
        say(f"batch {batch} x {models.PRESETS[args.model].seq if args.seq is None else args.seq} tokens "
                  f"(the preset's, at least one sequence per device; --batch sets it)")
    model, example_inputs = models.build(args.model, batch=batch, seq=args.seq, device="meta")
    options = {"mode": args.mode, "progress": say, "optimizer": args.optimizer,
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
        with phase(say, "tracing"):
            traced = trace_deep(model, example_inputs, progress=say)  # once, for every mesh
        say(f"traced {traced.model_name} in {time.perf_counter() - t0:.1f} s")
        experts = {m.experts for m in traced.moe}
        ep_sizes = (1,) + tuple(e for e in EP_SIZES if all(n % e == 0 for n in experts)) if experts else (1,)
        if options.get("expert_parallel") is False:
            ep_sizes = (1,)
        from .api import _trainable, explain_infeasible

        hw = load_hardware(args.hardware)
        state = {"mode": args.mode, "trainable": _trainable(model), "optimizer": args.optimizer}

        def plan_on(axes, **limit):
            return make_plan(model, Mesh(axes, hardware=args.hardware), example_inputs, traced=traced,
                             fusion_preview=False, **{**limit, **options})
        meshes = candidate_meshes(args.devices, per_node, PP_SIZES, cp_sizes, ep_sizes)
        search = phase(say, f"mesh search ({len(meshes)} meshes)", total=len(meshes))
        for axes in meshes:
            search.advance()
            why = explain_infeasible(traced, axes, hw, hw.memory_capacity_bytes, **state)
            if why:  # the model state alone overflows every layout (solvers/feasibility.py)
                tried.append((axes, None, why))
                continue
            say(f"planning mesh {fmt_mesh(axes)}")
            try:
                p = plan_on(axes, time_limit_s=SEARCH_TIME_LIMIT_S)
                tried.append((axes, p, None))
            except InfeasibleError as e:
                tried.append((axes, None, e.explanation))
            except AutoparError as e:  # e.g. a mesh this model cannot use; keep going with the others
                tried.append((axes, None, str(e)))
        search.close()
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
            why = explain_infeasible(traced, None, hw, hw.memory_capacity_bytes, devices=args.devices, **state)
            raise InfeasibleError(why or f"no mesh of {args.devices} devices is feasible for {args.model}: {reasons}")
        feasible.sort(key=lambda x: x[1].step_time_s)
        if "time_limit_s" not in options:  # solve the front runners to the full default limit
            for k, (axes, p) in enumerate(feasible[:REFINE]):
                if p.solver.get("status") != "OPTIMAL":
                    say(f"solving mesh {fmt_mesh(axes)} again without the search's {SEARCH_TIME_LIMIT_S:g} s limit")
                    feasible[k] = (axes, plan_on(axes))
        axes, result = min(feasible, key=lambda x: x[1].step_time_s)
        if result.pipeline is None:  # pipelined programs are not fused (yet)
            from .api import preview_fusion

            result.fusion = preview_fusion(traced, result, Mesh(axes, hardware=args.hardware))
        print(f"chosen mesh: {fmt_mesh(axes)} (fastest feasible)\n")

    show(inspect_sections(result))
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
    if not args.timeout > 0:
        raise AutoparError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    from .launch import run_script

    addr = args.master_addr or "127.0.0.1"  # loopback unless told otherwise
    port = args.master_port or _free_port(addr)
    try:  # a failing rank stops the others; its traceback and a line naming it are printed
        return run_script(args.script, script_args, nproc=args.nproc, addr=addr, port=port, timeout=args.timeout)
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
    args.progress(f"validating {args.model} on {args.mesh}: profiling its ops (cached), planning, then "
                  f"{args.rounds} rounds of {args.steps} steps on {mesh.size} local ranks")
    with phase(args.progress, "validating"):
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
    args.progress(f"profiling the ops of {args.model} for mesh {args.mesh} on this device (one rank, one thread)")
    res = profile_model(args.model, mesh.axes, mode=args.mode, batch=args.batch, seq=args.seq, repeats=args.repeats,
                        refresh=args.refresh, verbose=not args.quiet)
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
    args.progress(f"measuring collectives on {args.nproc} local gloo ranks, {format_bytes(sizes[0])}..{format_bytes(sizes[-1])}")
    try:
        with phase(args.progress, "measuring collectives"):
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

    def quiet(p):
        p.add_argument("-q", "--quiet", action="store_true", help="no progress lines or bars on stderr (errors and "
                       "results still print)")

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
    quiet(p)
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
    p.add_argument("--json", action="store_true", help="print the report's data as JSON (stable keys, bytes and "
                   "seconds unformatted); the plan file itself is the plan's JSON")
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
        usage="autopar run SCRIPT --nproc N [--timeout S] [--master-addr A] [--master-port P] [--] [script args...]",
        allow_abbrev=False,
    )
    p.add_argument("script")
    p.add_argument("--nproc", type=int, required=True, help="number of local ranks")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a collective may wait for the other ranks before the run fails (default: 300); "
                        "ranks read it as $AUTOPAR_TIMEOUT when autopar.compile binds the process group")
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
    quiet(p)
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
    quiet(p)
    p.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and args.command != "run":  # only `autopar run` passes arguments on (to the script)
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    args.progress = Reporter(quiet=bool(getattr(args, "quiet", False)))
    try:
        if args.command == "run":
            if extra[:1] == ["--"]:
                extra = extra[1:]
            return cmd_run(args, extra)
        return args.func(args)
    except AutoparError as e:
        args.progress.close()
        print(f"autopar: error: {e}", file=sys.stderr)
        return 1
    finally:
        args.progress.close()


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
