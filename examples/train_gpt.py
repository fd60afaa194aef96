"""Compile the hand-written GPT (examples/gpt.py) and train it on 4 CPU ranks, dp=2 x tp=2.

    autopar run examples/train_gpt.py --nproc 4                  # d=64, 2 layers, 5 AdamW steps
    autopar run examples/train_gpt.py --nproc 4 -- --small       # d=32, 1 layer, 2 steps (the test)
    autopar run examples/train_gpt.py --nproc 2 -- --mesh tp=2   # any mesh with as many devices as ranks

Every rank builds the same model from the same seed and calls ``autopar.compile``; the loss is
inside the model (``gpt.WithLoss``), so the output is one number. The pins lay the model out
Megatron-style: the batch split over ``dp`` (from the token embedding on), q/k/v and fc1 split by
output features over ``tp``, proj and fc2 by input features. On a model this small the solver on
its own keeps everything replicated (communication costs more than it saves here); ``--auto``
shows that plan. Every step is checked against the same model trained in one process: the
script prints the largest difference of the losses, the gradients and the parameters, and exits
with status 1 if one is larger than the tolerance.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.distributed as dist

import autopar
from gpt import WithLoss

LAYOUT = {
    "embedding": {"dp": "S(0)"},  # the token embedding's output: each dp rank takes half the batch
    "gpt.blocks.*.[qkv].weight": {"tp": "S(0)"},
    "gpt.blocks.*.fc1.*": {"tp": "S(0)"},
    "gpt.blocks.*.proj.weight": {"tp": "S(1)"},
    "gpt.blocks.*.fc2.weight": {"tp": "S(1)"},
}
TOLERANCE = {"loss": 1e-4, "grad": 1e-4, "param": 1e-4}


def max_diff(pm, ref, grad: bool) -> float:
    """Largest |compiled - one process| over every parameter (or its gradient), on every rank."""
    ref_params = dict(ref.named_parameters())
    worst = torch.zeros(())
    with torch.no_grad():
        for fqn, p in pm.named_parameters():
            mine, theirs = (p.grad, ref_params[fqn].grad) if grad else (p, ref_params[fqn])
            worst = torch.maximum(worst, (mine.full_tensor() - theirs).abs().max())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="the smallest meaningful configuration (tests)")
    ap.add_argument("--steps", type=int, help="optimizer steps (default 5; 2 with --small)")
    ap.add_argument("--mesh", default="dp=2,tp=2", help="mesh axes, outer to inner (default dp=2,tp=2)")
    ap.add_argument("--auto", action="store_true", help="no pins: the solver chooses every placement")
    args = ap.parse_args()
    config = dict(vocab=64, d=32, heads=4, layers=1, max_len=16) if args.small else \
        dict(vocab=128, d=64, heads=4, layers=2, max_len=64)
    batch, seq = (4, 8) if args.small else (8, 32)
    steps = args.steps or (2 if args.small else 5)

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = autopar.Mesh.parse(args.mesh)
    torch.manual_seed(0)
    model = WithLoss(**config)
    ids = torch.randint(0, config["vocab"], (batch, seq), generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)  # the same model, trained in this one process
    pins = None if args.auto else {k: v for k, v in LAYOUT.items() if set(v) <= set(mesh.axes)}
    pm = autopar.compile(model, mesh, example_inputs=(ids,), pins=pins)
    if rank == 0:
        print(pm.plan.summary())
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    diff = dict.fromkeys(TOLERANCE, 0.0)
    for step in range(steps):
        loss, ref_loss = pm(ids), ref(ids)
        loss.backward()
        ref_loss.backward()
        diff["loss"] = max(diff["loss"], abs(loss.item() - ref_loss.item()))
        diff["grad"] = max(diff["grad"], max_diff(pm, ref, grad=True))
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.5f}  (1 process: {ref_loss.item():.5f})")
    diff["param"] = max_diff(pm, ref, grad=False)
    bad = [k for k, tol in TOLERANCE.items() if diff[k] > tol]
    if rank == 0:
        for k in TOLERANCE:
            print(f"max |{k} diff| vs 1 process: {diff[k]:.2e}")
        print("FAIL: " + ", ".join(f"{k} over {TOLERANCE[k]:g}" for k in bad) if bad else "OK: matches 1 process")
    dist.destroy_process_group()
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
