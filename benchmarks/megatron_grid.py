"""Issue 8, check 2: autopar's plan against the best Megatron-style grid point, per model preset.

Both sides are priced by autopar's cost model (roofline compute, alpha-beta collectives, the
stage formulas of ``solvers/inter_op.py``), on the same model, batch and devices:

- **autopar**: ``autopar plan PRESET --devices N --hardware h100-sxm`` (a fresh process; the
  solver chooses the mesh, placements, expert parallelism, schedule, microbatches and stages).
- **Megatron grid**: every tp in {1, 2, 4, 8} (dividing the kv heads), pp in {1, 2, 4, 8, 16}
  (dividing the layers), dp = N / (tp·pp) (dividing the batch), sequence parallelism off/on,
  activation recompute off/on, schedule 1F1B or interleaved (v that split the layers equally), and
  every microbatch count, with Megatron's fixed sharding: column-parallel q/k/v, gate/up (c_attn,
  c_fc), row-parallel o/down (c_proj), vocab-parallel embedding and head, MoE experts' FFNs split
  the same way on tp (no expert parallelism), norms and routers replicated, parameters replicated
  over dp; pp splits the layers equally. A point is kept if its busiest rank fits the device.
  Full recompute (Megatron's ``--recompute-granularity full``) is modelled here, as autopar's plans
  do not recompute: a middle layer keeps only its input, and runs its forward once more.

Prints, per preset, both step times and the ratio (grid / autopar; >= 1 means autopar's plan is no
slower). Run: ``python benchmarks/megatron_grid.py [--only llama3-8b ...] [--jobs 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import autopar
from autopar import models
from autopar.errors import AutoparError, InfeasibleError

HARDWARE = "h100-sxm"
CASES = {  # preset -> devices
    "gpt3-1.3b": 8, "gpt3-13b": 64, "gpt3-175b": 1024, "llama3-8b": 64, "llama3-70b": 256,
    "mixtral-8x7b": 64, "mixtral-8x22b": 256,
}
MOE = {"mixtral-8x7b", "mixtral-8x22b"}


def megatron_pins(family: str, tp: int, dp: int, vocab: int) -> dict:
    """Megatron-LM's fixed placements for a {dp, tp} mesh (size-1 axes left out)."""
    axes = [a for a, n in (("dp", dp), ("tp", tp)) if n > 1] or ["dp"]

    def on_tp(p):
        return {a: (p if a == "tp" else "R") for a in axes}

    rep = on_tp("R")
    vocab_pl = on_tp("S(0)") if vocab % tp == 0 else rep
    if family == "gpt2":  # HF GPT-2's Conv1D weight is [in, out]
        return {"lm_head.weight": vocab_pl, "transformer.wpe.weight": rep,  # wte is tied to lm_head
                "*.attn.c_attn.weight": on_tp("S(1)"), "*.attn.c_attn.bias": on_tp("S(0)"),
                "*.mlp.c_fc.weight": on_tp("S(1)"), "*.mlp.c_fc.bias": on_tp("S(0)"),
                "*.attn.c_proj.weight": on_tp("S(0)"), "*.mlp.c_proj.weight": on_tp("S(0)"),
                "*.c_proj.bias": rep, "*.ln_*": rep}
    pins = {"model.embed_tokens.weight": vocab_pl, "lm_head.weight": vocab_pl, "*norm.weight": rep,
            "*.self_attn.[qkv]_proj.weight": on_tp("S(0)"), "*.self_attn.o_proj.weight": on_tp("S(1)")}
    if family == "mixtral":  # experts [E, 2F, H] and [E, H, F]: each expert's FFN split on tp
        pins.update({"*.mlp.gate.weight": rep, "*.mlp.experts.gate_up_proj": on_tp("S(1)"),
                     "*.mlp.experts.down_proj": on_tp("S(2)")})
    else:
        pins.update({"*.mlp.gate_proj.weight": on_tp("S(0)"), "*.mlp.up_proj.weight": on_tp("S(0)"),
                     "*.mlp.down_proj.weight": on_tp("S(1)")})
    return pins


def with_recompute(totals):
    """Full activation recompute of every middle layer: it keeps only its input (the bytes that
    cross the cut before it) and runs its forward again in the backward pass."""
    names, work, cut, w, act, fwd, wgrad = totals
    L = len(names)
    work, act = list(work), list(act)
    for i in range(1, L - 1):
        work[i] += fwd[i]
        act[i] = cut[i - 1]
    return names, work, cut, w, act, fwd, wgrad


def grid(preset: str, devices: int, batch: int, progress) -> tuple[list[dict], int]:
    """Every feasible grid point (dicts with their step time), and how many were priced."""
    from autopar.api import plan_traced
    from autopar.cost_models.comm import axis_links
    from autopar.passes.pipeline import _price_fixed, layer_totals, local_batch
    from autopar.passes.replicate import trace_deep

    model, inputs = models.build(preset, batch=batch, device="meta")
    cfg = models.PRESETS[preset].config
    family = models.PRESETS[preset].family
    heads = cfg.get("num_key_value_heads", cfg.get("n_head", cfg.get("num_attention_heads")))
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    vocab = cfg["vocab_size"]
    tg = trace_deep(model, inputs)
    hw = autopar.Mesh({"dp": 1}, hardware=HARDWARE).hardware_spec
    limit = hw.memory_capacity_bytes
    points, priced = [], 0
    for tp in (1, 2, 4, 8):
        if heads % tp:
            continue
        for pp in (1, 2, 4, 8, 16):
            if devices % (tp * pp) or layers % pp or batch % (devices // (tp * pp)):
                continue
            dp = devices // (tp * pp)
            axes = {a: n for a, n in (("dp", dp), ("tp", tp)) if n > 1} or {"dp": 1}
            mesh = autopar.Mesh(axes, hardware=HARDWARE)
            link = hw.inter_node if mesh.size >= hw.devices_per_node else axis_links({"pp": pp}, hw)["pp"]
            for sp in ((False, True) if tp > 1 else (False,)):
                try:
                    inner = plan_traced(tg, mesh, "train", time_limit_s=20.0, memory_limit_bytes=float("inf"),
                                        progress=lambda m: None, pins=megatron_pins(family, tp, dp, vocab),
                                        sequence_parallel=sp if tp > 1 else None, expert_parallel=False)
                except (AutoparError, InfeasibleError) as e:
                    progress(f"{preset} tp={tp} pp={pp} sp={sp}: {str(e)[:100]}")
                    continue
                base = layer_totals(tg, inner)
                local = local_batch(inner, inputs) or 1
                for recompute in (False, True):
                    totals = with_recompute(base) if recompute else base
                    for m in [k for k in range(1, local + 1) if local % k == 0 and (pp > 1 or k == 1)]:
                        for schedule in (("1f1b", "interleaved-1f1b") if pp > 1 else ("1f1b",)):
                            if schedule == "interleaved-1f1b" and m % pp:
                                continue
                            priced += 1
                            try:
                                st = _price_fixed({"bounds": "equal"}, totals, link, pp, m, schedule, limit)
                            except (AutoparError, InfeasibleError):
                                continue
                            points.append({"tp": tp, "pp": pp, "dp": dp, "sp": sp, "recompute": recompute, "m": m,
                                           "schedule": schedule + (f" v={st.virtual_stages}" if st.virtual_stages > 1 else ""),
                                           "step": st.step_time, "memory": max(st.rank_memory)})
            progress(f"{preset}: tp={tp} pp={pp} done, {len(points)} feasible points so far")
    return points, priced


def run_autopar(preset: str, devices: int) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "plan.json")
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "autopar.cli", "plan", preset, "--devices", str(devices),
                            "--hardware", HARDWARE, "--out", out], capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if r.returncode:
            return dt, {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
        with open(out) as f:
            return dt, json.load(f)


def one(preset: str) -> dict:
    devices = CASES[preset]
    batch = max(models.PRESETS[preset].batch, devices)  # what `autopar plan --devices` uses
    log: list[str] = []
    t0 = time.perf_counter()
    points, priced = grid(preset, devices, batch, log.append)
    grid_s = time.perf_counter() - t0
    plan_s, plan = run_autopar(preset, devices)
    return {"preset": preset, "devices": devices, "batch": batch, "points": points, "priced": priced,
            "grid_s": grid_s, "plan_s": plan_s, "plan": plan, "log": log}


def describe(p: dict) -> str:
    return (f"tp={p['tp']} pp={p['pp']} dp={p['dp']} sp={'on' if p['sp'] else 'off'} "
            f"recompute={'on' if p['recompute'] else 'off'} m={p['m']} {p['schedule']}")


def main(argv=None) -> int:
    from concurrent.futures import ProcessPoolExecutor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(CASES), help="presets to run (default: all)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes, one preset each")
    args = ap.parse_args(argv)
    presets = args.only or list(CASES)
    rows = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for r in pool.map(one, presets):
            plan = r["plan"]
            best = min(r["points"], key=lambda p: p["step"]) if r["points"] else None
            mesh = ",".join(f"{a}={n}" for a, n in plan.get("mesh", {}).items()) or plan.get("error", "-")
            ours = plan.get("step_time_s")
            ratio = best["step"] / ours if best and ours else None
            print(f"{r['preset']} on {r['devices']} x {HARDWARE}, batch {r['batch']}: {r['priced']} grid points priced, "
                  f"{len(r['points'])} fit, in {r['grid_s']:.0f} s; autopar planned in {r['plan_s']:.1f} s", flush=True)
            if best:
                print(f"  best grid point: {describe(best)}, {best['step']:.3f} s, {best['memory'] / 1e9:.1f} GB")
            else:
                print("  best grid point: none fits")
            peak = plan.get("peak_memory_bytes", 0) / 1e9
            print(f"  autopar: {mesh}" + (f", {ours:.3f} s, {peak:.1f} GB" if ours else ""))
            verdict = "-" if ratio is None else ("no slower" if ratio >= 1 - 1e-9 else "SLOWER")
            rows.append([r["preset"] + (" (MoE)" if r["preset"] in MOE else ""), str(r["devices"]),
                         f"{best['step']:.3f} s" if best else "-", f"{ours:.3f} s" if ours else "-",
                         f"{ratio:.3f}" if ratio else "-", verdict])
    head = ["preset", "devices", "best Megatron grid point", "autopar", "grid / autopar", ""]
    widths = [max(len(x[k]) for x in [head] + rows) for k in range(len(head))]
    print()
    for x in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(x, widths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
