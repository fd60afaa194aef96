"""z3 explains an infeasible request: the unsat core of solvers/feasibility.py said as a sentence."""

import math
import re
from dataclasses import replace

import pytest

from autopar.solvers.feasibility import Request, explain

GiB = 2**30
STATE_175B = 175e9 * 16  # fp32 weights + gradients + AdamW's two moments


def _mesh(text: str) -> dict:
    return {a: int(n) for a, n in (x.split("=") for x in text.split(","))}


def test_z3_explains_an_infeasible_request():
    r = Request(memory=80 * GiB, mesh={"tp": 8}, hardware="h100-sxm", dense_state=STATE_175B, blocks=96)
    why = explain(r)
    assert why.startswith("no plan fits on tp=8 (h100-sxm, 80.00 GiB per device): parameters, gradients and adamw state")
    assert f"{STATE_175B / 8 / GiB:.2f} GiB per device at tp*pp = 8" in why  # 326 GiB, the state split 8 ways
    pp = int(re.search(r"raise pp to at least (\d+) \((\d+) devices\)", why)[1])
    assert STATE_175B / (8 * pp) <= 80 * GiB < STATE_175B / (8 * (pp - 1))  # the least pp that holds it at tp=8
    assert pp == 5 and "(40 devices)" in why
    k = int(re.search(r"tp\*pp to at least (\d+)", why)[1])
    assert k == math.ceil(STATE_175B / (80 * GiB)) == 33
    assert "plan fewer parameters per device" in why and "ZeRO" not in why
    assert explain(replace(r, mesh={"tp": 8, "pp": pp})) is None  # the suggestion fits
    assert explain(replace(r, dense_state=30e9 * 16)) is None  # 56 GiB per device: fits


def test_a_mesh_of_the_same_devices_is_suggested_when_one_fits():
    why = explain(Request(memory=80 * GiB, mesh={"dp": 8}, dense_state=8e9 * 16, blocks=32))
    assert "119.21 GiB per device at tp*pp = 1" in why
    mesh = _mesh(re.search(r"try (\S+) on the same 8 devices", why)[1])
    assert math.prod(mesh.values()) == 8 and 8e9 * 16 / (mesh.get("tp", 1) * mesh.get("pp", 1)) <= 80 * GiB


def test_forced_ulysses_needs_cp_to_divide_the_heads():
    r = Request(memory=80 * GiB, mesh={"dp": 2, "cp": 3}, dense_state=1e9 * 16, heads=32, context_parallel="ulysses")
    why = explain(r)
    assert "32 attention heads over cp=3" in why and "memory" not in why
    mesh = _mesh(re.search(r"try (\S+) on the same 6 devices", why)[1])
    assert 32 % mesh.get("cp", 1) == 0 and math.prod(mesh.values()) == 6
    assert explain(replace(r, context_parallel="ring")) is None
    assert explain(replace(r, mesh={"dp": 3, "cp": 2})) is None


def test_structural_facts_each_name_their_axis():
    why = explain(Request(memory=80 * GiB, mesh={"pp": 8}, dense_state=1e9, blocks=4))
    assert "pp=8 pipeline stages need as many blocks, and the model has 4" in why
    why = explain(Request(memory=80 * GiB, mesh={"dp": 4}, dense_state=1e9, experts=8, expert_parallel=True))
    assert "divides the 8 experts" in why and "try" in why
    why = explain(Request(memory=80 * GiB, mesh={"cp": 3}, seq=2048))
    assert "cp=3 must divide the sequence length 2048" in why
    why = explain(Request(memory=80 * GiB, mesh={"pp": 2, "dp": 8}, batch=4))
    assert "the batch 4 is under dp=8" in why
    assert explain(Request(memory=80 * GiB, mesh={"dp": 8}, batch=4)) is None  # without pp dp need not divide it


def test_only_the_device_count_fixed():
    why = explain(Request(memory=80 * GiB, devices=8, dense_state=STATE_175B, blocks=96))
    assert why.startswith("no plan fits on 8 devices") and "even split 8 ways" in why
    assert why.endswith(f"use at least {math.ceil(STATE_175B / (80 * GiB))} devices")
    assert explain(Request(memory=80 * GiB, devices=64, dense_state=STATE_175B, blocks=96)) is None


def test_experts_split_over_ep_and_a_proved_floor_blames_activations():
    r = Request(memory=80 * GiB, mesh={"ep": 8}, dense_state=10e9 * 16, expert_state=130e9 * 16, experts=8)
    why = explain(r)
    assert f"{(10e9 * 16 + 130e9 * 16 / 8) / GiB:.2f} GiB per device at tp*pp = 1 and ep=8" in why
    k = int(re.search(r"tp\*pp to at least (\d+)", why)[1])
    assert (10e9 * 16 + 130e9 * 16 / 8) / k <= 80 * GiB < (10e9 * 16 + 130e9 * 16 / 8) / (k - 1)
    # the state fits at tp=8, but the exact check proved 100 GiB per device: activations are to blame
    r = Request(memory=80 * GiB, mesh={"tp": 8}, dense_state=8e9 * 16, least=100 * GiB)
    why = explain(r)
    assert "every layout needs 100.00 GiB per device" in why and "lower the batch" in why
    assert explain(replace(r, least=None)) is None


@pytest.fixture(scope="module")
def gpt3_175b():
    from autopar import models
    from autopar.passes.replicate import trace_deep

    model, inputs = models.build("gpt3-175b", device="meta")
    return model, inputs, trace_deep(model, inputs)


@pytest.mark.parametrize("axes", [{"tp": 8}, {"pp": 2, "tp": 8}])
def test_plan_raises_the_z3_sentence_before_the_solve(gpt3_175b, axes):
    import autopar

    model, inputs, traced = gpt3_175b
    said = []
    with pytest.raises(autopar.InfeasibleError) as info:
        autopar.plan(model, autopar.Mesh(axes, hardware="h100-sxm"), inputs, traced=traced, progress=said.append)
    name = ",".join(f"{a}={n}" for a, n in axes.items())
    assert info.value.explanation.startswith(f"no plan fits on {name} (h100-sxm, 74.51 GiB per device): parameters")
    assert "raise pp to at least" in str(info.value)
    assert not any(m.startswith(("annotated", "solved", "presolve")) for m in said), said  # before any strategy


def test_a_floor_the_exact_check_proves_is_explained_first():
    """gpt2's state fits 1.5 GB on tp=2, its activations do not: z3's sentence, then the contributors."""
    import autopar
    from autopar import models

    model, inputs = models.build("gpt2", device="meta")
    with pytest.raises(autopar.InfeasibleError) as info:
        autopar.plan(model, autopar.Mesh({"tp": 2}, hardware="h100-sxm"), inputs, memory_limit_bytes=1.5e9)
    text = str(info.value)
    assert text.startswith("no plan fits on tp=2 (h100-sxm, 1.40 GiB per device): ")
    assert "with activations and what no axis divides, every layout needs" in text
    assert "memory limit cannot be met" in text and "Largest contributors" in text
    assert info.value.need_bytes > 1.5e9


def test_cli_plan_says_why_no_plan_fits(capsys):
    from autopar import cli

    code = cli.main(["plan", "gpt3-175b", "--mesh", "tp=8", "--hardware", "h100-sxm"])
    _, err = capsys.readouterr()
    assert code == 1 and "autopar: error: no plan fits on tp=8 (h100-sxm" in err and "Traceback" not in err
    assert "raise pp to at least 5 (40 devices)" in err
