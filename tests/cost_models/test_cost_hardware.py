"""Hardware presets: bundled data files, custom JSON and TOML presets, and errors that name what is wrong."""

import json
import math

import pytest

from autopar.cost_models.hardware import PRESET_DIR, Hardware, Link, list_presets, load_hardware
from autopar.errors import AutoparError, MeshError


def test_bundled_presets_are_listed_and_load():
    names = list_presets()
    assert {"a100-80g", "h100-sxm", "local"} <= set(names)
    assert names == sorted(names)
    for name in names:
        hw = load_hardware(name)
        assert isinstance(hw, Hardware) and hw.name == name
        assert hw.devices_per_node >= 1 and hw.memory_capacity_bytes > 0
        assert hw.intra_node.bandwidth_Bps >= hw.inter_node.bandwidth_Bps


def test_h100_published_numbers():
    hw = load_hardware("h100-sxm")
    assert hw.peak("bfloat16") == 989e12
    assert hw.memory_bandwidth_Bps == 3.35e12 and hw.memory_capacity_bytes == 80e9
    assert hw.intra_node == Link(450e9, hw.intra_node.latency_s)  # NVLink4 900 GB/s bidirectional
    assert hw.inter_node.bandwidth_Bps == 50e9  # 400 Gb/s NDR per GPU
    assert hw.devices_per_node == 8


def test_a100_published_numbers():
    hw = load_hardware("a100-80g")
    assert hw.peak("torch.bfloat16") == 312e12 and hw.peak("float32") == 19.5e12
    assert hw.intra_node.bandwidth_Bps == 300e9 and hw.inter_node.bandwidth_Bps == 25e9


def test_presets_carry_schema_and_notes():
    for name in list_presets():
        data = json.loads((PRESET_DIR / f"{name}.json").read_text())
        assert data["schema"] == 1
        assert len(data["notes"]) > 40, f"{name}.json must say where its numbers come from"


def test_local_preset_is_measured():
    hw = load_hardware("local")
    assert hw.devices_per_node == 8
    assert hw.intra_node == hw.inter_node  # all local ranks share one host
    assert 1e9 < hw.peak("float32") < 1e13  # a CPU, not a GPU
    assert "benchmarks/measure_local_preset.py" in json.loads((PRESET_DIR / "local.json").read_text())["notes"]


def test_peak_dtype_spellings_and_fallback():
    hw = load_hardware("h100-sxm")
    for spelling in ("bfloat16", "torch.bfloat16", "bf16", "BFloat16"):
        assert hw.peak(spelling) == 989e12
    assert hw.peak("torch.float32") == hw.peak("float") == hw.peak_flops["float32"]
    assert hw.peak("torch.float16") == hw.peak("half") == hw.peak_flops["float16"]
    assert hw.peak("int8") == hw.peak("torch.float64") == hw.peak_flops["float32"]


def test_load_is_cached_and_hardware_is_hashable():
    assert load_hardware("h100-sxm") is load_hardware("h100-sxm")
    assert len({load_hardware("h100-sxm"), load_hardware("a100-80g"), load_hardware("h100-sxm")}) == 2


def test_unknown_preset_lists_valid_names():
    with pytest.raises(MeshError) as err:
        load_hardware("h900")
    msg = str(err.value)
    assert "'h900'" in msg
    for name in list_presets():
        assert name in msg
    assert ".json" in msg and ".toml" in msg
    assert isinstance(err.value, AutoparError)


def _preset(**overrides):
    data = {
        "schema": 1, "name": "my-cluster", "description": "test", "notes": "made up",
        "peak_flops": {"float32": 1e12, "bfloat16": 4e12},
        "memory_bandwidth_Bps": 1e11, "memory_capacity_bytes": 16e9, "devices_per_node": 4,
        "intra_node": {"bandwidth_Bps": 1e11, "latency_s": 1e-6},
        "inter_node": {"bandwidth_Bps": 1e10, "latency_s": 5e-6},
    }
    data.update(overrides)
    return data


def test_custom_preset_from_json_path(tmp_path):
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(_preset()))
    hw = load_hardware(str(path))
    assert hw.name == "my-cluster" and hw.devices_per_node == 4
    assert hw.peak("bf16") == 4e12 and hw.peak("float16") == 1e12  # float16 missing -> float32
    assert hw.inter_node == Link(1e10, 5e-6)


def test_missing_file_is_a_mesh_error(tmp_path):
    with pytest.raises(MeshError, match="does not exist"):
        load_hardware(str(tmp_path / "nope.json"))


def _toml(value) -> str:
    """Enough TOML for a preset: inline tables, arrays, numbers, strings, booleans."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml, value)) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return "inf" if value == math.inf else json.dumps(value)


def _write(tmp_path, data: dict, fmt: str):
    path = tmp_path / f"cluster.{fmt}"
    path.write_text(json.dumps(data) if fmt == "json" else "\n".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in data.items()))
    return path


@pytest.mark.parametrize("name", list_presets())
def test_toml_preset_loads_like_json(tmp_path, name):
    data = json.loads((PRESET_DIR / f"{name}.json").read_text())
    data["inter_node_overrides"] = [{"nodes": [1], "bandwidth_Bps": 1e9, "latency_s": 1e-4}]
    toml_hw, json_hw = (load_hardware(str(_write(tmp_path, data, fmt))) for fmt in ("toml", "json"))
    assert toml_hw == json_hw and toml_hw.name == name and toml_hw.inter_node_overrides == (((1,), Link(1e9, 1e-4)),)


OVERRIDE = {"nodes": [2, 3], "bandwidth_Bps": 1e9, "latency_s": 5e-5}


@pytest.mark.parametrize("fmt", ["json", "toml"])
@pytest.mark.parametrize(
    "overrides, field, why",
    [
        ({"memory_bandwidth_Bps": None}, "memory_bandwidth_Bps", "is missing"),
        ({"peak_flops": {"bfloat16": 1e12}}, "peak_flops.float32", "is missing"),
        ({"intra_node": {"bandwidth_Bps": 1e11}}, "intra_node.latency_s", "is missing"),
        ({"inter_node": None}, "inter_node", "is missing"),
        ({"inter_node": "fast"}, "inter_node", "is missing or not an object"),
        ({"inter_node": {"bandwidth_Bps": -1e10, "latency_s": 5e-6}}, "inter_node.bandwidth_Bps", "must be a positive number, got -1"),
        ({"intra_node": {"bandwidth_Bps": 1e11, "latency_s": -1e-6}}, "intra_node.latency_s", "must be a non-negative number"),
        ({"memory_bandwidth_Bps": math.inf}, "memory_bandwidth_Bps", "must be a positive number, got inf"),
        ({"devices_per_node": 0}, "devices_per_node", "must be a positive integer"),
        ({"schema": 2}, "schema", "must be 1, got 2"),
        ({"memory_capacity_bytes": -1}, "memory_capacity_bytes", "must be a positive number"),
        ({"all_to_all_as_all_gather": "yes"}, "all_to_all_as_all_gather", "must be true or false"),
        ({"inter_node_overrides": OVERRIDE}, "inter_node_overrides", "must be a list"),
        ({"inter_node_overrides": [{**OVERRIDE, "nodes": []}]}, "inter_node_overrides[0].nodes", "must be a non-empty list of node numbers"),
        ({"inter_node_overrides": [{**OVERRIDE, "nodes": [1, -2]}]}, "inter_node_overrides[0].nodes", "must be a non-empty list of node numbers"),
        ({"inter_node_overrides": [{**OVERRIDE, "nodes": "2"}]}, "inter_node_overrides[0].nodes", "must be a non-empty list"),
        ({"inter_node_overrides": [OVERRIDE, {**OVERRIDE, "nodes": [3, 4]}]}, "inter_node_overrides[1].nodes", "repeats node(s) [3]"),
        ({"inter_node_overrides": [{"nodes": [2], "latency_s": 1e-5}]}, "inter_node_overrides[0].bandwidth_Bps", "is missing"),
        ({"inter_node_overrides": [{**OVERRIDE, "bandwidth_Bps": -5}]}, "inter_node_overrides[0].bandwidth_Bps", "must be a positive"),
    ],
)
def test_malformed_preset_names_file_and_field(tmp_path, fmt, overrides, field, why):
    data = {k: v for k, v in _preset(**overrides).items() if v is not None}
    path = _write(tmp_path, data, fmt)
    with pytest.raises(MeshError) as err:
        load_hardware(str(path))
    assert str(path) in str(err.value) and f"field {field!r} {why}" in str(err.value)


@pytest.mark.parametrize("fmt, text", [("json", "{not json"), ("toml", "schema = = 1")])
def test_unreadable_file_names_file(tmp_path, fmt, text):
    path = tmp_path / f"broken.{fmt}"
    path.write_text(text)
    with pytest.raises(MeshError, match=f"cannot read hardware preset file .*broken.{fmt}"):
        load_hardware(str(path))


def test_inter_node_overrides_price_a_ring_at_its_slowest_nic(tmp_path):
    slow = {"bandwidth_Bps": 2e9, "latency_s": 1e-6}  # less bandwidth than the default NIC, but less latency too
    hw = load_hardware(str(_write(tmp_path, _preset(inter_node_overrides=[{"nodes": [2, 3], **slow}]), "json")))
    assert hw.inter_link(range(2)) == hw.inter_node == Link(1e10, 5e-6)  # nodes 0, 1: the default NICs
    assert hw.inter_link(range(4)) == Link(2e9, 5e-6) == hw.inter_link([0, 3])  # lowest bandwidth, highest latency
    assert hw.inter_link([2]) == Link(2e9, 1e-6)
