"""The Plan: everything autopar decided about one model on one mesh, as pure, versioned JSON data.

A plan is produced by ``autopar.plan`` / ``autopar.compile`` and read by the runtime and by the
``autopar`` CLI. It holds only stable names, numbers and placement strings (``R | S(d) | P(op)``,
keyed by mesh axis name), never Python objects, so:

* ``Plan.to_json()`` is canonical (sorted keys, ``indent=1``) and floats round-trip exactly;
* ``Plan.from_json`` / ``Plan.load`` run no code (plain ``json``) and validate every field, refusing
  bad input with :class:`autopar.errors.PlanError`, whose ``path`` is the JSON path of the fault,
  e.g. ``$.param_placements["fc1.weight"].tp``;
* the format is a JSON Schema (draft 2020-12) shipped in the package,
  ``autopar/schemas/plan-v3.schema.json`` (``Plan.schema()`` returns it), with a description on
  every field. Python adds only what a schema can't say: the schema version is checked first,
  placement keys must be axes of the plan's own mesh, and a pipeline has pp x virtual_stages stages;
* ``Plan.hash()`` is the sha256 of the canonical JSON, used to check that every rank got the same
  plan. The JSON holds decisions and predictions only, so planning the same model, mesh, hardware
  and options again gives the same bytes; wall-clock measurements of the run that made a plan
  (solver times) are ``Plan.timings``, an attribute that is not saved.

Schema version 2 added ``optimizer``; a version 1 plan loads with the default, ``"adamw"``.
Schema version 3 added ``fusion`` (the generated kernels, codegen/fusion.py) and ``compression``
(each gradient's and pipeline send's compression, solvers/compression.py); older plans load
without them (no fusion recorded, nothing compressed). Version 3 later gained ``comm_schedule``
(the gradient buckets and their order, passes/comm_schedule.py), optional too: a plan without it
has no schedule. Each version only added optional fields, so one schema file, named after the
version autopar writes, reads them all (``schema_version`` is one of 1, 2, 3); a version that
changes or removes a field gets a new file, ``plan-v4.schema.json``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import numbers
import re
import sys
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from . import placements as _placements
from .errors import PlanError
from .mesh import AXIS_ORDER

SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class Plan:
    mesh: dict[str, int]  # axis -> size, outer to inner
    hardware: str
    mode: str  # "train" | "infer"
    graph_hash: str  # hash of the traced graph
    model: str  # model class name (informational)
    step_time_s: float  # predicted seconds per step
    peak_memory_bytes: int  # max over devices
    memory: dict[str, int]  # per device: parameters, gradients, optimizer, activations, transient
    time_breakdown: dict[str, float]  # compute_s, comm_fwd_s, comm_bwd_s, grad_sync_s, ...
    param_placements: dict[str, dict[str, str]]  # FQN -> {axis: "R" | "S(d)" | "P(sum)"}
    input_placements: list[dict[str, str]]  # one per flattened user input
    nodes: list[dict]  # per graph node: name, op, shape, dtype, placements, compute_s, ...
    collectives: list[dict]  # op, axis, bytes, time_s, phase, tensor, node, src, dst
    solver: dict  # name, status, objective_s, ... (no wall-clock times: Plan.timings)
    warnings: list[str] = field(default_factory=list)
    explanations: dict[str, dict] = field(default_factory=dict)  # target -> chosen, alternatives, reason
    optimizer: str = "adamw"  # whose state the memory counts (cost_models/memory.py)
    pipeline: dict | None = None  # with a "pp" axis: stages, schedule, microbatches (solvers/inter_op.py)
    fusion: dict | None = None  # backend and the fused kernels of the per-rank program (codegen/fusion.py)
    # {"grads": {FQN: {"method", ...}}, "pipeline": method or None, ...} (solvers/compression.py)
    compression: dict | None = None
    # the backward's gradient all-reduces: buckets, issue order, predicted timeline (passes/comm_schedule.py)
    comm_schedule: dict | None = None
    model_flops: float | None = None  # the whole model's FLOPs per step (forward, + backward ~2x when training)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        self.timings: dict[str, float] = {}  # wall-clock seconds of the run that made it; not a field, not saved
        # Hold plain JSON data only (tuples -> lists, numpy scalars -> Python numbers), so that a
        # plan equals its own round trip through JSON.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (dict, list, tuple)):
                setattr(self, f.name, _plain(value, f.name))
        if isinstance(self.mesh, dict):  # canonical JSON sorts keys; the mesh order is outer to inner
            rank = {a: i for i, a in enumerate(AXIS_ORDER)}
            self.mesh = dict(sorted(self.mesh.items(), key=lambda kv: rank.get(kv[0], len(rank))))
        if isinstance(self.step_time_s, numbers.Real) and not isinstance(self.step_time_s, bool):
            self.step_time_s = float(self.step_time_s)
        # Byte counts are ints; a cost model may hand over floats (or numpy ints).
        if isinstance(self.peak_memory_bytes, numbers.Real) and not isinstance(self.peak_memory_bytes, bool):
            self.peak_memory_bytes = int(round(self.peak_memory_bytes))
        if isinstance(self.memory, dict):
            self.memory = {
                k: int(round(v)) if isinstance(v, float) and math.isfinite(v) else v for k, v in self.memory.items()
            }

    # ---- JSON ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The fields as they are (plain JSON values, not copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, ``indent=1``; floats are written with ``repr`` precision."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=1, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """Parse and validate a plan; never runs code. Raises PlanError naming the JSON path."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", "$") from None
        except (TypeError, ValueError, RecursionError) as e:  # e.g. bytes that are not UTF-8
            raise PlanError(f"plan is not valid JSON: {e}", "$") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        try:
            validate(data)
            return cls(**{**data, "schema_version": SCHEMA_VERSION})
        except RecursionError:
            raise PlanError("plan is nested too deeply", "$") from None

    @staticmethod
    def schema() -> dict:
        """The plan format as a JSON Schema (draft 2020-12): a fresh copy of autopar/schemas/plan-v3.schema.json."""
        return json.loads(_schema_text())

    def save(self, path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path) -> "Plan":
        p = Path(path)
        if not p.exists():
            raise PlanError(f"plan file {str(p)!r} does not exist", "$")
        if not p.is_file():
            raise PlanError(f"plan file {str(p)!r} is not a regular file", "$")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise PlanError(f"plan file {str(p)!r} is not valid JSON: not UTF-8 text ({e.reason})", "$") from None
        return cls.from_json(text)

    def hash(self) -> str:
        """sha256 hex digest of the canonical JSON. Plans saved before ``Plan.timings`` kept solver
        times in ``solver`` (keys ending in ``time_s``); they are left out, as they always were."""
        doc = json.loads(json.dumps(self.to_dict(), sort_keys=True))  # as a saved plan reads back
        doc["solver"] = {k: v for k, v in doc["solver"].items() if not k.endswith("time_s")}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode("utf-8")).hexdigest()

    # ---- reading ------------------------------------------------------------------------------

    def summary(self) -> str:
        mesh = ",".join(f"{a}={n}" for a, n in self.mesh.items())
        devices = math.prod(self.mesh.values()) if self.mesh else 0
        solver = self.solver.get("name", "?")
        status = self.solver.get("status", "?")
        lines = [
            f"plan for {self.model} ({self.mode}) on mesh {mesh} ({devices} devices, {self.hardware})",
            f"  predicted step time: {format_seconds(self.step_time_s)}",
            f"  peak memory per device: {format_bytes(self.peak_memory_bytes)}",
            f"  collectives: {len(self.collectives)}; solver: {solver} ({status})",
        ]
        if self.warnings:
            lines.append(f"  warnings: {len(self.warnings)}")
        return "\n".join(lines)


def check_graph_hash(plan: Plan, graph_hash: str) -> None:
    """Refuse a plan that was made for another traced graph."""
    if plan.graph_hash != graph_hash:
        raise PlanError(
            f"plan was made for another model: graph hash {plan.graph_hash} != {graph_hash}; "
            "re-plan with autopar.plan or autopar.compile",
            "$.graph_hash",
        )


# ---- formatting helpers (shared with the CLI) -------------------------------------------------


def format_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_seconds(s: float) -> str:
    s = float(s)
    if not math.isfinite(s):
        return str(s)
    if abs(s) >= 1:
        return f"{s:.3f} s"
    if abs(s) >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    if abs(s) >= 1e-6 or s == 0:
        return f"{s * 1e6:.1f} us"
    return f"{s * 1e9:.1f} ns"


# ---- validation: the schema file, plus what it can't say (module docstring) -------------------


def _plain(value: Any, where: str) -> Any:
    def default(o):
        if hasattr(o, "item"):  # numpy / torch scalars
            return o.item()
        raise TypeError(f"plan field {where!r} holds a {type(o).__name__}, which is not JSON data")

    return json.loads(json.dumps(value, default=default))


def _key(path: str, key: str, *, bracket: bool = False) -> str:
    if not bracket and _IDENT.match(key):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key, ensure_ascii=False)}]"


def _path(parts) -> str:
    """``$.a.b[3]["key with.dots"]``; the keys of FQN maps always in brackets."""
    path = "$"
    for p in parts:
        path = f"{path}[{p}]" if isinstance(p, int) else _key(path, p, bracket=path in _FQN_MAPS)
    return path


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number" if isinstance(v, (int, float)) else type(v).__name__
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    """A JSON number that is a finite float: NaN, ±Infinity and ints beyond float range are refused."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= sys.float_info.max


def _last(path: str) -> str:
    """The last component of a JSON path, for messages: ``$.nodes[3].shape`` -> ``shape``."""
    m = re.search(r'(?:\.([A-Za-z_][A-Za-z0-9_]*)|\[("(?:[^"\\]|\\.)*"|\d+)\])$', path)
    if m is None:
        return "the plan"
    return m.group(1) or (json.loads(m.group(2)) if m.group(2).startswith('"') else f"item {m.group(2)}")


def _shown(v: Any) -> str:
    shown = json.dumps(v, ensure_ascii=False, default=repr)  # from_dict may be handed Python objects
    return shown[:57] + "..." if len(shown) > 60 else shown


_FQN_MAPS = ("$.param_placements", "$.compression.grads", "$.explanations")
_TYPES = {"integer": lambda v: _is_int(v) and _finite(v), "number": _finite, "string": lambda v: isinstance(v, str),
          "object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
          "boolean": lambda v: isinstance(v, bool), "null": lambda v: v is None}
_EXPECTED = {"integer": "an int", "number": "a finite number", "string": "a string", "object": "an object",
             "array": "an array", "boolean": "a boolean", "null": "null"}


@functools.lru_cache(maxsize=1024)
def _placement(text: str) -> str | None:
    """None for a good placement string, else what is wrong with it (cached: plans repeat a few)."""
    try:
        _placements.parse(text)
    except ValueError as e:
        return str(e)
    return None


_FORMATS = {"placement": lambda v: not isinstance(v, str) or _placement(v) is None}


@functools.cache
def _schema_text() -> str:
    return (resources.files("autopar") / "schemas" / f"plan-v{SCHEMA_VERSION}.schema.json").read_text("utf-8")


@functools.lru_cache(maxsize=64)
def _checkers(axes: tuple[str, ...] | None) -> tuple[Callable[[Any], bool], Any]:
    """(fast yes/no check, jsonschema validator) for plans whose placements are keyed by ``axes``: the
    schema with ``$defs/meshAxis`` narrowed to them; built once per set of mesh axes."""
    from jsonschema import Draft202012Validator, FormatChecker, validators  # imported on first use (~75 ms)

    s, formats = Plan.schema(), FormatChecker(())
    for name, ok in _FORMATS.items():
        formats.checks(name)(ok)
    if axes is not None:
        s["$defs"]["meshAxis"]["enum"] = list(axes)
    types = Draft202012Validator.TYPE_CHECKER.redefine_many({t: lambda _, v, ok=ok: ok(v) for t, ok in _TYPES.items()})
    return _compile(s, s, {}), validators.extend(Draft202012Validator, type_checker=types)(s, format_checker=formats)


def _compile(s: Any, root: dict, memo: dict) -> Callable[[Any], bool]:
    """The schema as nested closures: a yes/no ``is_valid`` for the keywords the plan schema uses,
    about 20x faster than jsonschema on a big plan. jsonschema stays the reference: it runs when this
    says no, to find the error (a keyword this doesn't know compiles to "no", deferring to it)."""
    if isinstance(s, bool):
        return lambda x: s
    if id(s) in memo:  # recursive $defs (a shape's dims)
        return memo[id(s)]
    checks: list[Callable[[Any], bool]] = []
    memo[id(s)] = lambda x: all(c(x) for c in checks)
    sub, known = (lambda t: _compile(t, root, memo)), set(s.get("properties", ()))
    for k, v in s.items():
        if k == "$ref" and v.startswith("#/$defs/"):
            checks.append(sub(root["$defs"][v[len("#/$defs/"):]]))
        elif k == "type":
            ts = [_TYPES[t] for t in ([v] if isinstance(v, str) else v)]
            checks.append(ts[0] if len(ts) == 1 else lambda x, ts=ts: any(t(x) for t in ts))
        elif k == "enum" and all(isinstance(e, str) for e in v):
            checks.append(lambda x, v=frozenset(v): isinstance(x, str) and x in v)
        elif k == "enum":
            checks.append(lambda x, v=v: any(type(x) is type(e) and x == e for e in v))
        elif k == "required":
            checks.append(lambda x, v=v: not isinstance(x, dict) or all(r in x for r in v))
        elif k == "properties":
            ps = [(p, f) for p, f in ((p, sub(t)) for p, t in v.items()) if f is not _ANY]
            checks.append(lambda x, ps=ps: not isinstance(x, dict) or all(f(x[p]) for p, f in ps if p in x))
        elif k == "additionalProperties":
            checks.append(lambda x, f=sub(v): not isinstance(x, dict) or all(f(y) for p, y in x.items()
                                                                              if p not in known))
        elif k == "propertyNames":
            checks.append(lambda x, f=sub(v): not isinstance(x, dict) or all(map(f, x)))
        elif k == "items":
            checks.append(lambda x, f=sub(v): not isinstance(x, list) or all(map(f, x)))
        elif k == "minimum":
            checks.append(lambda x, v=v: not _finite(x) or x >= v)
        elif k == "format":
            checks.append(_FORMATS.get(v, lambda x: False))
        elif k not in ("$schema", "$id", "$defs", "title", "description"):
            checks.append(lambda x: False)
    if len(checks) < 2:  # no closure around a single check (a recursive reference keeps the general one)
        memo[id(s)] = checks[0] if checks else _ANY
    return memo[id(s)]


def _ANY(x: Any) -> bool:
    return True


def _plan_error(e, mesh_axis: dict) -> PlanError:
    """The jsonschema error as a PlanError: what was expected, what was found, at autopar's JSON path."""
    path, v, kw = _path(e.absolute_path), e.instance, e.validator
    if "propertyNames" in e.absolute_schema_path:  # a bad key: point at it
        path = _key(path, v)
    if kw == "enum" and e.schema is mesh_axis:
        return PlanError(f"mesh axis {v!r} is not in the plan's mesh {mesh_axis['enum']}", path)
    if kw == "required":
        key = next(k for k in e.validator_value if k not in v)
        return PlanError(f"required field {key!r} is missing", _key(path, key))
    if kw == "additionalProperties":
        known = sorted(e.schema.get("properties", ()))
        unknown = sorted(set(v) - set(known))
        return PlanError(f"{'plan' if path == '$' else _last(path)} has unknown field(s) {unknown}; known fields "
                         f"are {known}", _key(path, unknown[0]))
    if kw == "format":
        return PlanError(_placement(v), path)
    if kw == "type":
        types = e.validator_value
        names = [_EXPECTED[t] for t in ([types] if isinstance(types, str) else types)]
        what = ", ".join(names[:-1]) + " or " * (len(names) > 1) + names[-1]
    else:
        what = {"enum": f"one of {e.validator_value}", "minimum": f"at least {e.validator_value}"}.get(
            kw, e.message[:80])
    if "propertyNames" in e.absolute_schema_path:
        return PlanError(f"key {v!r} must be {what}", path)
    about = e.schema.get("description", "").split(". ")[0].rstrip(".")  # what the field is, from the schema
    about = f"; {_last(path)}: {about[:1].lower()}{about[1:]}" if about else ""
    return PlanError(f"{_last(path)} must be {what}, got {_type_name(v)} {_shown(v)}{about}", path)


def validate(data: Any) -> None:
    """Check a decoded plan document; raise PlanError at the JSON path of the fault."""
    doc = data if isinstance(data, dict) else {"schema_version": SCHEMA_VERSION}  # the schema refuses the rest
    version = doc.get("schema_version", "missing")
    if not _is_int(version) or version not in READABLE_VERSIONS:
        raise PlanError(f"plan schema version {version}; this autopar reads versions {READABLE_VERSIONS[0]} to "
                        f"{SCHEMA_VERSION}", "$.schema_version")
    mesh = doc.get("mesh")
    if isinstance(mesh, dict) and set(mesh) == {"pp"}:  # a pp-only mesh lays its stages out on a one-device tp axis
        mesh = {**mesh, "tp": 1}
    ok, validator = _checkers(tuple(mesh) if isinstance(mesh, dict) else None)
    if not ok(data):
        from jsonschema.exceptions import best_match

        if (error := best_match(validator.iter_errors(data))) is not None:
            raise _plan_error(error, validator.schema["$defs"]["meshAxis"])
    pipe = doc.get("pipeline")
    if pipe is not None and len(pipe["bounds"]) != mesh.get("pp", 0) * pipe.get("virtual_stages", 1):
        raise PlanError(f"bounds must be one [start, end) per stage: pp x virtual_stages = {mesh.get('pp', 0)} x "
                        f"{pipe.get('virtual_stages', 1)}, got {len(pipe['bounds'])}", "$.pipeline.bounds")
