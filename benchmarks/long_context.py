"""Long context on 8 H100s: which meshes fit Llama-3-8B at 4K and at 128K tokens, and why (issue 5).

    python benchmarks/long_context.py [--seqs 4096 131072] [--meshes tp=8 cp=2,tp=4 ...]

Plans Llama-3-8B's shape (bf16, batch 1, AdamW, training) from the ``meta`` device on each mesh of
8 devices, with the solver free (Megatron-SP and the attention scheme its choice) and, for
contrast, with sequence parallelism forbidden. Prints per mesh: predicted step time, peak memory
per device, activations per device, the attention schemes on cp, whether the norms ran
sequence-sharded on tp; then the fastest plan that fits in 80 GB. No execution.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import autopar  # noqa: E402
from autopar.errors import InfeasibleError  # noqa: E402
from autopar.models import PRESETS, _build_preset  # noqa: E402

MESHES = ["tp=8", "cp=2,tp=4", "cp=4,tp=2", "cp=8", "dp=2,tp=4"]


def llama3_8b(seq: int):
    pre = PRESETS["llama3-8b"]
    pre = dataclasses.replace(pre, config={**pre.config, "max_position_embeddings": max(seq, 8192)})
    model, inputs = _build_preset(pre, 1, seq, "meta")
    return model.to(torch.bfloat16), inputs


def describe(plan) -> tuple[str, str]:
    schemes = sorted({n["attention"] for n in plan.nodes if n.get("attention")}) or ["-"]
    norms = {(n["placements"][0] if isinstance(n["placements"], list) else n["placements"]).get("tp", "-")
             for n in plan.nodes if n["op"] == "aten.mean.dim"}
    return ",".join(schemes), ",".join(sorted(norms))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096, 131072])
    ap.add_argument("--meshes", nargs="+", default=MESHES)
    ap.add_argument("--no-contrast", action="store_true", help="skip the runs with sequence parallelism forbidden")
    args = ap.parse_args()
    for seq in args.seqs:
        model, inputs = llama3_8b(seq)
        print(f"\nLlama-3-8B shape, batch 1 x {seq} tokens, bf16, h100-sxm (80 GB)")
        print(f"{'mesh':<12} {'SP':<6} {'step':>9} {'peak GB':>8} {'act GB':>7}  attention  norms(tp)  plan s")
        best = None
        for text in args.meshes:
            mesh = autopar.Mesh.parse(text, hardware="h100-sxm")
            for sp in ([None] if args.no_contrast or "tp" not in mesh.axes else [None, False]):
                t0 = time.perf_counter()
                try:
                    plan = autopar.plan(model, mesh, inputs, op_profile=None, sequence_parallel=sp)
                except InfeasibleError:
                    print(f"{text:<12} {'off' if sp is False else 'auto':<6} {'does not fit in 80 GB':>27}"
                          f"{'':>24}{time.perf_counter() - t0:6.1f}")
                    continue
                schemes, norms = describe(plan)
                print(f"{text:<12} {'off' if sp is False else 'auto':<6} {plan.step_time_s:8.3f}s "
                      f"{plan.peak_memory_bytes / 1e9:8.1f} {plan.memory['activations'] / 1e9:7.1f}  {schemes:<10} "
                      f"{norms:<10}{time.perf_counter() - t0:6.1f}", flush=True)
                if sp is None and (best is None or plan.step_time_s < best[1].step_time_s):
                    best = (text, plan)
        if best:
            print(f"fastest plan that fits: {best[0]} ({best[1].step_time_s:.3f} s)")
        else:
            print("no mesh fits")


if __name__ == "__main__":
    main()
