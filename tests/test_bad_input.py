"""Bad input gets a clear, typed error that says what was wrong and what to do."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import autopar
from autopar.errors import MeshError, PlanError, TraceError
from dist_utils import run_ranks
from models import MLP


def _mesh_size_mismatch(rank, world):
    import autopar

    model = MLP()
    try:
        autopar.compile(model, autopar.Mesh({"dp": 2, "tp": 2}), example_inputs=(torch.randn(8, 32),))
    except ValueError as exc:
        return (type(exc).__name__, str(exc))
    return None


def test_mesh_size_must_equal_world_size():
    results = run_ranks(_mesh_size_mismatch, 2)
    name, msg = results[0]
    assert name == "MeshError"
    assert "4" in msg and "2" in msg and "world size" in msg


def test_unknown_hardware_lists_presets():
    with pytest.raises(MeshError) as e:
        autopar.Mesh({"tp": 2}, hardware="h900")
    assert "h900" in str(e.value) and "h100-sxm" in str(e.value) and "local" in str(e.value)


def test_bad_axes_are_named():
    with pytest.raises(MeshError, match="xp"):
        autopar.Mesh({"xp": 2})
    with pytest.raises(MeshError, match="positive"):
        autopar.Mesh({"tp": 0})


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.fc(x)
        return -self.fc(x)


def test_untraceable_model_names_construct_and_suggests_fix():
    with pytest.raises(TraceError) as e:
        autopar.plan(Branchy(), autopar.Mesh({"tp": 2}), (torch.randn(2, 4),))
    msg = str(e.value)
    assert "Branchy" in msg
    assert "hint:" in msg and "torch.where" in msg


def test_plan_for_another_model_is_refused():
    plan = autopar.plan(MLP(), autopar.Mesh({"tp": 2}), (torch.randn(8, 32),))
    other = trace_hash(MLP(d=16), (torch.randn(8, 16),))
    from autopar.plan import check_graph_hash

    with pytest.raises(PlanError) as e:
        check_graph_hash(plan, other)
    assert "graph hash" in str(e.value) and e.value.path == "$.graph_hash"


def trace_hash(model, inputs):
    from autopar.passes.trace import trace

    return trace(model, inputs).graph_hash


def test_malformed_and_wrong_version_plan_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="JSON"):
        autopar.Plan.load(bad)
    plan = autopar.plan(MLP(), autopar.Mesh({"tp": 2}), (torch.randn(8, 32),))
    doc = json.loads(plan.to_json())
    doc["schema_version"] = 99
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    with pytest.raises(PlanError) as e:
        autopar.Plan.load(old)
    assert "99" in str(e.value) and e.value.path == "$.schema_version"


@torch.library.custom_op("autopar_test::odd", mutates_args=())
def _odd(x: torch.Tensor) -> torch.Tensor:  # a user's custom op: no sharding rule anywhere
    return x * 2


@_odd.register_fake
def _(x):
    return torch.empty_like(x)


def test_op_without_rule_falls_back_to_replicate_with_warning():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return _odd(self.fc(x))

    plan = autopar.plan(Odd(), autopar.Mesh({"tp": 2}), (torch.randn(4, 8),))
    assert any("autopar_test.odd" in w and "replicated" in w for w in plan.warnings), plan.warnings
    node = next(n for n in plan.nodes if "autopar_test.odd" in n["op"])
    assert node["placements"] == {"tp": "R"}


def test_non_divisible_dims_are_never_sharded():
    model = nn.Linear(6, 6)  # 6 is not divisible by 4
    plan = autopar.plan(model, autopar.Mesh({"tp": 4}), (torch.randn(3, 6),))
    for n in plan.nodes:
        if "shape" not in n or not n["placements"]:
            continue
        pls = n["placements"] if isinstance(n["placements"], list) else [n["placements"]]
        for p in pls:
            if p and p["tp"].startswith("S("):
                d = int(p["tp"][2:-1])
                assert n["shape"][d] % 4 == 0, n


def test_meta_model_with_real_example_inputs_plans_with_its_backward(capfd):
    """A model on ``meta`` planned with ordinary CPU inputs (what a user writes): the inputs count
    only by shape, so the joint forward+backward graph is traced, with no device-mismatch warning
    and no anomaly-mode traceback on stderr."""
    with torch.device("meta"):
        model = MLP(d=64, hidden=128, out=64)
    plan = autopar.plan(model, autopar.Mesh({"dp": 2}, hardware="h100-sxm"), (torch.randn(32, 64),))
    assert not any("joint" in w for w in plan.warnings), plan.warnings
    assert "Traceback" not in capfd.readouterr().err

