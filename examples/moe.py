"""A mixture-of-experts transformer written by hand, and autopar running it expert-parallel.

The MoE layer is the usual pattern: a linear router, softmax, top-k, every (token, pick) row
gathers its expert's weights, and the rows are scattered back into their tokens with
``index_add``. Nothing here tells autopar it is an MoE: ``autopar.plan`` finds the layer on the
traced graph (passes/moe.py), and the plan shards the experts over the ``ep`` axis and moves the
tokens to them by all-to-all.

    python examples/moe.py                          # plan it on 8 H100s, dp=2 x ep=4, and explain the MoE layers
    autopar run examples/moe.py --nproc 4           # train it on 4 CPU ranks, ep=4, checked against one process
    python examples/moe.py --small                  # 1 layer, d=32 (the test; also under autopar run: ep=2, 2 steps)

Trained, it prints the largest difference from the same model trained in one process (losses,
gradients, parameters) and exits with status 1 if one is over the tolerance.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F


class MoE(nn.Module):
    def __init__(self, d: int, hidden: int, experts: int, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, hidden, d) / d ** 0.5)
        self.w_out = nn.Parameter(torch.randn(experts, d, hidden) / hidden ** 0.5)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.router(x), dim=-1)
        weight, expert = torch.topk(probs, self.top_k, dim=-1)
        weight = weight / weight.sum(-1, keepdim=True)
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)
        expert, weight = expert.reshape(-1), weight.reshape(-1)
        rows = x[token]
        h = F.gelu(torch.bmm(self.w_in[expert], rows.unsqueeze(-1)).squeeze(-1))
        y = torch.bmm(self.w_out[expert], h.unsqueeze(-1)).squeeze(-1) * weight.unsqueeze(-1)
        return torch.zeros_like(x).index_add(0, token, y).reshape(shape)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, experts: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.moe = MoE(d, 2 * d, experts)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(d, -1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.moe(self.ln2(x))


class MoEGPT(nn.Module):
    def __init__(self, vocab=256, d=64, heads=4, layers=2, experts=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, experts) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def build(seed: int = 0, small: bool = False):
    """The model and a batch of token ids; ``small``: 1 layer, d=32, 4 x 8 tokens (the test)."""
    torch.manual_seed(seed)
    if small:
        return MoEGPT(vocab=64, d=32, layers=1), (torch.randint(0, 64, (4, 8)),)
    return MoEGPT(), (torch.randint(0, 256, (8, 32)),)


EP = {"moe_*": {"ep": "S(0)"}, "*.moe.w_*": {"ep": "S(0)"}}  # experts sharded over ep, tokens moved by all-to-all


def plan_offline(small: bool) -> int:
    import autopar

    model, inputs = build(small=small)
    plan = autopar.plan(model, autopar.Mesh({"dp": 2, "ep": 4}, hardware="h100-sxm"), inputs, pins=EP)
    for name, e in plan.explanations.items():
        if name.startswith("moe_"):
            print(f"{name}: {e['chosen']}  ({e['reason'][:60]}...)")
            for alt in e["alternatives"]:
                print(f"    {alt['moe']:<40} {alt['cost_s'] * 1e6:9.1f} us")
    print(f"predicted step: {plan.step_time_s * 1e3:.3f} ms")
    return 0


def train(small: bool, steps: int) -> int:
    """Under ``autopar run --nproc N``: ep=N, a few AdamW steps, checked against one process."""
    import copy

    import torch.distributed as dist

    import autopar
    import common  # examples/common.py: the harness every training example shares

    rank = common.start()
    model, (ids,) = build(small=small)
    ref = copy.deepcopy(model)
    pm = autopar.compile(model, autopar.Mesh({"ep": dist.get_world_size()}), example_inputs=(ids,), pins=EP)
    if rank == 0:
        print(f"MoE layers: {sorted({n['moe']['layout'] for n in pm.plan.nodes if n.get('moe')})}")
    target = torch.roll(ids, -1, 1).flatten()
    return common.train_and_compare(pm, ref, lambda m: F.cross_entropy(m(ids).flatten(0, 1), target), steps)


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description="plan the hand-written MoE offline, or train it under autopar run")
    ap.add_argument("--small", action="store_true", help="1 layer, d=32, 2 steps (the test)")
    ap.add_argument("--steps", type=int, help="optimizer steps under autopar run (default 5; 2 with --small)")
    args = ap.parse_args()
    if "RANK" in os.environ:
        return train(args.small, args.steps or (2 if args.small else 5))
    return plan_offline(args.small)


if __name__ == "__main__":
    raise SystemExit(main())
