"""Pipeline stages from a real traced model: layers found in the graph, stages balanced by cost."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autopar
from autopar.passes.pipeline import layer_index, plan_pipeline, stage_arrays
from autopar.passes.trace import trace


class Blk(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


class Uneven(nn.Module):
    """A GPT-like stack whose first half has a 16x wider MLP than its second half."""

    def __init__(self, d=256, widths=(4096,) * 4 + (256,) * 4):
        super().__init__()
        self.emb = nn.Embedding(512, d)
        self.layers = nn.ModuleList(Blk(d, h) for h in widths)
        self.head = nn.Linear(d, 512)

    def forward(self, ids):
        x = self.emb(ids)
        for blk in self.layers:
            x = blk(x)
        return self.head(x)


def _model():
    with torch.device("meta"):
        model = Uneven()
    return model, (torch.zeros(16, 128, dtype=torch.long, device="meta"),)


def test_layers_are_found_in_the_graph():
    model, inputs = _model()
    tg = trace(model, inputs)
    container, layer = layer_index(tg)
    assert container == "layers" and max(layer.values()) == 7
    assert layer["p_emb_weight"] == 0 and layer["p_head_weight"] == 7 and layer["p_layers_5_fc1_weight"] == 5


def test_stages_are_balanced_by_cost_not_by_layer_count():
    model, inputs = _model()
    mesh = autopar.Mesh({"tp": 2}, hardware="h100-sxm")
    inner, stages, names = plan_pipeline(model, mesh, inputs, pp=2, microbatches=(4,), schedules=("1f1b",))
    assert names == [f"layers.{k}" for k in range(8)]
    assert stages.microbatches == 4 and stages.schedule == "1f1b"
    tg = trace(model, inputs)
    _, t, c, _, _, tf, tw = stage_arrays(tg, inner, mesh.hardware_spec.inter_node, 4)
    assert t[1] > 4 * t[6]  # the wide layers really cost more
    assert all(0 < f < x and 0 < w < x - f for x, f, w in zip(t, tf, tw))  # forward, W and B all take time
    equal_count = max(sum(t[:4]) + c[3], sum(t[4:]))
    assert stages.bounds != ((0, 4), (4, 8)) and max(stages.stage_times) < equal_count
    assert stages.bubble <= stages.analytic_bubble + 1e-12


def test_batch_must_divide_into_a_microbatch_count():
    model, inputs = _model()
    with pytest.raises(autopar.AutoparError, match="divides into none"):
        plan_pipeline(model, autopar.Mesh({"tp": 2}, hardware="h100-sxm"), inputs, pp=2, microbatches=(3, 5))


def test_a_pp_mesh_plans_stages_offline(tmp_path, capsys):
    from autopar import cli

    model, inputs = _model()
    mesh = autopar.Mesh({"tp": 2, "pp": 2}, hardware="h100-sxm")
    assert mesh.names == ("pp", "tp")
    plan = autopar.plan(model, mesh, inputs)
    pipe = plan.pipeline
    assert plan.mesh == {"pp": 2, "tp": 2} and pipe["layers"][0] == "layers.0"
    assert plan.step_time_s == pipe["step_time_s"] and plan.peak_memory_bytes == int(max(pipe["rank_memory_bytes"]))
    assert len(pipe["stage_forward_s"]) == len(pipe["bounds"]) == 2 * pipe["virtual_stages"]
    path = tmp_path / "pp.json"
    plan.save(path)
    assert autopar.Plan.load(path).pipeline == pipe  # round trip
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Pipeline" in out and "layers.0" in out and "analytic" in out


def test_pp_errors_say_what_to_do():
    from models import MLP

    mlp = MLP()
    with pytest.raises(autopar.AutoparError, match="need repeated blocks"):
        autopar.plan(mlp, autopar.Mesh({"pp": 2}, hardware="h100-sxm"), (torch.randn(8, 32),))
    model, inputs = _model()
    with pytest.raises(autopar.AutoparError, match="need at least 16 layers"):
        autopar.plan(model, autopar.Mesh({"pp": 16}, hardware="h100-sxm"), inputs)
    mesh = autopar.Mesh({"pp": 2}, hardware="h100-sxm")
    for bad, why in [("1f1b", "takes a dict"), ({"schedule": "foo"}, "'foo' is unknown"),
                     ({"virtual_stages": 0}, "virtual_stages must be a positive int"),
                     ({"schedule": "interleaved-1f1b", "virtual_stages": 1}, "virtual_stages >= 2"),
                     ({"bounds": [[0, 8]], "schedule": "1f1b", "microbatches": 2}, "pp=2 or a multiple"),
                     ({"bounds": [[0, 1], [2, 8]], "schedule": "1f1b", "microbatches": 2}, "contiguous")]:
        with pytest.raises(autopar.AutoparError, match=why):
            autopar.plan(model, mesh, inputs, pipeline=bad)


def test_microbatches_divide_the_batch_on_one_device_and_stages_can_be_fixed():
    from types import SimpleNamespace

    from autopar.passes.pipeline import local_batch

    model, inputs = _model()  # batch 16 on dp=4: 4 rows per data-parallel rank
    sharded = SimpleNamespace(mesh={"dp": 4, "tp": 2}, input_placements=[{"dp": "S(0)", "tp": "R"}])
    assert local_batch(sharded, inputs) == 4
    assert local_batch(SimpleNamespace(mesh={"dp": 4}, input_placements=[{"dp": "R"}]), inputs) == 4  # still split over dp
    assert local_batch(SimpleNamespace(mesh={"pp": 2, "tp": 2}, input_placements=[{"tp": "R"}]), inputs) == 16
    mesh = autopar.Mesh({"pp": 2, "dp": 4}, hardware="h100-sxm")
    plan = autopar.plan(model, mesh, inputs, pipeline={"schedule": "1f1b"})
    assert plan.pipeline["microbatches"] in (1, 2, 4) and plan.pipeline["schedule"] == "1f1b"
    fixed = autopar.plan(model, mesh, inputs, pipeline={"schedule": "interleaved-1f1b", "virtual_stages": 2,
                                                        "microbatches": 2, "bounds": "equal"})
    pipe = fixed.pipeline
    assert pipe["bounds"] == [[0, 2], [2, 4], [4, 6], [6, 8]] and pipe["virtual_stages"] == 2
    assert pipe["microbatches"] == 2 and len(pipe["rank_memory_bytes"]) == 2
    assert pipe["analytic_bubble"] == pytest.approx(1 / 4)
    assert autopar.Plan.from_json(fixed.to_json()).pipeline == pipe  # p·v bounds pass the plan schema
    with pytest.raises(autopar.AutoparError, match="also needs 'schedule' and 'microbatches'"):
        autopar.plan(model, mesh, inputs, pipeline={"bounds": "equal"})
    with pytest.raises(autopar.AutoparError, match="no 'pp' axis"):
        autopar.plan(model, autopar.Mesh({"dp": 2}, hardware="h100-sxm"), inputs, pipeline={"schedule": "1f1b"})


def test_the_stage_solver_owns_memory_and_says_what_to_change():
    model, inputs = _model()
    mesh = autopar.Mesh({"pp": 2, "tp": 2}, hardware="h100-sxm")
    whole = autopar.plan(model, autopar.Mesh({"tp": 2}, hardware="h100-sxm"), inputs)
    # a limit under the whole model's need on one device, but above half of it: pipelining fits
    limit = whole.peak_memory_bytes * 0.75
    plan = autopar.plan(model, mesh, inputs, memory_limit_bytes=limit)
    assert max(plan.pipeline["rank_memory_bytes"]) <= limit
    with pytest.raises(autopar.InfeasibleError, match="raise pp"):
        autopar.plan(model, mesh, inputs, memory_limit_bytes=whole.peak_memory_bytes * 0.05)
