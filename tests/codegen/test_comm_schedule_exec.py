"""plan.comm_schedule on real gloo ranks: bucketed asynchronous gradient all-reduces
(codegen/buckets.py) change when gradients are synced, not what they are.

Measured facts these tests rest on (gloo, torch 2.13): on 2 ranks an all-reduce adds two numbers
per element, so a flattened bucket equals per-parameter all-reduces bit for bit. On 4 ranks gloo's
ring adds each element's four contributions in an order set by the buffer's length and the
element's offset, so a bucket and a per-parameter all-reduce differ in the last bits (about 5e-7 on
this model); what holds bit for bit there is the schedule's own claim: asynchronous issue and late
waits give exactly what the same buckets reduced synchronously give. The model is the tests' tiny
GPT (tied embeddings, a frozen layer-norm bias), planned on a preset that makes data parallelism
pay, with hand-made 3-bucket schedules.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch

from dist_utils import run_ranks

SHARDING_PRESET = os.path.join(os.path.dirname(__file__), "..", "data", "compute_bound.json")
FROZEN = "blocks.0.ln1.bias"


def with_schedule(plan, schedule):
    """``plan`` with another ``comm_schedule`` (None: per-parameter synchronous syncs)."""
    return dataclasses.replace(plan, comm_schedule=schedule)


def hand_schedule(names: list[str], buckets: int) -> dict:
    """``names`` (gradient-ready order) cut into ``buckets`` buckets on dp, in the solver's shape."""
    k = -(-len(names) // buckets)
    return {"version": 1, "buckets": [{"axis": "dp", "params": names[i:i + k], "bytes": 0, "start_s": 0.0, "end_s": 0.0}
                                      for i in range(0, len(names), k)],
            "predicted": {}, "solver": {"name": "hand"}, "timeline": {}}


def _steps(rank, world):
    """Three SGD steps (the second accumulates two backwards) of the same compiled program run four
    ways: per-parameter syncs, the schedule in ready order (async), the same buckets synchronous, and
    the schedule in forward order (later buckets ready first, so they wait for the earlier ones)."""
    import autopar
    from autopar.codegen.runtime import ParallelModule
    from models import build

    model, inputs = build("gpt")
    model.blocks[0].ln1.bias.requires_grad_(False)  # a frozen parameter inside a bucket
    copies = [copy.deepcopy(model) for _ in range(4)]
    st = autopar.compile(model, autopar.Mesh({"dp": world}, hardware=SHARDING_PRESET), example_inputs=inputs)._autopar
    ready = list({id(p): n for n, p in reversed(list(copies[0].named_parameters()))}.values())
    pms = {}  # one compiled program, four ways of syncing its gradients
    for name, m, order in zip(("none", "async", "sync", "reversed"), copies, (None, ready, ready, ready[::-1])):
        plan = with_schedule(st["plan"], order and hand_schedule(order, 3))
        pms[name] = ParallelModule(m, plan, st["traced"], st["lowered"], st["mesh"])
    assert "grad_buckets" not in pms["none"]._autopar
    pms["sync"]._autopar["grad_buckets"].synchronous = True
    events = {name: [] for name in ("async", "reversed")}
    for name, log in events.items():  # per backward: (bucket issued, did every bucket have all its gradients then)
        gb = pms[name]._autopar["grad_buckets"]
        gb._issue = lambda gb=gb, log=log, issue=gb._issue: (log[-1].append((gb.next, all(
            len(r) == len(b[1]) for r, b in zip(gb.ready, gb.buckets)))), issue())
    opts = {k: torch.optim.SGD(pm.parameters(), lr=0.1, momentum=0.9) for k, pm in pms.items()}
    report = []
    for step in range(3):
        outs, grads = {}, {}
        for k, pm in pms.items():
            for _ in range(2 if step == 1 else 1):
                events.get(k, []).append([])
                y = pm(*inputs)
                y.float().pow(2).mean().backward()
            outs[k] = y.detach()
            grads[k] = {n: None if p.grad is None else p.grad.to_local().clone() for n, p in pm.named_parameters()}
            if k == "async":  # every gradient a DTensor in its parameter's placement
                placements = {str(p.grad.placements) for p in pm.parameters() if p.grad is not None}
            opts[k].step()
            opts[k].zero_grad()
        report.append((outs, grads))
    params = {k: {n: p.to_local().clone() for n, p in pm.named_parameters()} for k, pm in pms.items()}
    return report, params, events, placements


@pytest.mark.parametrize("world", [2, 4])
def test_schedule_changes_timing_not_numerics(world):
    report, params, events, placements = run_ranks(_steps, world)[0]
    for step, (outs, grads) in enumerate(report):
        for k in ("async", "sync", "reversed"):
            if world == 2 or step == 0:  # on 4 ranks, parameters differ in their last bits after a step
                assert torch.equal(outs[k], outs["none"]), (step, k)
            torch.testing.assert_close(outs[k], outs["none"], rtol=1e-5, atol=1e-5)
            assert grads[k][FROZEN] is None
            assert all(g is not None for n, g in grads[k].items() if n != FROZEN), (step, k)
            for n, g in grads[k].items():
                if g is None:
                    continue
                if world == 2:  # one addition per element: any bucketing gives the same bits
                    assert torch.equal(g, grads["none"][n]), (step, k, n)
                else:  # gloo's ring orders a 4-way sum by offset in the buffer: last bits differ
                    torch.testing.assert_close(g, grads["none"][n], rtol=1e-5, atol=1e-6)
        assert torch.equal(outs["async"], outs["sync"])  # what the schedule changes is timing only
        for n, g in grads["async"].items():
            assert g is None and grads["sync"][n] is None or torch.equal(g, grads["sync"][n]), (step, n)
    for n, p in params["async"].items():
        assert torch.equal(p, params["sync"][n])
        assert world != 2 or torch.equal(p, params["none"][n])
    assert placements == {"(Replicate(),)"}
    for name, log in events.items():  # 4 backwards, each issuing buckets 0, 1, 2 in that order
        assert [[b for b, _ in issued] for issued in log] == [[0, 1, 2]] * 4, (name, log)
    # ready order: bucket 0 goes out while later gradients are still being computed; forward order:
    # buckets 1 and 2 are ready first but wait until bucket 0 (the tied embedding's, ready last) is issued
    assert not any(issued[0][1] for issued in events["async"]), events["async"]
    assert all(done for issued in events["reversed"] for _, done in issued), events["reversed"]
