"""Replay: planning the golden cases again gives the same decisions as the stored plans.

Regenerate with ``python tests/golden/regen.py`` and explain the change in the commit.
"""

from __future__ import annotations

import os
import sys

import pytest

import autopar

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
sys.path.insert(0, GOLDEN)
import regen  # noqa: E402


def decisions(plan: autopar.Plan) -> dict:
    """What the planner chose, without predicted times (which move with the cost model)."""
    return {
        "graph_hash": plan.graph_hash,
        "param_placements": plan.param_placements,
        "nodes": [(n["name"], n["placements"], n["inputs"]) for n in plan.nodes],
        "collectives": sorted((c["phase"], c["op"], c["axis"], c["bytes"], c.get("tensor", "")) for c in plan.collectives),
    }


@pytest.mark.parametrize("name", sorted(regen.cases()))
def test_plan_matches_golden(name):
    stored = autopar.Plan.load(os.path.join(GOLDEN, f"{name}.json"))
    fresh = regen.plan(name)
    a, b = decisions(stored), decisions(fresh)
    for key in a:
        assert a[key] == b[key], f"{name}: {key} changed; if intended, run tests/golden/regen.py and explain why in the commit"


def test_model_flops_count_the_matmuls_forward_and_backward():
    """MFU's numerator: the MLP's three matmuls, 2·B·(d·h + h·h + h·o) FLOPs forward, x3 for a
    training step; the pointwise ops add well under 1%."""
    plan = autopar.Plan.load(os.path.join(GOLDEN, "mlp_dp8_h100.json"))
    b, d, h, o = 1 << 18, 128, 256, 128
    matmuls = 3 * 2 * b * (d * h + h * h + h * o)
    assert matmuls <= plan.model_flops <= 1.01 * matmuls
