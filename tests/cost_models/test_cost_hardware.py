"""Hardware presets: bundled data files, custom JSON presets, and errors that name what is wrong."""

import json

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
    assert ".json" in msg
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


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"memory_bandwidth_Bps": None}, "memory_bandwidth_Bps"),
        ({"peak_flops": {"bfloat16": 1e12}}, "peak_flops.float32"),
        ({"intra_node": {"bandwidth_Bps": 1e11}}, "intra_node.latency_s"),
        ({"inter_node": "fast"}, "inter_node"),
        ({"devices_per_node": 0}, "devices_per_node"),
        ({"schema": 2}, "schema"),
        ({"memory_capacity_bytes": -1}, "memory_capacity_bytes"),
    ],
)
def test_malformed_preset_names_file_and_field(tmp_path, overrides, field):
    data = _preset(**overrides)
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(MeshError) as err:
        load_hardware(str(path))
    assert str(path) in str(err.value) and repr(field) in str(err.value)


def test_invalid_json_names_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(MeshError, match="broken.json"):
        load_hardware(str(path))
