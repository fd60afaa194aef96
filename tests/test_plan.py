import json

import pytest

from autopar.errors import PlanError
from autopar.plan import SCHEMA_VERSION, Plan, check_graph_hash


def make_plan(**overrides) -> Plan:
    fields = dict(
        mesh={"dp": 2, "tp": 4},
        hardware="h100-sxm",
        mode="train",
        graph_hash="abc123",
        model="MLP",
        step_time_s=0.1 + 0.2,  # 0.30000000000000004 must survive exactly
        peak_memory_bytes=3 * 2**30,
        memory={"params": 2**30, "grads": 2**30, "optimizer": 2**29, "activations": 2**29},
        time_breakdown={"compute_s": 0.2, "comm_fwd_s": 1e-5, "comm_bwd_s": 1 / 3, "grad_sync_s": 2.5e-7},
        param_placements={
            "fc1.weight": {"dp": "R", "tp": "S(0)"},
            "fc1.bias": {"dp": "R", "tp": "S(0)"},
            "fc2.weight": {"dp": "R", "tp": "S(1)"},
        },
        input_placements=[{"dp": "S(0)", "tp": "R"}],
        nodes=[
            {"name": "p_fc1_weight", "op": "placeholder", "shape": [64, 32], "dtype": "float32",
             "placements": {"dp": "R", "tp": "S(0)"}, "compute_s": 0.0},
            {"name": "mm", "op": "aten.mm.default", "shape": [8, 64], "dtype": "float32",
             "placements": {"dp": "S(0)", "tp": "S(1)"}, "compute_s": 1.25e-6},
            {"name": "split", "op": "aten.split.Tensor", "shape": [[8, 32], [8, 32]], "dtype": ["float32", "float32"],
             "placements": [{"dp": "S(0)", "tp": "R"}, {"dp": "S(0)", "tp": "R"}], "compute_s": 0.0},
            {"name": "mm_1", "op": "aten.mm.default", "shape": [8, 32], "dtype": "float32",
             "placements": {"dp": "S(0)", "tp": "P(sum)"}, "compute_s": 1e-6},
        ],
        collectives=[
            {"op": "all_reduce", "axis": "tp", "bytes": 1024, "time_s": 3e-6, "phase": "fwd", "tensor": "mm_1",
             "node": "output", "src": {"tp": "P(sum)"}, "dst": {"tp": "R"}},
            {"op": "all_reduce", "axis": "dp", "bytes": 8192, "time_s": 1.5e-5, "phase": "grad_sync",
             "tensor": "p_fc1_weight"},
        ],
        solver={"name": "cp-sat", "status": "OPTIMAL", "objective_s": 0.30000000000000004, "solve_time_s": 0.05},
        warnings=["fc2.bias is unused"],
        explanations={
            "fc1.weight": {
                "chosen": "dp=R tp=S(0)",
                "alternatives": [{"placements": {"dp": "R", "tp": "R"}, "cost_s": 0.4}],
                "reason": "column-parallel avoids a forward all-gather",
            }
        },
    )
    fields.update(overrides)
    return Plan(**fields)


def refusal(data_or_text) -> PlanError:
    text = data_or_text if isinstance(data_or_text, str) else json.dumps(data_or_text)
    with pytest.raises(PlanError) as info:
        Plan.from_json(text)
    return info.value


def test_round_trip_is_exact(tmp_path):
    plan = make_plan()
    text = plan.to_json()
    assert Plan.from_json(text) == plan
    assert Plan.from_json(text).to_json() == text
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded == plan
    assert loaded.to_json() == text
    assert loaded.step_time_s == 0.1 + 0.2
    assert loaded.time_breakdown["comm_bwd_s"] == 1 / 3
    assert loaded.schema_version == SCHEMA_VERSION


def test_json_is_canonical():
    text = make_plan().to_json()
    data = json.loads(text)
    assert text == json.dumps(data, sort_keys=True, indent=1, ensure_ascii=False)
    assert data["schema_version"] == SCHEMA_VERSION == 3


def test_tuples_and_numpy_scalars_become_json_data():
    np = pytest.importorskip("numpy")
    nodes = make_plan().nodes
    nodes[1]["shape"] = (8, 64)
    nodes[1]["compute_s"] = np.float64(1.25e-6)
    plan = make_plan(nodes=nodes, peak_memory_bytes=np.int64(5), step_time_s=1)
    assert plan.nodes[1]["shape"] == [8, 64]
    assert Plan.from_json(plan.to_json()) == plan
    assert isinstance(plan.peak_memory_bytes, int) and isinstance(plan.step_time_s, float)


def test_hash_is_stable_and_content_sensitive():
    a, b = make_plan(), make_plan()
    assert a.hash() == b.hash()
    assert len(a.hash()) == 64
    assert Plan.from_json(a.to_json()).hash() == a.hash()
    assert make_plan(step_time_s=0.31).hash() != a.hash()


def test_summary_mentions_the_essentials():
    s = make_plan().summary()
    assert "dp=2,tp=4" in s and "h100-sxm" in s and "2 collectives" not in s
    assert "collectives: 2" in s and "3.00 GiB" in s


def test_malformed_json():
    err = refusal('{"mesh": {"dp": 2},\n "hardware": }')
    assert err.path == "$"
    assert "not valid JSON" in str(err) and "line 2" in str(err) and "column" in str(err)


def test_not_an_object():
    assert refusal("[1, 2]").path == "$"


@pytest.mark.parametrize("version", [4, 0, "1", None])
def test_wrong_schema_version(version):
    data = json.loads(make_plan().to_json())
    data["schema_version"] = version
    err = refusal(data)
    assert err.path == "$.schema_version"
    assert f"plan schema version {version}; this autopar reads versions 1 to 3" in str(err)


def test_missing_schema_version():
    data = json.loads(make_plan().to_json())
    del data["schema_version"]
    err = refusal(data)
    assert err.path == "$.schema_version"
    assert "this autopar reads versions 1 to 3" in str(err)


def test_version_1_plans_load_with_the_default_optimizer():
    data = json.loads(make_plan(optimizer="sgd").to_json())
    del data["optimizer"]
    data["schema_version"] = 1
    plan = Plan.from_json(json.dumps(data))
    assert plan.optimizer == "adamw" and plan.schema_version == SCHEMA_VERSION
    data["optimizer"] = "lion"
    err = refusal(data)
    assert err.path == "$.optimizer" and "adamw8bit" in str(err)


def test_missing_field():
    data = json.loads(make_plan().to_json())
    del data["collectives"]
    err = refusal(data)
    assert err.path == "$.collectives"
    assert "missing" in str(err) and "'collectives'" in str(err)


def test_missing_nested_field():
    data = json.loads(make_plan().to_json())
    del data["collectives"][1]["time_s"]
    err = refusal(data)
    assert err.path == "$.collectives[1].time_s"
    assert "missing" in str(err)


def test_wrong_type():
    data = json.loads(make_plan().to_json())
    data["peak_memory_bytes"] = "lots"
    err = refusal(data)
    assert err.path == "$.peak_memory_bytes"
    assert "must be an int" in str(err)


def test_bad_placement_string():
    data = json.loads(make_plan().to_json())
    data["param_placements"]["fc1.weight"]["tp"] = "Shard(0)"
    err = refusal(data)
    assert err.path == '$.param_placements["fc1.weight"].tp'
    assert "bad placement 'Shard(0)'" in str(err)


def test_bad_placement_in_node_output_list():
    data = json.loads(make_plan().to_json())
    data["nodes"][2]["placements"][1]["dp"] = "P"
    err = refusal(data)
    assert err.path == "$.nodes[2].placements[1].dp"
    assert "bad placement 'P'" in str(err)


def test_axis_not_in_mesh():
    data = json.loads(make_plan().to_json())
    data["param_placements"]["fc2.weight"]["cp"] = "R"
    err = refusal(data)
    assert err.path == '$.param_placements["fc2.weight"].cp'
    assert "mesh axis 'cp' is not in the plan's mesh" in str(err)


def test_collective_axis_not_in_mesh():
    data = json.loads(make_plan().to_json())
    data["collectives"][0]["axis"] = "ep"
    err = refusal(data)
    assert err.path == "$.collectives[0].axis"
    assert "'ep'" in str(err)


def test_unknown_top_level_field():
    data = json.loads(make_plan().to_json())
    data["extra"] = 1
    err = refusal(data)
    assert err.path == "$.extra" and "unknown field" in str(err)


def test_missing_file(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "nope.json")


def test_graph_hash_mismatch():
    plan = make_plan()
    check_graph_hash(plan, "abc123")  # same graph: fine
    with pytest.raises(PlanError) as info:
        check_graph_hash(plan, "def456")
    assert info.value.path == "$.graph_hash"
    assert "another model" in str(info.value) and "abc123 != def456" in str(info.value)


def test_loading_runs_no_code(tmp_path):
    # A pickle payload is just not JSON.
    import pickle

    path = tmp_path / "plan.json"
    path.write_bytes(pickle.dumps(make_plan()))
    with pytest.raises(PlanError) as info:
        Plan.load(path)
    assert info.value.path == "$"


def test_mesh_keeps_outer_to_inner_order_through_json():
    plan = make_plan(mesh={"tp": 4, "dp": 2})
    assert list(plan.mesh) == ["dp", "tp"]
    assert list(Plan.from_json(plan.to_json()).mesh) == ["dp", "tp"]


def test_node_without_a_tensor_has_null_placements():
    nodes = make_plan().nodes + [{"name": "output", "op": "output", "shape": None, "placements": None}]
    plan = make_plan(nodes=nodes)
    assert Plan.from_json(plan.to_json()) == plan


def test_message_names_the_field():
    data = json.loads(make_plan().to_json())
    data["nodes"][1]["shape"] = "8x64"
    err = refusal(data)
    assert err.path == "$.nodes[1].shape"
    assert str(err).startswith("shape must be") and '"8x64"' in str(err)


def test_pipelined_plans_round_trip_through_json(tmp_path):
    import torch

    import autopar
    from models import GPT

    with torch.device("meta"):
        model = GPT(layers=2)
    ids = torch.zeros(8, 16, dtype=torch.long, device="meta")
    for axes in ({"pp": 2}, {"pp": 2, "tp": 2}):  # pp alone lays stages out on a one-device tp axis
        plan = autopar.plan(model, autopar.Mesh(axes, hardware="h100-sxm"), (ids,), pipeline={"schedule": "1f1b"})
        plan.save(tmp_path / "pp.json")
        again = autopar.Plan.load(tmp_path / "pp.json")
        assert again.pipeline == plan.pipeline and again.hash() == plan.hash()
