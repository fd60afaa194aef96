"""The Plan: everything autopar decided about one model on one mesh, as pure, versioned JSON data.

A plan is produced by ``autopar.plan`` / ``autopar.compile`` and read by the runtime and by the
``autopar`` CLI. It holds only stable names, numbers and placement strings (``R | S(d) | P(op)``,
keyed by mesh axis name), never Python objects, so:

* ``Plan.to_json()`` is canonical (sorted keys, ``indent=1``) and floats round-trip exactly;
* ``Plan.from_json`` / ``Plan.load`` run no code (plain ``json``) and validate every field, refusing
  bad input with :class:`autopar.errors.PlanError`, whose ``path`` is the JSON path of the fault,
  e.g. ``$.param_placements["fc1.weight"].tp``;
* ``Plan.hash()`` is the sha256 of the canonical JSON, used to check that every rank got the same
  plan.

Schema version 2 added ``optimizer``; a version 1 plan loads with the default, ``"adamw"``.
Schema version 3 added ``fusion`` (the generated kernels, codegen/fusion.py) and ``compression``
(each gradient's and pipeline send's compression, solvers/compression.py); older plans load
without them (no fusion recorded, nothing compressed).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from . import placements as _placements
from .cost_models.memory import OPTIMIZERS
from .errors import PlanError
from .mesh import AXIS_ORDER

SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)

MODES = ("train", "infer")

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
    solver: dict  # name, status, objective_s, solve_time_s, ...
    warnings: list[str] = field(default_factory=list)
    explanations: dict[str, dict] = field(default_factory=dict)  # target -> chosen, alternatives, reason
    optimizer: str = "adamw"  # whose state the memory counts (cost_models/memory.py)
    pipeline: dict | None = None  # with a "pp" axis: stages, schedule, microbatches (solvers/inter_op.py)
    fusion: dict | None = None  # backend and the fused kernels of the per-rank program (codegen/fusion.py)
    # {"grads": {FQN: {"method", ...}}, "pipeline": method or None, ...} (solvers/compression.py)
    compression: dict | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
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
        except (TypeError, ValueError) as e:  # e.g. bytes that are not UTF-8
            raise PlanError(f"plan is not valid JSON: {e}", "$") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        validate(data)
        return cls(**{**data, "schema_version": SCHEMA_VERSION})

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
        """sha256 hex digest of the canonical JSON, leaving out wall-clock measurements.

        Two ranks that made the same decisions have the same hash even though their solvers
        took different times.
        """
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


# ---- validation --------------------------------------------------------------------------------


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


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number" if isinstance(v, (int, float)) else type(v).__name__
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _expect(ok: bool, path: str, what: str, v: Any) -> None:
    if not ok:
        try:
            shown = json.dumps(v, ensure_ascii=False)
        except (TypeError, ValueError):
            shown = repr(v)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        raise PlanError(f"{_last(path)} must be {what}, got {_type_name(v)} {shown}", path)


def _last(path: str) -> str:
    """The last component of a JSON path, for messages: ``$.nodes[3].shape`` -> ``shape``."""
    m = re.search(r'(?:\.([A-Za-z_][A-Za-z0-9_]*)|\[("(?:[^"\\]|\\.)*"|\d+)\])$', path)
    if m is None:
        return "the plan"
    return m.group(1) or (json.loads(m.group(2)) if m.group(2).startswith('"') else f"item {m.group(2)}")


def _check_dict(v: Any, path: str, value_ok: Callable[[Any], bool], value_what: str, *, bracket: bool = False) -> None:
    _expect(isinstance(v, dict), path, "an object", v)
    for k, x in v.items():
        _expect(value_ok(x), _key(path, k, bracket=bracket), value_what, x)


def _check_placements(v: Any, path: str, mesh: dict[str, int]) -> None:
    """A placements dict: {axis: "R" | "S(d)" | "P(op)"} with every axis in the mesh."""
    _expect(isinstance(v, dict), path, "an object of mesh axis to placement", v)
    for axis, text in v.items():
        p = _key(path, axis)
        if axis not in mesh:
            raise PlanError(f"mesh axis {axis!r} is not in the plan's mesh {list(mesh)}", p)
        _expect(isinstance(text, str), p, "a placement string", text)
        try:
            _placements.parse(text)
        except ValueError as e:
            raise PlanError(str(e), p) from None


def _check_placements_or_list(v: Any, path: str, mesh: dict[str, int]) -> None:
    if v is None:  # a node without a tensor value (e.g. the graph output)
        return
    if isinstance(v, list):  # multi-output node: one placements dict per output (None for non-tensors)
        for i, x in enumerate(v):
            if x is not None:
                _check_placements(x, f"{path}[{i}]", mesh)
    else:
        _check_placements(v, path, mesh)


def _check_shape(v: Any, path: str) -> None:
    if v is None:
        return
    _expect(isinstance(v, list), path, "an array of ints (or of shapes, for a multi-output node) or null", v)
    for i, x in enumerate(v):
        if isinstance(x, list) or x is None:
            _check_shape(x, f"{path}[{i}]")
        else:
            _expect(_is_int(x), f"{path}[{i}]", "an int", x)


def _require(d: dict, key: str, path: str) -> Any:
    if key not in d:
        raise PlanError(f"required field {key!r} is missing", _key(path, key))
    return d[key]


def _check_node(n: Any, path: str, mesh: dict[str, int]) -> None:
    _expect(isinstance(n, dict), path, "an object", n)
    for key in ("name", "op"):
        _expect(_is_str(_require(n, key, path)), _key(path, key), "a string", n[key])
    _check_placements_or_list(_require(n, "placements", path), _key(path, "placements"), mesh)
    if "shape" in n:
        _check_shape(n["shape"], _key(path, "shape"))
    if "dtype" in n:
        d = n["dtype"]
        ok = d is None or _is_str(d) or (isinstance(d, list) and all(x is None or _is_str(x) for x in d))
        _expect(ok, _key(path, "dtype"), "a string, an array of strings or null", d)
    if "compute_s" in n:
        _expect(_is_num(n["compute_s"]), _key(path, "compute_s"), "a number", n["compute_s"])


def _check_collective(c: Any, path: str, mesh: dict[str, int]) -> None:
    _expect(isinstance(c, dict), path, "an object", c)
    _expect(_is_str(_require(c, "op", path)), _key(path, "op"), "a string", c["op"])
    axis = _require(c, "axis", path)
    _expect(_is_str(axis), _key(path, "axis"), "a string", axis)
    if axis not in mesh:
        raise PlanError(f"mesh axis {axis!r} is not in the plan's mesh {list(mesh)}", _key(path, "axis"))
    for key in ("bytes", "time_s"):
        _expect(_is_num(_require(c, key, path)), _key(path, key), "a number", c[key])
    for key in ("phase", "tensor", "node"):
        if key in c:
            _expect(_is_str(c[key]) or c[key] is None, _key(path, key), "a string", c[key])
    for key in ("src", "dst"):
        if key in c and c[key] is not None:
            _check_placements(c[key], _key(path, key), mesh)


def _check_explanation(e: Any, path: str) -> None:
    _expect(isinstance(e, dict), path, "an object", e)
    for key in ("chosen", "reason"):
        if key in e:
            _expect(_is_str(e[key]), _key(path, key), "a string", e[key])
    if "alternatives" in e:
        alts = e["alternatives"]
        _expect(isinstance(alts, list), _key(path, "alternatives"), "an array", alts)
        for i, a in enumerate(alts):
            ap = f"{_key(path, 'alternatives')}[{i}]"
            _expect(isinstance(a, dict), ap, "an object", a)
            if "cost_s" in a:
                _expect(_is_num(a["cost_s"]) or a["cost_s"] is None, _key(ap, "cost_s"), "a number", a["cost_s"])


def validate(data: Any) -> None:
    """Check a decoded plan document; raise PlanError at the JSON path of the first fault."""
    _expect(isinstance(data, dict), "$", "a JSON object", data)
    version = data.get("schema_version", "missing")
    if not _is_int(version) or version not in READABLE_VERSIONS:
        raise PlanError(f"plan schema version {version}; this autopar reads versions {READABLE_VERSIONS[0]} to "
                        f"{SCHEMA_VERSION}", "$.schema_version")

    known = {f.name for f in fields(Plan)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PlanError(f"plan has unknown field(s) {unknown}; known fields are {sorted(known)}", _key("$", unknown[0]))
    optional = {"warnings", "explanations", "schema_version", "optimizer", "pipeline", "fusion", "compression"}
    for name in sorted(known - optional):
        _require(data, name, "$")

    mesh = data["mesh"]
    _check_dict(mesh, "$.mesh", lambda n: _is_int(n) and n >= 1, "a positive int")
    for key in ("hardware", "graph_hash", "model"):
        _expect(_is_str(data[key]), f"$.{key}", "a string", data[key])
    _expect(data["mode"] in MODES, "$.mode", f"one of {list(MODES)}", data["mode"])
    opt = data.get("optimizer", "adamw")
    _expect(opt in tuple(OPTIMIZERS), "$.optimizer", f"one of {list(OPTIMIZERS)}", opt)
    _expect(_is_num(data["step_time_s"]), "$.step_time_s", "a number", data["step_time_s"])
    _expect(_is_int(data["peak_memory_bytes"]), "$.peak_memory_bytes", "an int", data["peak_memory_bytes"])
    _check_dict(data["memory"], "$.memory", _is_int, "an int (bytes)")
    _check_dict(data["time_breakdown"], "$.time_breakdown", _is_num, "a number (seconds)")

    if set(mesh) == {"pp"}:  # the stages of a pp-only mesh are laid out on a one-device "tp" axis
        mesh = {**mesh, "tp": 1}
    pp = data["param_placements"]
    _expect(isinstance(pp, dict), "$.param_placements", "an object of FQN to placements", pp)
    for fqn, pl in pp.items():
        _check_placements(pl, _key("$.param_placements", fqn, bracket=True), mesh)

    ip = data["input_placements"]
    _expect(isinstance(ip, list), "$.input_placements", "an array", ip)
    for i, pl in enumerate(ip):
        if pl is not None:  # non-tensor inputs have no placement
            _check_placements(pl, f"$.input_placements[{i}]", mesh)

    nodes = data["nodes"]
    _expect(isinstance(nodes, list), "$.nodes", "an array", nodes)
    for i, n in enumerate(nodes):
        _check_node(n, f"$.nodes[{i}]", mesh)

    cols = data["collectives"]
    _expect(isinstance(cols, list), "$.collectives", "an array", cols)
    for i, c in enumerate(cols):
        _check_collective(c, f"$.collectives[{i}]", mesh)

    pipe = data.get("pipeline")
    if pipe is not None:
        _expect(isinstance(pipe, dict), "$.pipeline", "an object", pipe)
        for key in ("bounds", "stage_times_s", "stage_memory_bytes", "layers"):
            _require(pipe, key, "$.pipeline")
            _expect(isinstance(pipe[key], list), _key("$.pipeline", key), "an array", pipe[key])
        v = pipe.get("virtual_stages", 1)
        _expect(isinstance(v, int) and not isinstance(v, bool) and v >= 1, "$.pipeline.virtual_stages",
                "a positive integer", v)
        _expect(len(pipe["bounds"]) == mesh.get("pp", 0) * v, "$.pipeline.bounds",
                f"one [start, end) per stage: pp x virtual_stages = {mesh.get('pp')} x {v}", pipe["bounds"])
        _expect(pipe.get("schedule", "1f1b") in ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1"), "$.pipeline.schedule",
                "one of gpipe, 1f1b, interleaved-1f1b, zb-h1", pipe.get("schedule"))
        _expect(isinstance(pipe.get("microbatches", 1), int) and pipe.get("microbatches", 1) >= 1,
                "$.pipeline.microbatches", "a positive integer", pipe.get("microbatches"))
    for key in ("fusion", "compression"):
        _expect(data.get(key) is None or isinstance(data[key], dict), f"$.{key}", "an object or null", data.get(key))
    comp = data.get("compression") or {}
    grads = comp.get("grads", {})
    _expect(isinstance(grads, dict), "$.compression.grads", "an object of FQN to choice", grads)
    for fqn, choice in grads.items():
        where = _key("$.compression.grads", fqn, bracket=True)
        _expect(isinstance(choice, dict) and _is_str(choice.get("method")), where, 'an object with a "method" string',
                choice)
    solver = data["solver"]
    _expect(isinstance(solver, dict), "$.solver", "an object", solver)
    for key in ("name", "status"):
        if key in solver:
            _expect(_is_str(solver[key]), _key("$.solver", key), "a string", solver[key])

    warnings = data.get("warnings", [])
    _expect(isinstance(warnings, list), "$.warnings", "an array", warnings)
    for i, w in enumerate(warnings):
        _expect(_is_str(w), f"$.warnings[{i}]", "a string", w)

    expl = data.get("explanations", {})
    _expect(isinstance(expl, dict), "$.explanations", "an object", expl)
    for target, e in expl.items():
        _check_explanation(e, _key("$.explanations", target, bracket=True))
