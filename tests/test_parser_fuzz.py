"""The mesh parser (the CLI's ``dp=2,tp=4``), ``Mesh(...)`` and the hardware preset loader on
arbitrary input: each gives a result or a MeshError with a message, never another exception."""

import json
import math
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autopar import Mesh
from autopar.cost_models.hardware import PRESET_DIR, Hardware, list_presets, load_hardware
from autopar.errors import MeshError
from autopar.mesh import AXIS_ORDER

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
PRESETS = [json.loads(p.read_text()) for p in sorted(PRESET_DIR.glob("*.json"))]

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**1100) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
axes = st.sampled_from(AXIS_ORDER)
good_pairs = st.tuples(axes, st.sampled_from(["=", " = ", "= "]), st.integers(1, 64).map(str))
bad_pairs = st.tuples(axes | st.sampled_from(["", "x", "DP", "t p", "pp=1"]) | st.text(max_size=4),
                      st.sampled_from(["=", "==", ":", ""]),
                      st.integers(0, 64).map(str) | st.sampled_from(["-1", "2.0", "²", "١", "0x4", "9" * 20, ""])
                      | st.text(max_size=3))
# mesh text: axis=size pairs, mostly good ones (some repeat an axis), sometimes a bad one, or any text
mesh_text = (st.lists(good_pairs | good_pairs | bad_pairs, max_size=4).map(lambda ps: ",".join(map("".join, ps)))
             | st.text(max_size=20))
axes_dicts = (st.dictionaries(axes, st.integers(1, 64), min_size=1, max_size=3)
              | st.dictionaries(axes | scalars, st.integers(-1, 64) | values, max_size=4) | values)
hardwares = (st.sampled_from(list_presets()) | st.sampled_from(["nope", "x.json", "~nobody/x.toml", "/", "a\0b"])
             | values)


def _refused(fn, *args, **kwargs):
    """fn's result, or None when it raised MeshError with a message (any other exception fails)."""
    try:
        return fn(*args, **kwargs)
    except MeshError as e:
        assert str(e).strip(), "a MeshError must say what is wrong"
        return None


@FUZZ
@given(mesh_text)
def test_mesh_text_parses_or_fails_clearly(text):
    mesh = _refused(Mesh.parse, text)
    if mesh is not None:  # what parsed prints back as the same request
        assert all(a in AXIS_ORDER and n >= 1 for a, n in mesh.axes.items())
        assert Mesh.parse(",".join(f"{a}={n}" for a, n in mesh.axes.items())) == mesh


@FUZZ
@given(axes_dicts, hardwares)
def test_mesh_from_any_dict_or_hardware_fails_clearly(axes, hardware):
    mesh = _refused(Mesh, axes, hardware=hardware)
    if mesh is not None:
        assert mesh.size == math.prod(axes.values()) and isinstance(mesh.hardware_spec, Hardware)


def _mutate(draw, doc):
    """One to three edits anywhere in a preset: a value replaced, a key deleted or added, a value wrapped."""
    for _ in range(draw(st.integers(1, 3))):
        boxes, todo = [], [doc]
        while todo:
            box = todo.pop()
            if box:
                boxes.append(box)
            todo.extend(v for v in (box.values() if isinstance(box, dict) else box) if isinstance(v, (dict, list)))
        box = draw(st.sampled_from(boxes))
        key = draw(st.sampled_from(sorted(box) if isinstance(box, dict) else range(len(box))))
        op = draw(st.sampled_from(["replace", "delete", "add", "wrap"]))
        if op == "replace":
            box[key] = draw(values)
        elif op == "delete":
            del box[key]
        elif op == "add" and isinstance(box, dict):
            box[draw(st.text(max_size=10))] = draw(values)
        elif op == "add":
            box.insert(key, draw(values))
        else:
            box[key] = [box[key]]
    return doc


def _toml(v) -> str:
    """TOML for any JSON value: inline tables and arrays (null, NaN and out-of-range ints give bad TOML)."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(map(_toml, v)) + "]"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if v != v else "inf" if v > 0 else "-inf"
    return "null" if v is None else json.dumps(v)


@st.composite
def preset_files(draw):
    doc = _mutate(draw, json.loads(json.dumps(draw(st.sampled_from(PRESETS)))))
    fmt = draw(st.sampled_from(["json", "toml"]))
    text = json.dumps(doc, allow_nan=True) if fmt == "json" else "\n".join(f"{json.dumps(k)} = {_toml(v)}"
                                                                          for k, v in doc.items())
    if draw(st.integers(0, 9)) == 0:  # sometimes cut or spliced: not JSON or TOML any more
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.text(max_size=3)) + text[cut + draw(st.integers(0, 5)):]
    return fmt, text


@FUZZ
@given(preset_files())
def test_mutated_hardware_presets_load_or_fail_clearly(tmp_path_factory, file):
    fmt, text = file
    path = tmp_path_factory.mktemp("preset") / f"cluster.{fmt}"
    path.write_text(text, encoding="utf-8")
    hw = _refused(load_hardware, str(path))
    if hw is not None:  # a preset that loads is usable: it hashes, and prices every dtype and link
        hash(hw)
        assert hw.peak("bf16") > 0 and hw.inter_link(range(3)).bandwidth_Bps > 0
        assert Path(path).is_file()


def test_the_parsers_refuse_what_they_should():
    for text in ("dp=2,dp=4", "dp=²", "dp=١", "dp=" + "9" * 5000, "tp=4=2"):
        assert _refused(Mesh.parse, text) is None, text
    assert Mesh.parse(" dp = 2 , tp=4 ,") == Mesh({"dp": 2, "tp": 4})
    assert _refused(Mesh, {"dp": 2}, hardware=["local"]) is None
