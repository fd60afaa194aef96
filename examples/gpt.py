"""A hand-written GPT, as a user would write it, with factories for the autopar CLI.

    autopar plan examples/gpt.py:small --mesh tp=2
    autopar validate --model examples/gpt.py:small --mesh tp=2
    autopar profile --hardware local --model examples/gpt.py:small --mesh tp=2

Each factory returns ``(model, example_inputs)``, built from a fixed seed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.proj = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (z(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """Token + position embeddings, pre-norm blocks, a language-model head tied to the embedding."""

    def __init__(self, vocab: int = 512, d: int = 256, heads: int = 4, layers: int = 2, max_len: int = 128):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for emb in (self.wte, self.wpe):  # GPT-2's init: a tied head on N(0, 1) embeddings starts far from log(vocab)
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


class WithLoss(nn.Module):
    """The GPT with its next-token loss inside, as training code runs it: the output is one number,
    so data parallelism costs only the gradient all-reduces (full logits gathered on every rank
    would cost more than data parallelism saves on a slow link)."""

    def __init__(self, **config):
        super().__init__()
        self.gpt = GPT(**config)

    def forward(self, ids):
        logits = self.gpt(ids)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _make(batch: int, seq: int, **config):
    torch.manual_seed(0)
    model = GPT(**config)
    ids = torch.randint(0, model.wte.num_embeddings, (batch, seq), generator=torch.Generator().manual_seed(1))
    return model, (ids,)


def tiny():
    """d=64, 2 layers, batch 4 x 16 tokens: overhead-bound, seconds to run anywhere."""
    return _make(4, 16, vocab=128, d=64, heads=4, layers=2, max_len=64)


def small():
    """d=256, 2 layers, batch 8 x 64 tokens: compute and communication both matter on a CPU."""
    return _make(8, 64, vocab=512, d=256, heads=4, layers=2, max_len=128)


def medium():
    """d=512, 2 layers, batch 8 x 64 tokens: compute dominates a CPU step; layouts differ clearly."""
    return _make(8, 64, vocab=512, d=512, heads=8, layers=2, max_len=128)
