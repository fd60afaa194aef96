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
        blk = Block(4096, 32, fused_qkv=False)
        x = torch.randn(1, 1024, 4096)
    plan, gm = _plan_and_lower(blk, (x,), {"tp": 8})
    pp = plan.param_placements
    # column-parallel QKV and fc1 (output features sharded), row-parallel proj and fc2
    assert pp["q.weight"] == pp["k.weight"] == pp["v.weight"] == {"tp": "S(0)"}
    assert pp["fc1.weight"] == {"tp": "S(0)"} and pp["fc1.bias"] == {"tp": "S(0)"}
    assert pp["proj.weight"] == {"tp": "S(1)"}
    assert pp["fc2.weight"] == {"tp": "S(1)"}
    # (the row-parallel biases are added after the reduction, to replicated or sharded sums)
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
        x = torch.randn(1 << 18, 128)
    plan, gm = _plan_and_lower(mlp, (x,), {"dp": 8})
    assert all(p == {"dp": "R"} for p in plan.param_placements.values()), plan.param_placements
    # every matmul runs on its rank's slice of the batch (the input itself may arrive whole:
    # slicing a replicated tensor is free)
    mms = [n for n in plan.nodes if n["op"] == "aten.mm.default"]
    assert len(mms) == 3 and all(n["inputs"][0] == {"dp": "S(0)"} for n in mms), mms
    assert count_collectives(gm) == {("all_gather", "dp"): 1}  # only the output is gathered  # the forward pass communicates nothing
    syncs = [c for c in plan.collectives if c["phase"] == "grad_sync"]
    assert {c["op"] for c in syncs} == {"all_reduce"}
    assert len(syncs) == len(plan.param_placements)  # one gradient all-reduce per parameter
    assert all(c["phase"] == "grad_sync" or c["tensor"] == "add_2" for c in plan.collectives), plan.collectives


def test_tp_stays_inside_a_node_whatever_order_the_axes_are_given_in():
    """GPT-3 1.3B-shaped block on 16 H100s in 2 nodes as dp=2 x tp=8: tp runs on NVLink."""
    from autopar.cost_models.comm import axis_links

    with torch.device("meta"):
        blk = Block(2048, 16, fused_qkv=False)
        x = torch.randn(8, 2048, 2048)
    for axes in ({"dp": 2, "tp": 8}, {"tp": 8, "dp": 2}):
        mesh = autopar.Mesh(axes, hardware="h100-sxm")
        assert mesh.names == ("dp", "tp")
        links = axis_links(mesh.axes, mesh.hardware_spec)
        assert links["tp"] == mesh.hardware_spec.intra_node and links["dp"] == mesh.hardware_spec.inter_node
        plan = autopar.plan(blk, mesh, (x,))
        tp_colls = [c for c in plan.collectives if c["axis"] == "tp"]
        assert tp_colls, "the plan should use tensor parallelism inside the node"
        assert any("laid out outer to inner as dp, tp" in w for w in plan.warnings) == (list(axes) == ["tp", "dp"])


def test_a_view_rule_rejecting_one_placement_keeps_the_others():
    """examples/gpt.py's head split is rejected by DTensor's view rule for one input placement
    only; the batch-sharded one stays, so data parallelism shards every activation."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    import gpt

    with torch.device("meta"):
        model, ids = gpt.GPT(vocab=512, d=256, heads=4), torch.zeros(1024, 128, dtype=torch.long)
    plan = autopar.plan(model, autopar.Mesh({"dp": 8}, hardware="h100-sxm"), (ids,))
    assert not [w for w in plan.warnings if "sharding rule failed" in w], plan.warnings
    views = [n for n in plan.nodes if n["op"] == "aten.view.default" and len(n["shape"]) == 4]
    assert views and all(n["placements"] == {"dp": "S(0)"} for n in views)
