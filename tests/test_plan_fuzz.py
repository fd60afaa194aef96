"""Plan.load on mutated plan files: it loads them or raises PlanError with a JSON path, nothing else."""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autopar import Plan
from autopar.errors import PlanError
from autopar.plan import _checkers

GOLDEN = sorted((Path(__file__).parent / "golden").glob("*.json"))
DOCS = [json.loads(p.read_text()) for p in GOLDEN]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)


def _containers(doc, path=()):
    """Every (path, container) in the document, the document itself first."""
    yield path, doc
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        if isinstance(v, (dict, list)):
            yield from _containers(v, (*path, k))


def _at(doc, path):
    for k in path:
        doc = doc[k]
    return doc


@st.composite
def mutated(draw):
    """A golden plan with one to three random edits: a value replaced by any JSON value, a key or
    element deleted, a key added, a value wrapped in a list; or its text cut or spliced."""
    doc = json.loads(json.dumps(draw(st.sampled_from(DOCS))))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p, c in _containers(doc) if c]
        path = draw(st.sampled_from(paths))
        box = _at(doc, path)
        key = draw(st.sampled_from(sorted(box) if isinstance(box, dict) else list(range(len(box)))))
        op = draw(st.sampled_from(["replace", "delete", "add", "wrap"]))
        if op == "replace":
            box[key] = draw(json_values)
        elif op == "delete":
            del box[key]
        elif op == "add" and isinstance(box, dict):
            box[draw(st.text(max_size=10))] = draw(json_values)
        elif op == "add":
            box.insert(key, draw(json_values))
        else:
            box[key] = [box[key]]
    text = json.dumps(doc, allow_nan=True)
    if draw(st.booleans()) and draw(st.integers(0, 9)) == 0:  # sometimes: not JSON any more
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.text(max_size=3)) + text[cut + draw(st.integers(0, 5)):]
    return text


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(mutated())
def test_mutated_plans_load_or_fail_with_a_json_path(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(text, encoding="utf-8")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("mesh"), dict):  # the fast check agrees with jsonschema
        fast, reference = _checkers(tuple(doc["mesh"]))
        assert fast(doc) == reference.is_valid(doc)
    try:
        plan = Plan.load(path)
    except PlanError as e:
        assert e.path.startswith("$"), e.path
        return
    plan.hash()  # a plan that loads can be used
    plan.to_json()


def test_the_fuzzer_mutates():
    assert GOLDEN, "tests/golden/ has no plans"
    with pytest.raises(PlanError):
        Plan.from_json(json.dumps({**DOCS[0], "mesh": {"tp": "eight"}}))
