"""Plans with sequence and context parallelism (issue 5): what the solver may and must do.

Plans only, no execution (tests/codegen/test_context_parallel.py runs them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import autopar
from autopar.errors import AutoparError
from models import GPT, build

COMPUTE_BOUND = str(Path(__file__).resolve().parent.parent / "data" / "compute_bound.json")


def _plan(model, inputs, axes, hardware="h100-sxm", **options):
    return autopar.plan(model, autopar.Mesh(axes, hardware=hardware), inputs, op_profile=None, **options)


def _long_gpt(seq=512):
    torch.manual_seed(0)
    return GPT(vocab=128, d=64, heads=4, layers=2, max_len=seq), (torch.randint(0, 128, (2, seq)),)


def test_megatron_sp_shards_norms_by_sequence_and_credits_their_memory():
    model, inputs = _long_gpt()
    off = _plan(model, inputs, {"tp": 2}, sequence_parallel=False)
    on = _plan(model, inputs, {"tp": 2}, sequence_parallel=True)
    norms = [n for n in on.nodes if n["op"] == "aten.native_layer_norm.default"]
    assert norms and all(n["placements"][0]["tp"] == "S(1)" for n in norms)
    assert all(n["placements"][0]["tp"] != "S(1)" for n in off.nodes if n["op"] == "aten.native_layer_norm.default")
    # Korthikanti et al.: the norms' and residuals' activations are stored sharded by tp
    assert on.memory["activations"] < 0.9 * off.memory["activations"], (on.memory, off.memory)
    # the all-reduces became reduce-scatter + all-gather pairs
    fwd = {c["op"] for c in on.collectives if c["phase"] == "fwd" and c["axis"] == "tp"}
    assert {"reduce_scatter", "all_gather"} <= fwd, fwd
    assert on.solver["sequence_parallel"] is True


def test_cp_shards_inputs_by_sequence_and_replicates_parameters():
    model, inputs = build("hf_llama")
    plan = _plan(model, inputs, {"cp": 2}, hardware="h100-sxm",
                 context_parallel="ring")
    assert plan.input_placements == [{"cp": "S(1)"}]
    assert all(p["cp"] == "R" for p in plan.param_placements.values())
    attn = [n for n in plan.nodes if n.get("attention")]
    assert len(attn) == 2 and {n["attention"] for n in attn} == {"ring"}
    assert {n["placements"]["cp"] for n in attn} == {"S(2)"}


def test_cp_of_one_plans_like_no_cp():
    """A cp=1 axis (a mesh written for a bigger cluster, scaled down) shards nothing; it used to
    be refused as 'not divisible by 1' (found on the GPU check)."""
    model, inputs = _long_gpt(seq=16)
    with_cp = _plan(model, inputs, {"dp": 2, "cp": 1})
    without = _plan(model, inputs, {"dp": 2})
    assert with_cp.input_placements == [{**without.input_placements[0], "cp": "R"}]
    assert with_cp.step_time_s == pytest.approx(without.step_time_s)


def test_auto_attention_is_explained_with_the_cost_of_each_scheme():
    model, inputs = build("hf_llama")
    plan = _plan(model, inputs, {"cp": 2})
    attn = [n for n in plan.nodes if n.get("attention")]
    assert len(attn) == 2
    for n in attn:
        e = plan.explanations[n["name"]]
        costs = {a["attention"]: a["cost_s"] for a in e["alternatives"]}
        assert {"ring", "ulysses", "replicated"} <= set(costs), costs
        assert e["chosen"] == n["attention"] == min(costs, key=costs.get)


def test_ulysses_beyond_the_kv_heads_replicates_kv_and_beyond_the_query_heads_is_refused():
    model, inputs = build("hf_llama")  # 4 query heads, 2 kv heads (GQA)
    plan = _plan(model, inputs, {"cp": 4}, context_parallel="ulysses")
    for n in (n for n in plan.nodes if n.get("attention")):
        assert n["inputs"][0]["cp"] == "S(1)" and n["inputs"][1]["cp"] == "R", n["inputs"]  # K/V replicated
    with pytest.raises(AutoparError, match=r"must divide the query heads \(4\).*context_parallel='ring'"):
        _plan(model, inputs, {"cp": 8}, context_parallel="ulysses")


@pytest.mark.parametrize("options, axes, match", [
    ({"context_parallel": "ring"}, {"tp": 2}, "needs a 'cp' mesh axis"),
    ({"context_parallel": "zigzag"}, {"cp": 2}, "expected one of"),
    ({"sequence_parallel": True}, {"cp": 2}, "on the 'tp' axis"),
    ({"sequence_parallel": "yes"}, {"tp": 2}, r"expected True \(on\), False \(off\) or None"),
    ({}, {"cp": 3}, r"sequence length 16 .* not divisible by 3"),
])
def test_bad_requests_get_clear_errors(options, axes, match):
    model, inputs = build("gpt")
    with pytest.raises(AutoparError, match=match):
        _plan(model, inputs, axes, **options)


def test_hf_causal_masks_are_traced_as_flags():
    from autopar.passes.trace import trace

    model, inputs = build("hf_llama")
    sdpa = [n for n in trace(model, inputs).gm.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert sdpa and all(n.args[3:6] == (None, 0.0, True) for n in sdpa)  # no mask tensor, is_causal
    # with an attention mask given, transformers still builds (and autopar keeps) the mask
    mask = torch.ones_like(inputs[0])
    sdpa = [n for n in trace(model, inputs, {"attention_mask": mask}).gm.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert sdpa and all(n.args[3] is not None for n in sdpa)


def test_ring_never_meets_kv_replicated_heads():
    """Ring attention expands K/V heads from head 0; with query heads sharded on another axis
    against replicated K/V the mapping would be wrong, so that combination is never offered."""
    model, inputs = build("hf_llama")  # 4 query heads, 2 kv heads: tp=4 cannot shard the kv heads
    plan = _plan(model, inputs, {"cp": 2, "tp": 4}, hardware=COMPUTE_BOUND, context_parallel="ring")
    for n in (n for n in plan.nodes if n.get("attention")):
        q, k = n["inputs"][0], n["inputs"][1]
        assert not (q["tp"] == "S(1)" and k["tp"] == "R"), n["inputs"]
