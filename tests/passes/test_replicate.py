"""A deep model traced from its 2- and 3-block cuts (passes/replicate.py) is the whole export,
node for node, and plans identically."""

import pytest
import torch
import torch.nn as nn

import autopar
from autopar.passes.replicate import _describe, trace_deep, uniform_blocks
from autopar.passes.trace import trace
from tests.models import GPT, hf_gpt2, hf_llama, hf_mixtral

LAYERS = 6  # the fewest blocks trace_deep extends (MIN_BLOCKS)


def _same(a, b):
    assert a.graph_hash == b.graph_hash
    assert a.params == b.params and a.buffers == b.buffers and a.user_inputs == b.user_inputs
    da, db = _describe(a.gm.graph, a.params, a.buffers), _describe(b.gm.graph, b.params, b.buffers)
    assert len(da) == len(db)
    assert next(((x, y) for x, y in zip(da, db) if x != y), None) is None  # the first node that differs


@pytest.mark.parametrize("build", [lambda: hf_llama(layers=LAYERS), lambda: hf_gpt2(layers=LAYERS),
                                   lambda: hf_mixtral(layers=LAYERS, impl="batched_mm"), lambda: GPT(layers=LAYERS)],
                         ids=["hf_llama", "hf_gpt2", "hf_mixtral", "gpt"])
def test_extension_equals_the_whole_export(build):
    with torch.device("meta"):
        model = build()
    x = (torch.randint(0, 128, (2, 16)),)
    said = []
    deep = trace_deep(model, x, progress=said.append)
    assert any("from 2- and 3-block exports" in s for s in said), said  # the shortcut was taken
    _same(deep, trace(model, x))
    assert len(list(model.modules())) > LAYERS  # the model was given back whole
    assert sum(1 for n in deep.gm.graph.nodes if n.op == "placeholder" and n.name in deep.params) == \
        sum(1 for _ in model.named_parameters(remove_duplicate=False))


def test_plan_from_the_extension_is_the_plan_from_the_whole_export():
    model = GPT(layers=LAYERS)
    x = (torch.randint(0, 128, (4, 16)),)
    mesh = autopar.Mesh({"tp": 2}, hardware="h100-sxm")
    a = autopar.plan(model, mesh, x)
    b = autopar.plan(model, mesh, x, traced=trace(model, x))
    assert a.graph_hash == b.graph_hash and a.hash() == b.hash()


class Summed(nn.Module):
    """Every block's output feeds the head: not a chain, so it cannot be extended."""

    def __init__(self, layers=LAYERS, d=16):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))

    def forward(self, x):
        outs = []
        for b in self.blocks:
            x = torch.relu(b(x))
            outs.append(x)
        return torch.stack(outs).sum(0)


def test_a_model_that_is_not_a_chain_is_exported_whole():
    model, x = Summed(), (torch.randn(4, 16),)
    said = []
    deep = trace_deep(model, x, progress=said.append)
    assert any("exporting all" in s for s in said), said
    _same(deep, trace(model, x))


class Indexed(nn.Module):
    def __init__(self, i, d=16):
        super().__init__()
        self.layer_idx, self.fc = i, nn.Linear(d, d)
        self.sliding = i % 2 == 1


def test_blocks_must_be_identical_modules():
    stack = nn.Sequential(*[Indexed(i) for i in range(LAYERS)])
    assert uniform_blocks(nn.Sequential(stack)) is None  # `sliding` differs between blocks
    for b in stack:
        b.sliding = False
    found = uniform_blocks(nn.Sequential(stack))  # `layer_idx` only counts the blocks
    assert found is not None and found[0] == "0" and len(found[1]) == LAYERS
    stack[3].fc = nn.Linear(16, 8)
    assert uniform_blocks(nn.Sequential(stack)) is None
    assert uniform_blocks(nn.Sequential(nn.Sequential(*[Indexed(0) for _ in range(3)]))) is None  # too short


def test_full_trace_switch(monkeypatch):
    monkeypatch.setenv("AUTOPAR_FULL_TRACE", "1")
    said = []
    model, x = GPT(layers=LAYERS), (torch.randint(0, 128, (2, 16)),)
    trace_deep(model, x, progress=said.append)
    assert not said
