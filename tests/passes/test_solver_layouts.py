"""The solver finds the known-good layouts, planned offline on the meta device."""

from __future__ import annotations

import torch

import autopar
from autopar.codegen.lower import count_collectives, lower
from autopar.passes.annotate import CostContext
from autopar.passes.trace import trace
from models import Block, MLP


def _plan_and_lower(model, inputs, axes, hardware="h100-sxm", mode="train"):
    mesh = autopar.Mesh(axes, hardware=hardware)
    plan = autopar.plan(model, mesh, inputs, mode=mode)
    tg = trace(model, inputs)
    gm = lower(tg, plan, CostContext(mesh.axes, mesh.hardware_spec).collectives)
    return plan, gm


def test_gpt_block_on_tp8_is_megatron():
    with torch.device("meta"):
        blk = Block(4096, 32)
        x = torch.randn(1, 1024, 4096)
    plan, gm = _plan_and_lower(blk, (x,), {"tp": 8})
    pp = plan.param_placements
    # column-parallel QKV and fc1 (output features sharded), row-parallel proj and fc2
    assert pp["qkv.weight"] == {"tp": "S(0)"}
    assert pp["fc1.weight"] == {"tp": "S(0)"} and pp["fc1.bias"] == {"tp": "S(0)"}
    assert pp["proj.weight"] == {"tp": "S(1)"}
    assert pp["fc2.weight"] == {"tp": "S(1)"}
    assert pp["proj.bias"] == {"tp": "R"} and pp["fc2.bias"] == {"tp": "R"}
    # exactly one all-reduce (or one reduce-scatter + all-gather pair) per attention and per MLP
    counts = count_collectives(gm)
    ar = counts.get(("all_reduce", "tp"), 0)
    rs = counts.get(("reduce_scatter", "tp"), 0)
    ag = counts.get(("all_gather", "tp"), 0)
    assert ar + rs == 2, counts
    assert ag == rs, counts
    assert set(counts) <= {("all_reduce", "tp"), ("reduce_scatter", "tp"), ("all_gather", "tp")}, counts


def test_large_batch_small_hidden_on_dp8_is_data_parallel():
    with torch.device("meta"):
        mlp = MLP(d=128, hidden=256, out=128)
        x = torch.randn(4096, 128)
    plan, gm = _plan_and_lower(mlp, (x,), {"dp": 8})
    assert all(p == {"dp": "R"} for p in plan.param_placements.values()), plan.param_placements
    assert plan.input_placements == [{"dp": "S(0)"}]
    assert count_collectives(gm) == {}  # the forward pass communicates nothing
    syncs = [c for c in plan.collectives if c["phase"] == "grad_sync"]
    assert {c["op"] for c in syncs} == {"all_reduce"}
    assert len(syncs) == len(plan.param_placements)  # one gradient all-reduce per parameter
    assert all(c["phase"] == "grad_sync" for c in plan.collectives)


def test_large_batch_small_hidden_on_tp8_also_shards_the_batch():
    # the axis name does not force a layout: with a huge batch and a tiny model, data parallelism
    # across the "tp" axis is cheaper than Megatron's activation all-reduces
    with torch.device("meta"):
        mlp = MLP(d=64, hidden=64, out=64)
        x = torch.randn(65536, 64)
    plan, _ = _plan_and_lower(mlp, (x,), {"tp": 8})
    assert plan.input_placements == [{"tp": "S(0)"}]
