"""Mixtral-8x22B on 256 H100s: the best expert-parallel plan against the best pure DP x TP x PP plan.

Traces the ``mixtral-8x22b`` preset once on the meta device (56 layers, 8 experts, top-2; batch
256 x 4096 tokens), then plans it on 256 ``h100-sxm`` devices:

* pure DP x TP x PP: meshes {pp, dp, tp}, as Megatron lays out a model without expert
  parallelism: ``expert_parallel=False`` (no token all-to-all), the experts pinned split over tp
  (each tp rank runs its experts on every token, the MoE outputs are summed over tp) and sequence
  parallelism on. (Left to itself, the pipeline's intra-op solve, which has no memory limit,
  replicates experts or activations over tp and no stage split fits in 80 GB.);
* expert parallel: meshes {pp, dp, ep, tp} with an ``ep`` axis, the layout of every layer the
  solver's choice.

Every plan is priced by the same cost model, pipeline schedule search included. Prints each
mesh's predicted step time and memory, the best of each kind and their ratio.

    python benchmarks/moe_offline.py                    # bf16, about 7 minutes on 2 cores
    python benchmarks/moe_offline.py --dtype float32    # the same in fp32
"""

from __future__ import annotations

import argparse
import time

import torch

import autopar
from autopar.errors import AutoparError, InfeasibleError
from autopar.models import build
from autopar.passes.pipeline import plan_pipeline
from autopar.passes.trace import trace

PURE = [(8, {"dp": 4, "tp": 8}), (16, {"dp": 2, "tp": 8}), (8, {"dp": 8, "tp": 4}), (4, {"dp": 8, "tp": 8})]
EP = [(8, {"dp": 4, "ep": 8}), (8, {"ep": 8, "tp": 4}), (4, {"dp": 8, "ep": 8}), (16, {"dp": 2, "ep": 8})]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                    help="parameter and activation dtype (bf16: what the model trains in; the AdamW state counts "
                         "in that dtype too, so memory is optimistic against fp32 master weights)")
    args = ap.parse_args()
    model, inputs = build("mixtral-8x22b", batch=args.batch, seq=args.seq, device="meta")
    model = model.to(getattr(torch, args.dtype))
    t0 = time.perf_counter()
    tg = trace(model, inputs)
    print(f"traced mixtral-8x22b ({len(tg.moe)} MoE layers) in {time.perf_counter() - t0:.0f} s")
    rows = []
    for kind, meshes, ep in (("pure DP x TP x PP", PURE, False), ("expert parallel", EP, None)):
        for pp, inner in meshes:
            name = ",".join(f"{a}={n}" for a, n in {"pp": pp, **inner}.items())
            t0 = time.perf_counter()
            try:
                pure = {"pins": {"*experts*": {"tp": "S(0)"}}, "sequence_parallel": True} if ep is False else {}
                plan, stages, _ = plan_pipeline(model, autopar.Mesh(inner, hardware="h100-sxm"), inputs, pp, traced=tg,
                                                expert_parallel=ep, **pure)
                layouts = sorted({n["moe"]["layout"] for n in plan.nodes if n.get("moe")})
                rows.append((kind, name, stages.step_time, max(stages.rank_memory), layouts))
                print(f"{kind:<18} {name:<22} step {stages.step_time:8.3f} s  memory {max(stages.rank_memory) / 1e9:6.1f} GB"
                      f"  MoE {'; '.join(layouts)}  ({time.perf_counter() - t0:.0f} s to plan)", flush=True)
            except (InfeasibleError, AutoparError) as e:
                print(f"{kind:<18} {name:<22} infeasible: {str(e)[:120]}", flush=True)
    best = {k: min((r for r in rows if r[0] == k), key=lambda r: r[2], default=None) for k in ("pure DP x TP x PP", "expert parallel")}
    for k, r in best.items():
        print(f"best {k}: " + (f"{r[1]}, predicted step {r[2]:.3f} s" if r else "none feasible"))
    if all(best.values()):
        pure, ep = best["pure DP x TP x PP"][2], best["expert parallel"][2]
        print(f"expert parallel / pure: {ep / pure:.3f} ({'EP wins' if ep < pure else 'EP loses'}, {pure / ep:.2f}x)")


if __name__ == "__main__":
    main()
