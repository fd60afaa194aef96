"""The same model, mesh, hardware and options give a byte-identical plan in every process (wall-clock
times are Plan.timings, never saved), and compile names the ranks whose plans differ."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import autopar
from dist_utils import run_ranks
from models import MLP

# plans two small cases, each saved to argv[1]/<case>.json: a Llama on dp x tp, and an MoE with expert
# placement from routing statistics (solvers/expert_placement.py, bounded by wall clock); about 12 s of
# CPU each. (A pp=2 x dp=2 plan of tiny-gpt2 was checked the same way; it adds 2 s.)
SCRIPT = """
import sys
import autopar
from autopar.models import build
from autopar.solvers.expert_placement import synthetic_routing
from models import hf_mixtral

out = sys.argv[1]
model, inputs = build("tiny-llama")
autopar.plan(model, autopar.Mesh({"dp": 2, "tp": 2}, hardware="h100-sxm"), inputs).save(f"{out}/llama.json")
import torch
torch.manual_seed(0)
model, ids = hf_mixtral(), torch.randint(0, 128, (4, 16))
plan = autopar.plan(model, autopar.Mesh({"ep": 2}, hardware="h100-sxm"), (ids,), time_limit_s=5,
                    routing=synthetic_routing(layers=2, experts=8, tokens=64), expert_parallel=True)
assert plan.timings.get("expert_placement_s") is not None
plan.save(f"{out}/moe.json")
"""


def test_plans_are_byte_identical_across_processes(tmp_path):
    tests = str(Path(__file__).resolve().parent)
    runs = []
    for seed in ("1", "2"):  # dict and set order over names must not leak into a plan
        out = tmp_path / seed
        out.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed,
               "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
        with open(out / "stderr.txt", "w") as err:  # both run at once; a file never fills up like a pipe
            runs.append((out, subprocess.Popen([sys.executable, "-c", SCRIPT, str(out)], env=env, stderr=err)))
    for out, proc in runs:
        assert proc.wait(timeout=300) == 0, (out / "stderr.txt").read_text()[-3000:]
    (a, _), (b, _) = runs
    for case in ("llama", "moe"):
        first, second = (a / f"{case}.json").read_bytes(), (b / f"{case}.json").read_bytes()
        assert first == second, f"{case}: the two processes saved different plans"
        plan = autopar.Plan.load(a / f"{case}.json")
        assert not any(k.endswith("time_s") for k in plan.solver), plan.solver  # wall clock is Plan.timings
        assert plan.timings == {}
        if plan.solver["name"] == "cp-sat":  # its wall-clock safety net, which would make the plan depend on load
            assert plan.solver["wall_limit_hit"] is False


def test_solver_times_are_timings_not_plan():
    plan = autopar.plan(MLP(), autopar.Mesh({"tp": 2}), (torch.randn(8, 32),), time_limit_s=2)
    assert plan.timings["solve_time_s"] > 0 and "solve_time_s" not in plan.solver
    again = autopar.Plan.from_json(plan.to_json())
    assert again == plan and again.hash() == plan.hash() and again.timings == {}
    old = autopar.Plan.from_json(plan.to_json().replace('"solver": {', '"solver": {\n  "solve_time_s": 1.5,', 1))
    assert old.hash() == plan.hash()  # plans saved with solver times still hash as their decisions


def _different_plan_on_rank_2(rank, world, plan_json):
    plan = autopar.Plan.from_json(plan_json)
    if rank == 2:
        plan.warnings.append("rank 2 planned with other options")
    torch.manual_seed(0)
    try:
        autopar.compile(MLP(), autopar.Mesh({"tp": world}), example_inputs=(torch.randn(6, 32),), plan=plan)
    except autopar.PlanError as exc:
        return str(exc)
    return "accepted"


@pytest.fixture(scope="module")
def tp3_plan():
    torch.manual_seed(0)
    return autopar.plan(MLP(), autopar.Mesh({"tp": 3}), (torch.randn(6, 32),), time_limit_s=2)


def test_compile_names_the_ranks_whose_plans_differ(tp3_plan):
    messages = run_ranks(_different_plan_on_rank_2, 3, tp3_plan.to_json())
    other = tp3_plan.hash()[:12]
    for msg in messages:  # every rank refuses, with the same message
        assert msg.startswith(f"ranks reached different plans: ranks 0, 1 have plan hash {other}; rank 2 has "), msg
        assert "Plan once and pass plan=autopar.Plan.load(...) on every rank" in msg
