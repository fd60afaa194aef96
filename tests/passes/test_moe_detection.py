"""MoE layers are found on the traced graph (not by class), fused into one ``autopar.moe`` node
that computes what the ops it replaced computed, and anything unproven is left alone."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autopar.passes.moe import MOE_OP
from autopar.passes.trace import trace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))


def _run_graph(tg, model, inputs):
    flat = tg.feed(dict(model.named_parameters()), dict(model.named_buffers()), iter(inputs))
    return torch.fx.Interpreter(tg.gm).run(*flat)[0]


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("name", ["hf_mixtral", "hf_mixtral_bmm", "hf_qwen_moe", "user"])
def test_moe_layers_are_fused_and_compute_the_same(name):
    from models import build

    if name == "user":
        from moe import build as build_user

        model, inputs = build_user()
    else:
        model, inputs = build(name)
    tg = trace(model, inputs)
    moe = [n for n in tg.gm.graph.nodes if str(n.target) == MOE_OP]
    assert len(tg.moe) == len(moe) == 2, tg.warnings
    experts = {p: tuple(v.shape) for p, v in model.named_parameters() if v.dim() == 3}
    for layer in tg.moe:
        assert layer.top_k == 2 and layer.experts == (4 if name == "hf_qwen_moe" else 8)
        # the expert tensors, and nothing else: the router and Qwen's shared expert stay dense
        assert {tg.params[p] for p in layer.params} <= set(experts) and len(layer.params) == 2
        assert layer.flops_per_row > 0
    out = _run_graph(tg, model, inputs)
    ref = _logits(model(*inputs))
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    params = list(model.parameters())
    g = torch.autograd.grad(out.square().mean(), params, allow_unused=True)
    g_ref = torch.autograd.grad(ref.square().mean(), params, allow_unused=True)
    for a, b in zip(g, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


class _Dropping(nn.Module):
    """An MoE that drops every assignment past 3 per expert: not dropless, so not fused."""

    def __init__(self, d=16, experts=4):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.w = nn.Parameter(torch.randn(experts, d, d) / 4)

    def forward(self, x):
        w, e = torch.topk(F.softmax(self.router(x), -1), 2)
        e, w = e.reshape(-1), w.reshape(-1)
        onehot = F.one_hot(e, 4)
        kept = (((onehot.cumsum(0) - 1) * onehot).sum(1) < 3).to(x.dtype)
        tok = torch.arange(x.shape[0]).repeat_interleave(2)
        y = torch.bmm(self.w[e], x[tok].unsqueeze(-1)).squeeze(-1) * (w * kept).unsqueeze(-1)
        return torch.zeros_like(x).index_add(0, tok, y)


class _TopKPool(nn.Module):
    """A top-k that is not routing (no expert weights): nothing to say about it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(x).topk(4, dim=-1).values.sum(-1)


def test_unproven_patterns_stay_ordinary_ops():
    x = torch.randn(12, 16)
    tg = trace(_Dropping(), (x,))
    assert tg.moe == [] and any("left as ordinary ops" in w for w in tg.warnings), tg.warnings
    tg = trace(_TopKPool(), (x,))
    assert tg.moe == [] and tg.warnings == []


def test_capacity_drops_past_the_capacity_and_dropless_is_exact():
    from models import build

    from autopar.codegen.moe import moe_forward

    model, inputs = build("hf_mixtral")
    tg = trace(model, inputs)
    layer = tg.moe[0]
    experts = [dict(model.named_parameters())[tg.params[p]] for p in layer.params]
    T, k, E = 40, 2, layer.experts
    x = torch.randn(T, layer.hidden)
    # every token wants expert 0 first (it overflows), then another
    idx = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(E - 1)[:k - 1] + 1]) for _ in range(T)])
    w = torch.rand(T, k)
    full = moe_forward(layer, x, idx, w, experts)
    assert torch.allclose(moe_forward(layer, x, idx, w, experts, capacity_factor=E / k), full, atol=1e-6)
    cap = 1.0
    dropped = moe_forward(layer, x, idx, w, experts, capacity_factor=cap)
    limit = -(-int(cap * T * k) // E)
    # reference: the first `limit` assignments of each expert (in token order) are kept
    seen = [0] * E
    want = torch.zeros_like(full)
    for t in range(T):
        for j in range(k):
            e = int(idx[t, j])
            seen[e] += 1
            if seen[e] <= limit:
                m = torch.zeros(T, k)
                m[t, j] = 1
                want[t] += moe_forward(layer, x[t:t + 1], idx[t:t + 1], (w * m)[t:t + 1], experts)[0]
    assert torch.allclose(dropped, want, atol=1e-5)
    assert not torch.allclose(dropped, full, atol=1e-3)


def test_moe_options_reject_bad_values_clearly():
    import autopar
    from autopar.errors import AutoparError
    from moe import build as build_user

    model, inputs = build_user()
    tg = trace(model, inputs)
    mesh = autopar.Mesh({"ep": 2}, hardware="h100-sxm")
    for bad, words in (({"capacity_factor": -1.0}, "capacity_factor"), ({"capacity_factor": True}, "capacity_factor"),
                       ({"routing": 3}, "profile_routing"), ({"expert_parallel": "yes"}, "expert_parallel")):
        with pytest.raises(AutoparError, match=words):
            autopar.plan(model, mesh, inputs, traced=tg, **bad)
    with pytest.raises(AutoparError, match="cannot exchange tokens"):
        autopar.plan(model, autopar.Mesh({"dp": 2}, hardware="h100-sxm"), inputs, traced=tg, expert_parallel=True)
    # routing statistics of another model (3 layers) do not fit this one (2 MoE layers)
    from autopar.solvers.expert_placement import synthetic_routing

    with pytest.raises(AutoparError, match="cannot read routing statistics"):
        autopar.plan(model, mesh, inputs, traced=tg, routing="/nonexistent/routing.json")
    with pytest.raises(AutoparError, match="2 MoE layers"):
        autopar.plan(model, mesh, inputs, traced=tg, routing=synthetic_routing(layers=3, experts=8, tokens=64))
    plan = autopar.plan(model, mesh, inputs, traced=tg, expert_parallel=True, capacity_factor=1.5)
    entries = [n["moe"] for n in plan.nodes if n.get("moe")]
    assert [e["dispatch"] for e in entries] == ["capacity", "capacity"] and entries[0]["capacity_factor"] == 1.5
    assert all(e["exchange_axis"] == "ep" for e in entries) and any("drops tokens" in w for w in plan.warnings)
    assert autopar.Plan.from_json(plan.to_json()) == plan


def test_profile_routing_counts_every_pick():
    import autopar
    from moe import build as build_user

    model, inputs = build_user()
    stats = autopar.profile_routing(model, inputs, shards=4)
    tokens = inputs[0].numel()
    assert stats.counts.shape == (2, 8) and stats.tokens == tokens
    assert (stats.counts.sum(1) == 2 * tokens).all()  # top-2: two picks per token
    assert (stats.transitions.sum((1, 2)) == 4 * tokens).all()  # k^2 pairs per token between layers
    assert (stats.shard_counts.sum(1) == stats.counts).all() and (stats.shard_counts.sum(2) == 2 * tokens // 4).all()
    with pytest.raises(autopar.AutoparError, match="no MoE layer"):
        autopar.profile_routing(_TopKPool(), (torch.randn(4, 16),))
