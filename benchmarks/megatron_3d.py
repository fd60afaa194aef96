"""Check 3: autopar's 3-D plan for GPT-3 175B on 1024 H100s against Megatron-LM's published layout.

Both sides are priced by autopar's own cost model (roofline compute, alpha-beta collectives, the
stage formulas of ``solvers/inter_op.py``), so the ratio compares layouts, not cost models:

- **autopar**: tp = 8 (one node; the --devices search allows tp <= 8 too, but each mesh costs about
  a minute of tracing and annotation here, so this check fixes tp and lets the solver choose pp in
  {1, 2, 4, 8, 16}, dp = 1024 / (8 pp), and everything else: placements, schedule, microbatch count,
  stages per rank, stage split).
- **Megatron-LM** (Narayanan et al., SC21, Table 1: 175B on 1024 GPUs, t = 8, p = 16, d = 8, global
  batch 1536, microbatch 1, interleaved schedule): tp = 8 Megatron placements pinned (column-parallel
  c_attn and c_fc, row-parallel projections, vocab-parallel embedding, parameters replicated over
  dp), pp = 16 with equal layer counts per stage, interleaved-1f1b with m = 1536 / 8 = 192. The paper
  does not list its chunks per rank: v in {2, 3, 6} (the ones that split 96 layers equally) are
  priced and the best is shown.

Predicted MFU = 6 · N · tokens / (step time · devices · bf16 peak), N the parameter count (tied
embedding once), tokens = batch · seq. It is computed here, not stored in the plan. The model runs in
bf16 (``model.to(torch.bfloat16)``; autopar prices fp32 at the H100's non-tensor-core rate).

Run: ``python benchmarks/megatron_3d.py`` (two worker processes, each tracing the model once;
``--pp 16`` for a quick one).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

import autopar
from autopar import models
from autopar.errors import AutoparError, InfeasibleError
from autopar.passes.pipeline import plan_pipeline
from autopar.passes.trace import trace

DEVICES, TP, HARDWARE = 1024, 8, "h100-sxm"
_COL, _ROW = {"dp": "R", "tp": "S(1)"}, {"dp": "R", "tp": "S(0)"}  # HF GPT-2's Conv1D weight is [in, out]
MEGATRON_PINS = {  # the tied embedding (lm_head.weight): vocab-parallel with --pad-vocab, else left to the
    # solver (Megatron pads 50257 rows to 51200 to shard them; autopar shards only dims that divide evenly)
    "transformer.wpe.weight": {"dp": "R", "tp": "R"},
    "*.attn.c_attn.weight": _COL, "*.attn.c_attn.bias": {"dp": "R", "tp": "S(0)"},  # column-parallel QKV
    "*.attn.c_proj.weight": _ROW, "*.attn.c_proj.bias": {"dp": "R", "tp": "R"},  # row-parallel
    "*.mlp.c_fc.weight": _COL, "*.mlp.c_fc.bias": {"dp": "R", "tp": "S(0)"},
    "*.mlp.c_proj.weight": _ROW, "*.mlp.c_proj.bias": {"dp": "R", "tp": "R"},
    "*.ln_*.weight": {"dp": "R", "tp": "R"}, "*.ln_*.bias": {"dp": "R", "tp": "R"},
}


def _row(name, mesh, st, mfu) -> list[str]:
    if st is None:
        return [name, mesh, "-", "-", "-", "-", "-", "-"]
    sched = st.schedule + (f" v={st.virtual_stages}" if st.virtual_stages > 1 else "")
    return [name, mesh, sched, str(st.microbatches), f"{st.step_time:.3f} s", f"{mfu:.1%}",
            f"{max(st.rank_memory) / 1e9:.1f} GB", f"{st.bubble:.1%}"]


def _table(rows) -> str:
    head = ["", "mesh", "schedule", "microbatches", "step time", "MFU", "peak memory", "bubble"]
    widths = [max(len(r[k]) for r in [head] + rows) for k in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head] + rows)


PADDED_VOCAB = 51200  # Megatron's: 50257 rounded up to a multiple of 128 x tp
_STATE: dict = {}


def _build(batch: int, seq: int, pad_vocab: bool):
    if not pad_vocab:
        return models.build("gpt3-175b", batch=batch, seq=seq, device="meta")
    preset = models.PRESETS["gpt3-175b"]
    padded = dataclasses.replace(preset, config={**preset.config, "vocab_size": PADDED_VOCAB})
    return models._build_preset(padded, batch, seq, "meta")


def _init(batch: int, seq: int, pad_vocab: bool) -> None:
    """Per worker process: build and trace the model once for all the meshes it plans."""
    model, inputs = _build(batch, seq, pad_vocab)
    model = model.to(torch.bfloat16)
    pins = {**MEGATRON_PINS, "lm_head.weight": {"dp": "R", "tp": "S(0)"}} if pad_vocab else MEGATRON_PINS
    _STATE.update(model=model, inputs=inputs, tg=trace(model, inputs), pins=pins)


def _job(job: tuple) -> tuple:
    """("autopar", pp) or ("megatron", m): (job, StagePlan or None, why not, its log, seconds)."""
    model, inputs, tg = _STATE["model"], _STATE["inputs"], _STATE["tg"]
    log: list[str] = []
    t0 = time.perf_counter()
    try:
        if job[0] == "autopar":
            pp = job[1]
            mesh = autopar.Mesh({"dp": DEVICES // (TP * pp), "tp": TP}, hardware=HARDWARE)
            _, st, _ = plan_pipeline(model, mesh, inputs, pp, traced=tg, progress=log.append)
        else:  # no memory limit: the layout is priced as published, and its memory reported
            _, st, _ = plan_pipeline(model, autopar.Mesh({"dp": 8, "tp": TP}, hardware=HARDWARE), inputs, 16,
                                     traced=tg, pins=_STATE["pins"], memory_limit_bytes=float("inf"),
                                     progress=log.append,
                                     stages={"schedule": "interleaved-1f1b", "microbatches": job[1], "bounds": "equal"})
        return job, st, None, log, time.perf_counter() - t0
    except (InfeasibleError, AutoparError) as e:
        return job, None, str(e), log, time.perf_counter() - t0


def main(argv=None) -> int:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1536, help="global batch (Megatron's 1536)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--pp", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="pp sizes autopar may choose")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (each traces the model once)")
    ap.add_argument("--pad-vocab", action="store_true",
                    help=f"pad the vocabulary to {PADDED_VOCAB} as Megatron does (both sides), so that it can shard 8 ways")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    model, _ = _build(args.batch, args.seq, args.pad_vocab)
    n_params = sum(p.numel() for p in model.parameters())  # the tied embedding counts once
    tokens = args.batch * args.seq
    hw = autopar.Mesh({"tp": TP}, hardware=HARDWARE).hardware_spec
    peak = hw.peak_flops["bfloat16"]
    vocab = f"vocabulary padded to {PADDED_VOCAB}" if args.pad_vocab else "vocabulary 50257 (not padded)"
    print(f"GPT-3 175B preset: {n_params / 1e9:.1f}B parameters, bf16, {vocab}, global batch {args.batch} x seq "
          f"{args.seq} (Megatron SC21: 1536 x 2048), {DEVICES} x {HARDWARE}, tp = {TP}; {args.jobs} worker processes",
          flush=True)

    def mfu(st) -> float:
        return 6 * n_params * tokens / (st.step_time * DEVICES * peak)

    jobs = [("autopar", pp) for pp in sorted(args.pp)] + [("megatron", args.batch // 8)]  # microbatch 1 on dp = 8
    ours, meg, notes = [], None, []
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_init,
                             initargs=(args.batch, args.seq, args.pad_vocab)) as pool:
        for job, st, why, log, secs in pool.map(_job, jobs):
            name = f"autopar pp={job[1]}" if job[0] == "autopar" else "Megatron-LM layout"
            print(f"{name}: {'infeasible' if st is None else f'{st.step_time:.3f} s'} ({secs:.0f} s to plan)")
            for line in log:
                print(f"  .. {line}")
            if why:
                notes.append(f"{name}: {why[:400]}")
            elif job[0] == "autopar":
                ours.append((job[1], st))
            else:
                meg = st

    rows = []
    best = min(ours, key=lambda x: x[1].step_time) if ours else None
    for pp, st in ours:
        rows.append(_row(f"autopar pp={pp}" + (" (chosen)" if best and pp == best[0] else ""),
                         f"pp={pp},dp={DEVICES // (TP * pp)},tp={TP}", st, mfu(st)))
    if meg is not None:
        rows.append(_row("Megatron-LM SC21", "pp=16,dp=8,tp=8", meg, mfu(meg)))
    print()
    print(_table(rows))
    if meg is not None and max(meg.rank_memory) > hw.memory_capacity_bytes:
        print(f"note: the Megatron layout needs {max(meg.rank_memory) / 1e9:.1f} GB on its busiest rank, above the "
              f"{hw.memory_capacity_bytes / 1e9:.0f} GB of an H100: Megatron runs it with full activation "
              "recomputation, which autopar does not model (and so it also does not charge the recompute time)")
    for n in notes:
        print(f"note: {n}")
    for name, st in ([("autopar", best[1])] if best else []) + ([("Megatron", meg)] if meg is not None else []):
        p = len(st.rank_memory)
        ranks = sorted(sum(st.stage_times[r::p]) for r in range(p))
        print(f"{name}: per-microbatch time of its busiest rank {ranks[-1] * 1e3:.2f} ms, of its median rank "
              f"{ranks[p // 2] * 1e3:.2f} ms; layers per stage {[b - a for a, b in st.bounds]}")
    if best and meg is not None:
        ratio = meg.step_time / best[1].step_time
        verdict = "no slower" if ratio >= 1 else "SLOWER"
        print(f"\nMegatron / autopar predicted step time: {ratio:.3f} (autopar's plan is {verdict}); "
              f"MFU {mfu(best[1]):.1%} (autopar) vs {mfu(meg):.1%} (Megatron)")
    print(f"benchmark wall time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
