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
    _, t, c, _, _ = stage_arrays(tg, inner, mesh.hardware_spec.inter_node, 4)
    assert t[1] > 4 * t[6]  # the wide layers really cost more
    equal_count = max(sum(t[:4]) + c[3], sum(t[4:]))
    assert stages.bounds != ((0, 4), (4, 8)) and max(stages.stage_times) < equal_count
    assert stages.bubble <= stages.analytic_bubble + 1e-12


def test_batch_must_divide_into_a_microbatch_count():
    model, inputs = _model()
    with pytest.raises(autopar.AutoparError, match="divides into none"):
        plan_pipeline(model, autopar.Mesh({"tp": 2}, hardware="h100-sxm"), inputs, pp=2, microbatches=(3, 5))


def test_a_pp_mesh_plans_stages_offline_and_compile_refuses_it(tmp_path, capsys):
    from autopar import cli

    model, inputs = _model()
    mesh = autopar.Mesh({"tp": 2, "pp": 2}, hardware="h100-sxm")
    assert mesh.names == ("pp", "tp")
    plan = autopar.plan(model, mesh, inputs)
    pipe = plan.pipeline
    assert plan.mesh == {"pp": 2, "tp": 2} and len(pipe["bounds"]) == 2 and pipe["layers"][0] == "layers.0"
    assert plan.step_time_s == pipe["step_time_s"] and plan.peak_memory_bytes == int(max(pipe["stage_memory_bytes"]))
    assert any("not executed yet" in w for w in plan.warnings)
    path = tmp_path / "pp.json"
    plan.save(path)
    assert autopar.Plan.load(path).pipeline == pipe  # round trip
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Pipeline" in out and "layers.0" in out and "analytic" in out
    with pytest.raises(autopar.MeshError, match="pipeline execution is not built yet"):
        mesh.device_mesh()


def test_pp_errors_say_what_to_do():
    from models import MLP

    mlp = MLP()
    with pytest.raises(autopar.AutoparError, match="need repeated blocks"):
        autopar.plan(mlp, autopar.Mesh({"pp": 2}, hardware="h100-sxm"), (torch.randn(8, 32),))
    model, inputs = _model()
    with pytest.raises(autopar.AutoparError, match="need at least 16 layers"):
        autopar.plan(model, autopar.Mesh({"pp": 16}, hardware="h100-sxm"), inputs)
