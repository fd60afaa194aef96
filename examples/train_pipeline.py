"""Train a small HF Llama through a 3-D mesh, pipeline x data x tensor (pp=2 x dp=2 x tp=2), on 8 CPU ranks.

    autopar run examples/train_pipeline.py --nproc 8                # 4 layers, hidden 64, 5 AdamW steps
    autopar run examples/train_pipeline.py --nproc 8 -- --small     # 2 layers, hidden 32, 2 steps (the test)

autopar splits the decoder layers into pipeline stages, lays each stage out over dp x tp, and
runs the plan's schedule (gpipe, 1f1b, interleaved-1f1b or zb-h1, with the microbatch count it
chose): ``pm.train_step`` is the training loop's forward + backward, and leaves every rank its own
stage's gradients. The pins lay each stage out Megatron-style on ``tp`` and split the batch over
``dp`` (the solver alone keeps a model this small replicated; ``--auto`` shows its plan). Every
step is checked against the same model trained in one process; the script prints the largest
differences and exits with status 1 if one is over the tolerance.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import autopar

LAYOUT = {
    "embedding": {"dp": "S(0)"},  # the token embedding's output: each dp rank takes half of each microbatch
    "model.layers.*.self_attn.[qkv]_proj.weight": {"tp": "S(0)"},
    "model.layers.*.self_attn.o_proj.weight": {"tp": "S(1)"},
    "model.layers.*.mlp.gate_proj.weight": {"tp": "S(0)"},
    "model.layers.*.mlp.up_proj.weight": {"tp": "S(0)"},
    "model.layers.*.mlp.down_proj.weight": {"tp": "S(1)"},
}
TOLERANCE = {"loss": 1e-4, "grad": 1e-4, "param": 1e-4}


def next_token_loss(out, ids):
    return F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def max_diff(pm, ref, grad: bool) -> float:
    """Largest |compiled - one process| over this rank's stage's parameters (or gradients), on every rank."""
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
    ap.add_argument("--mesh", default="pp=2,dp=2,tp=2", help="mesh axes, outer to inner (default pp=2,dp=2,tp=2)")
    ap.add_argument("--auto", action="store_true", help="no pins: the solver chooses every placement")
    args = ap.parse_args()
    layers, hidden, vocab, (batch, seq) = (2, 32, 64, (8, 8)) if args.small else (4, 64, 256, (16, 32))
    steps = args.steps or (2 if args.small else 5)

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = autopar.Mesh.parse(args.mesh)
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=seq,
                      attn_implementation="sdpa", use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)  # the same model, trained in this one process
    pins = None if args.auto else {k: v for k, v in LAYOUT.items() if set(v) <= set(mesh.axes)}
    pm = autopar.compile(model, mesh, example_inputs=(ids,), pins=pins)
    if rank == 0:
        pipe = pm.plan.pipeline
        print(pm.plan.summary())
        print(f"{len(pipe['bounds'])} stages {pipe['bounds']}, schedule {pipe['schedule']}, "
              f"{pipe['microbatches']} microbatches")
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    diff = dict.fromkeys(TOLERANCE, 0.0)
    for step in range(steps):
        loss = pm.train_step(ids, target=ids, loss_fn=next_token_loss)  # the mean over the microbatches
        ref_loss = next_token_loss(ref(ids), ids)
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
