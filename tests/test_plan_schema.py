"""The plan's JSON Schema (autopar/schemas/plan-v3.schema.json): shipped, valid, and what Plan.load uses."""

import dataclasses
import json
import math
from importlib import resources
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator, validators

from autopar.errors import PlanError
from autopar.mesh import AXIS_ORDER
from autopar.plan import READABLE_VERSIONS, SCHEMA_VERSION, Plan, _checkers

GOLDEN = sorted((Path(__file__).parent / "golden").glob("*.json"))
BASE = "gpt_block_dp2_tp4_a100.json"  # mesh dp=2, tp=4


def shipped() -> dict:
    """The schema file as the installed package ships it."""
    f = resources.files("autopar") / "schemas" / f"plan-v{SCHEMA_VERSION}.schema.json"
    assert f.is_file(), f"{f} is not in the package (pyproject package-data ships autopar/schemas/*.json)"
    return json.loads(f.read_text(encoding="utf-8"))


def test_the_schema_is_shipped_and_is_a_valid_2020_12_schema():
    schema = shipped()
    Draft202012Validator.check_schema(schema)
    assert validators.validator_for(schema) is Draft202012Validator
    assert schema == Plan.schema()
    assert Plan.schema() is not Plan.schema()  # a fresh copy each time: callers may change theirs


def test_the_schema_version_matches_the_code():
    schema = shipped()
    assert schema["$id"].endswith(f"plan-v{SCHEMA_VERSION}")
    assert schema["properties"]["schema_version"]["enum"] == list(READABLE_VERSIONS)
    assert max(READABLE_VERSIONS) == SCHEMA_VERSION


def test_the_schema_documents_every_field_of_a_plan():
    schema = shipped()
    names = {f.name for f in dataclasses.fields(Plan)}
    assert set(schema["properties"]) == names
    no_default = {f.name for f in dataclasses.fields(Plan)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    assert set(schema["required"]) == no_default | {"schema_version"}
    assert all(p.get("description") for p in schema["properties"].values())
    assert schema["title"] and schema["description"]


def test_the_schema_enums_agree_with_the_code():
    from autopar.api import MODES
    from autopar.cost_models.memory import OPTIMIZERS
    from autopar.solvers.inter_op import SCHEDULES

    schema = shipped()
    props = schema["properties"]
    assert props["mode"]["enum"] == list(MODES)
    assert props["optimizer"]["enum"] == list(OPTIMIZERS)
    assert set(props["pipeline"]["properties"]["schedule"]["enum"]) == set(SCHEDULES)
    assert schema["$defs"]["axisName"]["enum"] == schema["$defs"]["meshAxis"]["enum"] == list(AXIS_ORDER)


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.name)
def test_golden_plans_validate_against_the_plain_schema(path):
    doc = json.loads(path.read_text())
    Draft202012Validator(shipped()).validate(doc)  # any 2020-12 validator, no autopar code
    assert _checkers(tuple(doc["mesh"]))[0](doc)
    assert Plan.load(path).to_json() == Plan.from_dict(doc).to_json()


def _edit(fn):
    doc = json.loads((Path(__file__).parent / "golden" / BASE).read_text())
    fn(doc)
    return doc


def _set(d, key, value):
    d[key] = value


MALFORMED = [  # (what, edit, path, words in the message)
    ("wrong type deep in nodes", lambda d: _set(d["nodes"][3]["shape"], 1, "2048"),
     "$.nodes[3].shape[1]", ['item 1 must be an int, an array or null, got string "2048"; item 1: a tensor dim']),
    ("node compute time not a number", lambda d: _set(d["nodes"][5], "compute_s", "fast"),
     "$.nodes[5].compute_s", ["compute_s must be a finite number"]),
    ("missing required node field", lambda d: d["nodes"][2].pop("op"), "$.nodes[2].op",
     ["required field 'op' is missing"]),
    ("missing required top-level field", lambda d: d.pop("solver"), "$.solver",
     ["required field 'solver' is missing"]),
    ("unknown top-level field", lambda d: _set(d, "extra", 1), "$.extra",
     ["plan has unknown field(s) ['extra']", "known fields are"]),
    ("bad mode", lambda d: _set(d, "mode", "training"), "$.mode",
     ["mode must be one of ['train', 'infer']", '"training"']),
    ("bad schedule", lambda d: _set(d, "pipeline", {"bounds": [], "stage_times_s": [], "stage_memory_bytes": [],
                                                      "layers": [], "schedule": "zigzag"}),
     "$.pipeline.schedule", ["schedule must be one of", "1f1b", '"zigzag"']),
    ("negative mesh size", lambda d: _set(d["mesh"], "dp", -2), "$.mesh.dp", ["dp must be at least 1"]),
    ("NaN step time", lambda d: _set(d, "step_time_s", math.nan), "$.step_time_s",
     ["step_time_s must be a finite number, got number NaN"]),
    ("infinite collective time", lambda d: _set(d["collectives"][0], "time_s", math.inf),
     "$.collectives[0].time_s", ["finite number", "Infinity"]),
    ("placement on an axis not in the mesh", lambda d: _set(d["param_placements"]["fc1.weight"], "cp", "R"),
     '$.param_placements["fc1.weight"].cp', ["mesh axis 'cp' is not in the plan's mesh ['dp', 'tp']"]),
    ("collective on an axis not in the mesh", lambda d: _set(d["collectives"][1], "axis", "ep"),
     "$.collectives[1].axis", ["mesh axis 'ep' is not in the plan's mesh"]),
    ("bad placement string", lambda d: _set(d["nodes"][4]["placements"], "tp", "S(one)"),
     "$.nodes[4].placements.tp", ["bad placement 'S(one)'", "'R', 'S(<dim>)' or 'P(sum|avg|max|min)'"]),
    ("bad key in an FQN map", lambda d: _set(d["explanations"]["fc1.weight"]["alternatives"][0], "cost_s", "x"),
     '$.explanations["fc1.weight"].alternatives[0].cost_s', ["cost_s must be a finite number or null"]),
    ("gradient compression without a method", lambda d: _set(d, "compression", {"grads": {"fc1.weight": {}}}),
     '$.compression.grads["fc1.weight"].method', ["required field 'method' is missing"]),
    ("pipeline stages do not match pp", lambda d: _set(d, "pipeline", {"bounds": [[0, 1]], "stage_times_s": [],
                                                                       "stage_memory_bytes": [], "layers": []}),
     "$.pipeline.bounds", ["pp x virtual_stages = 0 x 1, got 1"]),
]


@pytest.mark.parametrize("what,edit,path,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_plans_name_the_path(what, edit, path, words):
    doc = _edit(edit)
    with pytest.raises(PlanError) as info:
        Plan.from_json(json.dumps(doc, allow_nan=True))
    assert info.value.path == path, str(info.value)
    for w in words:
        assert w in str(info.value)
    fast, reference = _checkers(tuple(doc["mesh"]))
    assert fast(doc) == reference.is_valid(doc)


def test_pp_only_meshes_place_stages_on_a_one_device_tp_axis():
    def pp_only(d):
        d["mesh"] = {"pp": 2}
        for pl in d["param_placements"].values():
            pl.pop("dp")
        d["param_placements"]["fc1.weight"]["dp"] = "R"

    with pytest.raises(PlanError) as info:
        Plan.from_dict(_edit(pp_only))
    assert info.value.path == '$.param_placements["fc1.weight"].dp'
    assert "not in the plan's mesh ['pp', 'tp']" in str(info.value)


def test_deeply_nested_input_is_refused_cleanly():
    deep = []
    for _ in range(2000):
        deep = [deep]
    with pytest.raises(PlanError) as info:
        Plan.from_dict(_edit(lambda d: _set(d["nodes"][0], "shape", deep)))
    assert info.value.path.startswith("$")
