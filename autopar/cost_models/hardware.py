"""Hardware presets: peak compute, memory and the two link levels of a cluster.

Presets are data, not code: ``autopar/cost_models/presets/<name>.json``, one per machine type, each
with ``"schema": 1`` and a ``"notes"`` string that says where its numbers come from. A user can pass
the path of their own ``.json`` file with the same fields instead of a preset name. An optional
``"collectives"`` object (written by ``autopar profile --collectives``) holds one fitted link per
collective; :meth:`Hardware.link_for` returns it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from autopar.errors import MeshError

PRESET_DIR = Path(__file__).resolve().parent / "presets"
SCHEMA = 1

# Spellings of a dtype that name the same peak-FLOP/s entry.
_DTYPE_ALIASES = {
    "float": "float32", "fp32": "float32", "f32": "float32", "tf32": "float32",
    "bf16": "bfloat16",
    "half": "float16", "fp16": "float16", "f16": "float16",
}


@dataclass(frozen=True)
class Link:
    """One link level, per device: ``bandwidth_Bps`` one direction, ``latency_s`` per message (α)."""

    bandwidth_Bps: float
    latency_s: float


@dataclass(frozen=True)
class Hardware:
    """One device type and how devices are wired: ``devices_per_node`` on ``intra_node``, the rest
    on ``inter_node`` (each device's own NIC share)."""

    name: str
    description: str
    peak_flops: dict  # dtype name -> dense FLOP/s; always has "float32"
    memory_bandwidth_Bps: float
    memory_capacity_bytes: float
    devices_per_node: int
    intra_node: Link
    inter_node: Link
    # The collective backend has no all-to-all (gloo): DTensor gathers instead, at n times the bytes.
    all_to_all_as_all_gather: bool = False
    # Optional per-collective links fitted by ``autopar profile --collectives`` (op name -> Link);
    # see :meth:`link_for`. Not part of the hash (equal Hardware still hash equal).
    collective_links: dict = field(default_factory=dict)

    def __hash__(self) -> int:  # peak_flops is a dict, so hash its items
        return hash((self.name, tuple(sorted(self.peak_flops.items())), self.memory_bandwidth_Bps,
                     self.memory_capacity_bytes, self.devices_per_node, self.intra_node, self.inter_node))

    def peak(self, dtype: str) -> float:
        """Dense FLOP/s for ``dtype`` ("torch.bfloat16", "bfloat16", "bf16", ...); unknown -> float32."""
        key = str(dtype).removeprefix("torch.").lower()
        key = _DTYPE_ALIASES.get(key, key)
        return self.peak_flops.get(key, self.peak_flops["float32"])

    def link_for(self, op: str, default: Link) -> Link:
        """The link fitted for collective ``op`` (preset key ``"collectives"``) if any, else ``default``."""
        return self.collective_links.get(op, default)


def list_presets() -> list[str]:
    """Sorted names of the bundled presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


@lru_cache(maxsize=None)
def load_hardware(name_or_path: str) -> Hardware:
    """Load a preset by name (``"h100-sxm"``) or from a ``.json`` file path; raise MeshError if bad."""
    text = str(name_or_path)
    if text in list_presets():
        path = PRESET_DIR / f"{text}.json"
    elif text.endswith(".json") or "/" in text or "\\" in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise MeshError(f"hardware preset file {str(path)!r} does not exist")
    else:
        raise MeshError(f"unknown hardware preset {text!r}; valid presets: {', '.join(list_presets())} "
                        "(or pass a path to a .json preset file)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MeshError(f"cannot read hardware preset file {str(path)!r}: {e}") from None
    return _from_dict(data, str(path))


def _from_dict(data: object, source: str) -> Hardware:
    """Check every field of a preset document and build the Hardware; errors name file and field."""

    def bad(field: str, why: str) -> MeshError:
        return MeshError(f"hardware preset file {source!r}: field {field!r} {why}")

    def number(obj: dict, field: str, prefix: str = "", zero_ok: bool = False) -> float:
        if field not in obj:
            raise bad(prefix + field, "is missing")
        value = obj[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not zero_ok):
            raise bad(prefix + field, f"must be a {'non-negative' if zero_ok else 'positive'} number, got {value!r}")
        return float(value)

    def link(field: str) -> Link:
        if not isinstance(data.get(field), dict):
            raise bad(field, "is missing or not an object with bandwidth_Bps and latency_s")
        obj = data[field]
        return Link(number(obj, "bandwidth_Bps", f"{field}."), number(obj, "latency_s", f"{field}.", zero_ok=True))

    if not isinstance(data, dict):
        raise MeshError(f"hardware preset file {source!r}: expected a JSON object")
    if data.get("schema") != SCHEMA:
        raise bad("schema", f"must be {SCHEMA}, got {data.get('schema')!r}")
    if not isinstance(data.get("peak_flops"), dict):
        raise bad("peak_flops", "is missing or not an object of dtype -> FLOP/s")
    peak = {str(k): number(data["peak_flops"], k, "peak_flops.") for k in data["peak_flops"]}
    if "float32" not in peak:
        raise bad("peak_flops.float32", "is missing (it is the fallback for other dtypes)")
    devices = data.get("devices_per_node")
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise bad("devices_per_node", f"must be a positive integer, got {devices!r}")
    return Hardware(
        name=str(data.get("name", Path(source).stem)),
        description=str(data.get("description", "")),
        peak_flops=peak,
        memory_bandwidth_Bps=number(data, "memory_bandwidth_Bps"),
        memory_capacity_bytes=number(data, "memory_capacity_bytes"),
        devices_per_node=devices,
        intra_node=link("intra_node"),
        inter_node=link("inter_node"),
        all_to_all_as_all_gather=_flag(data, "all_to_all_as_all_gather", bad),
        collective_links=_collectives(data, bad, number),
    )


def _collectives(data: dict, bad, number) -> dict[str, Link]:
    """The optional ``"collectives": {op: {"bandwidth_Bps", "latency_s", ["max_rel_error"]}}`` block."""
    from autopar.cost_models.comm import COLLECTIVE_OPS  # comm imports this module

    block = data.get("collectives", {})
    if not isinstance(block, dict):
        raise bad("collectives", "must be an object of collective name -> {bandwidth_Bps, latency_s}")
    out = {}
    for op, obj in block.items():
        if op not in COLLECTIVE_OPS:
            raise bad(f"collectives.{op}", f"is not a collective; expected one of {', '.join(sorted(COLLECTIVE_OPS))}")
        if not isinstance(obj, dict):
            raise bad(f"collectives.{op}", "is not an object with bandwidth_Bps and latency_s")
        prefix = f"collectives.{op}."
        out[op] = Link(number(obj, "bandwidth_Bps", prefix), number(obj, "latency_s", prefix, zero_ok=True))
        if "max_rel_error" in obj:
            number(obj, "max_rel_error", prefix, zero_ok=True)
    return out


def _flag(data: dict, field: str, bad) -> bool:
    value = data.get(field, False)
    if not isinstance(value, bool):
        raise bad(field, f"must be true or false, got {value!r}")
    return value
