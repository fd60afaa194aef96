"""Train a small HF Mixtral (mixture of experts, built from a config) with expert parallelism on CPU ranks.

    autopar run examples/train_mixtral_ep.py --nproc 4                          # dp=2 x ep=2, 2 layers, 5 steps
    autopar run examples/train_mixtral_ep.py --nproc 2 -- --small --mesh ep=2   # 1 layer, 2 steps (the test)

autopar finds each MoE layer on the traced graph (router top-k, expert weights with a leading
expert dim, rows gathered per pick and summed back per token) and fuses it into one
``autopar.moe`` node. The pins shard the experts over ``ep``, so every MoE layer runs expert
parallel: tokens go to their experts' owners by all-to-all and come back. (On a model this
small the solver would rather replicate the experts; ``--auto`` shows its plan.) Dense layers use
``ep`` as one more data axis. Every step is checked against the same model trained in one
process; the script prints the largest differences and exits with status 1 if one is over the
tolerance.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM

import autopar

LAYOUT = {
    "embedding": {"dp": "S(0)"},  # the token embedding's output: each dp rank takes half the batch
    "moe_*": {"ep": "S(0)"},  # every MoE layer: experts sharded over ep, tokens moved by all-to-all
    "*experts*": {"ep": "S(0)"},  # the expert weights: each ep rank holds its share of the experts
}
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
    ap.add_argument("--mesh", default="dp=2,ep=2", help="mesh axes, outer to inner (default dp=2,ep=2)")
    ap.add_argument("--auto", action="store_true", help="no pins: the solver chooses every placement")
    args = ap.parse_args()
    layers, hidden, vocab, (batch, seq) = (1, 32, 64, (4, 8)) if args.small else (2, 64, 256, (8, 32))
    steps = args.steps or (2 if args.small else 5)

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = autopar.Mesh.parse(args.mesh)
    torch.manual_seed(0)
    cfg = MixtralConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=hidden + hidden // 2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        vocab_size=vocab, max_position_embeddings=seq, attn_implementation="sdpa", use_cache=False,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = MixtralForCausalLM(cfg)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)  # the same model, trained in this one process
    pins = None if args.auto else {k: v for k, v in LAYOUT.items() if set(v) <= set(mesh.axes)}
    pm = autopar.compile(model, mesh, example_inputs=(ids,), pins=pins)
    if rank == 0:
        print(pm.plan.summary())
        layouts = sorted({n["moe"]["layout"] for n in pm.plan.nodes if n.get("moe")})
        print(f"MoE layers: {sum(1 for n in pm.plan.nodes if n.get('moe'))}, layout {', '.join(layouts)}")
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
        for k in TOLERANCE:
            print(f"max |{k} diff| vs 1 process: {diff[k]:.2e}")
        print("FAIL: " + ", ".join(f"{k} over {TOLERANCE[k]:g}" for k in bad) if bad else "OK: matches 1 process")
    dist.destroy_process_group()
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
