"""Train a small HF Llama (grouped-query attention) with context parallelism on CPU ranks, dp=2 x cp=2.

    autopar run examples/train_long_context.py --nproc 4                         # 2 layers, 4 x 128 tokens, 5 steps
    autopar run examples/train_long_context.py --nproc 2 -- --small --mesh cp=2  # 1 layer, 2 x 16 tokens (the test)

The ``cp`` axis splits every sequence; attention runs as ring attention (K/V blocks passed round
the cp ring, causal work balanced zig-zag, partial results merged by log-sum-exp). Pass
``--context-parallel ulysses`` for the all-to-all scheme, or ``auto`` to let the solver choose per
layer. The plan says which scheme each layer got and what the others would have cost
(``autopar inspect long_context_plan.json``). Every step is checked against the same model
trained in one process; the script prints the largest differences and exits with status 1 if one
is over the tolerance.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import autopar

LAYOUT = {"embedding": {"dp": "S(0)"}}  # the token embedding's output: each dp rank takes half the batch
TOLERANCE = {"loss": 1e-4, "grad": 1e-4, "param": 1e-4}


def next_token_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


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
    ap.add_argument("--mesh", default="dp=2,cp=2", help="mesh axes, outer to inner (default dp=2,cp=2)")
    ap.add_argument("--context-parallel", choices=["ring", "ulysses", "auto"], default="ring")
    args = ap.parse_args()
    layers, vocab, (batch, seq) = (1, 64, (2, 16)) if args.small else (2, 256, (4, 128))
    steps = args.steps or (2 if args.small else 5)

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = autopar.Mesh.parse(args.mesh)
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=seq,
                      attn_implementation="sdpa", use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)  # the same model, trained in this one process
    pins = {k: v for k, v in LAYOUT.items() if set(v) <= set(mesh.axes)} or None
    pm = autopar.compile(model, mesh, example_inputs=(ids,), context_parallel=args.context_parallel, pins=pins)
    if rank == 0:
        print(pm.plan.summary())
        schemes = sorted({n["attention"] for n in pm.plan.nodes if n.get("attention")})
        print(f"attention layers: {sum(1 for n in pm.plan.nodes if n.get('attention'))}, scheme {', '.join(schemes)}")
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    diff = dict.fromkeys(TOLERANCE, 0.0)
    for step in range(steps):
        loss, ref_loss = next_token_loss(pm(ids).logits, ids), next_token_loss(ref(ids).logits, ids)
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
        pm.plan.save("long_context_plan.json")
        for k in TOLERANCE:
            print(f"max |{k} diff| vs 1 process: {diff[k]:.2e}")
        print("FAIL: " + ", ".join(f"{k} over {TOLERANCE[k]:g}" for k in bad) if bad else "OK: matches 1 process")
    dist.destroy_process_group()
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
