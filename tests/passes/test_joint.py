"""The joint forward+backward graph gives the backward work and the saved activations per op."""

from __future__ import annotations

import torch

import autopar
from autopar.passes.joint import joint_costs
from autopar.passes.trace import trace
from models import MLP, build


def test_linear_backward_is_twice_forward_and_relu_keeps_its_output():
    model, inputs = MLP(), (torch.randn(8, 32),)
    tg = trace(model, inputs)
    costs = joint_costs(tg.source.module(), *tg.example)
    lin = costs["linear_1"]  # fc2: needs the gradient of its input and of its weight
    assert lin.fwd_flops == 2 * 8 * 64 * 64
    assert abs(lin.backward_ratio - 2.0) < 0.05, lin
    relu = costs["relu"]
    assert relu.fwd_flops > 0 and relu.saved_fraction == 1.0  # relu's backward reads its output
    first = costs["linear"]  # fc1's input is the user input: its gradient is never computed
    assert first.backward_ratio < 1.5, first


def test_train_plans_use_the_joint_graph_on_hf_models():
    for name in ("hf_gpt2", "hf_llama"):
        model, inputs = build(name)
        plan = autopar.plan(model, autopar.Mesh({"tp": 2}), inputs, mode="train")
        assert not any("joint" in w for w in plan.warnings), plan.warnings
