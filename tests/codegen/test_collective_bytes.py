"""A plan's predicted collectives are the collectives the run sends: same ops, same bytes.

Forward redistributions are priced step by step in DTensor's own order, so they must match
exactly. Backward collectives are predicted per forward edge (the transposed redistribution and
the gradient reductions, see passes/annotate.py); where view chains sit between a reduction and
its consumer, autograd may reduce at a different point, so the backward total is held to 5%.
"""

from __future__ import annotations

import os

from dist_utils import run_ranks

SHARDING_PRESET = os.path.join(os.path.dirname(__file__), "..", "data", "compute_bound.json")


def _measure(rank, world, name, axes, hardware):
    import torch

    import autopar
    from autopar.codegen.comm_counter import CollectiveCounter
    from models import build, logits

    model, inputs = build(name)
    pm = autopar.compile(model, autopar.Mesh(axes, hardware=hardware), example_inputs=inputs)
    opt = torch.optim.SGD(pm.parameters(), lr=1e-3)
    with CollectiveCounter() as fwd:
        y = logits(pm(*inputs))
    with CollectiveCounter() as bwd:
        y.float().pow(2).mean().backward()
        opt.step()
    predicted = {"fwd": {}, "bwd": {}}
    for c in pm.plan.collectives:
        side = predicted["fwd" if c["phase"] == "fwd" else "bwd"]
        side[c["op"]] = side.get(c["op"], 0) + int(c["bytes"])
    return predicted, {"fwd": fwd.bytes, "bwd": bwd.bytes}


def _run(name, axes):
    world = 1
    for n in axes.values():
        world *= n
    return run_ranks(_measure, world, name, axes, SHARDING_PRESET)[0]


def test_data_parallel_mlp_bytes_match_exactly():
    predicted, measured = _run("mlp", {"dp": 2})
    assert predicted["fwd"] or predicted["bwd"], "the plan communicates nothing; this test would prove nothing"
    assert measured == predicted


def test_tensor_and_data_parallel_gpt_bytes_match():
    predicted, measured = _run("gpt", {"dp": 2, "tp": 2})
    assert predicted["fwd"] and predicted["bwd"]
    assert measured["fwd"] == predicted["fwd"]
    total_p, total_m = sum(predicted["bwd"].values()), sum(measured["bwd"].values())
    assert abs(total_p - total_m) <= 0.05 * total_m, (predicted["bwd"], measured["bwd"])
