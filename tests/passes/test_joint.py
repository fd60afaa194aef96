"""The joint forward+backward graph gives the backward work per op."""

from __future__ import annotations

import torch

import autopar
from autopar.passes.joint import joint_costs
from autopar.passes.trace import trace
from models import MLP, build


def test_linear_backward_is_twice_forward():
    model, inputs = MLP(), (torch.randn(8, 32),)
    tg = trace(model, inputs)
    costs = joint_costs(tg.source.module(), *tg.example)
    lin = costs["linear_1"]  # fc2: needs the gradient of its input and of its weight
    assert lin.fwd_flops == 2 * 8 * 64 * 64
    assert abs(lin.backward_ratio - 2.0) < 0.05, lin
    assert costs["relu"].fwd_flops > 0
    first = costs["linear"]  # fc1's input is the user input: its gradient is never computed
    assert first.backward_ratio < 1.5, first


def test_train_plans_use_the_joint_graph_on_hf_models():
    for name in ("hf_gpt2", "hf_llama"):
        model, inputs = build(name)
        plan = autopar.plan(model, autopar.Mesh({"tp": 2}), inputs, mode="train")
        assert not any("joint" in w for w in plan.warnings), plan.warnings
