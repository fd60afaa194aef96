"""Measured all-to-all traffic of expert parallelism against the plan's prediction.

Profiles the routing of a calibration batch (``autopar.profile_routing``, split over the ranks),
plans HF Mixtral (8 experts, top-2) on ``{"ep": 4}`` with that routing (the placement ILP picks
each rank's experts), runs one forward on 4 gloo ranks with that batch, and prints, per layer and
rank, the rows each dispatch sent to other ranks: measured, and predicted from the statistics.
The combine sends the same rows back, and backward repeats both.

    python benchmarks/moe_alltoall.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

EP = 4
PINS = {"moe_*": {"ep": "S(0)"}, "*experts*": {"ep": "S(0)"}}


def _rank(rank, world, plan_json):
    import autopar
    from autopar.codegen import moe
    from models import build, logits

    model, inputs = build("hf_mixtral")
    plan = autopar.Plan.from_json(plan_json)
    pm = autopar.compile(model, autopar.Mesh({"ep": EP}), example_inputs=inputs, plan=plan)
    moe.TRAFFIC = []
    logits(pm(*inputs))
    return moe.TRAFFIC


def main():
    import autopar
    from autopar.routing import predicted_send_rows
    from dist_utils import run_ranks
    from models import build

    model, inputs = build("hf_mixtral")
    stats = autopar.profile_routing(model, inputs, shards=EP)
    plan = autopar.plan(model, autopar.Mesh({"ep": EP}, hardware="h100-sxm"), inputs, pins=PINS, routing=stats)
    print(f"placement: {plan.solver['expert_placement']}")
    measured = run_ranks(_rank, EP, plan.to_json())
    entries = [n["moe"] for n in plan.nodes if n.get("moe")]
    print(f"{'layer':<8}{'rank':>5}{'predicted rows':>16}{'measured rows':>15}{'bytes':>10}")
    worst = 0.0
    for layer, entry in enumerate(entries):
        want = predicted_send_rows(stats, entry, layer, EP)
        for r in range(EP):
            name, rows, row_bytes = measured[r][layer]
            assert name == entry["layer"]
            worst = max(worst, abs(rows - want[r]) / max(want[r], 1))
            print(f"{name:<8}{r:>5}{want[r]:>16}{rows:>15}{rows * row_bytes:>10}")
    print(f"largest relative difference: {worst:.3f}")


if __name__ == "__main__":
    main()
