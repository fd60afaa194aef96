"""Hardware presets: peak compute, memory and the two link levels of a cluster.

Presets are data, not code: ``autopar/cost_models/presets/<name>.json`` (or ``.toml``, Python
3.11+; same fields), one per machine type. A user can pass the path of their own ``.json`` or
``.toml`` file instead of a preset name. Fields (bandwidths in bytes/s one direction per device,
latencies in seconds per message; every error names the file and the field):

* ``schema`` (1), ``name``, ``description``, ``notes`` (where the numbers come from);
* ``peak_flops``: dtype -> dense FLOP/s, ``float32`` required (the fallback for other dtypes);
* ``memory_bandwidth_Bps``, ``memory_capacity_bytes``, ``devices_per_node`` (ranks fill nodes in order);
* ``intra_node``, ``inter_node``: ``{"bandwidth_Bps", "latency_s"}``, the inter-node one per device NIC;
* ``inter_node_overrides`` (optional): ``[{"nodes": [2, 3], "bandwidth_Bps", "latency_s"}]``, nodes
  (numbered from 0) with other NICs; a ring runs at its slowest link, so an axis that crosses nodes
  is priced at the slowest NIC among the nodes the mesh spans (:meth:`Hardware.inter_link`);
* ``all_to_all_as_all_gather`` (optional bool): the backend has no all-to-all (gloo);
* ``collectives`` (optional, written by ``autopar profile --collectives``): collective -> one link
  ``{"bandwidth_Bps", "latency_s", "max_rel_error"}``, or size regimes ``{"segments": [{"max_bytes",
  "bandwidth_Bps", "latency_s"}, ..., {"bandwidth_Bps", "latency_s"}], "max_rel_error"}`` with
  increasing ``max_bytes`` (the last segment takes every larger message); :meth:`Hardware.link_for`;
* ``comm_compute_overlap`` (optional, ω in [0, 1], default 1): the fraction of a collective's time that
  overlaps compute without slowing it (NCCL ~1; gloo on the backward's CPU cores less): solvers/comm_schedule.py.
"""

from __future__ import annotations

import json
import math
import sys
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
class SegmentedLink:
    """A link whose α and bw depend on the message size (gloo switches algorithms by size):
    ``segments`` is ``((max_bytes, Link), ...)`` by increasing ``max_bytes``, the last ``inf``."""

    segments: tuple

    def at(self, nbytes: float) -> Link:
        """The link of the first segment whose ``max_bytes`` >= ``nbytes``."""
        return next(link for max_bytes, link in self.segments if nbytes <= max_bytes)


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
    # Optional per-collective links fitted by ``autopar profile --collectives`` (op -> Link or SegmentedLink);
    # see :meth:`link_for`. Not part of the hash (equal Hardware still hash equal).
    collective_links: dict = field(default_factory=dict)
    # ((node ids, Link), ...): nodes whose NICs differ from inter_node; see :meth:`inter_link`.
    inter_node_overrides: tuple = ()
    comm_compute_overlap: float = 1.0  # ω (module docstring)

    def __hash__(self) -> int:  # peak_flops is a dict, so hash its items
        return hash((self.name, tuple(sorted(self.peak_flops.items())), self.memory_bandwidth_Bps,
                     self.memory_capacity_bytes, self.devices_per_node, self.intra_node, self.inter_node,
                     self.inter_node_overrides))

    def peak(self, dtype: str) -> float:
        """Dense FLOP/s for ``dtype`` ("torch.bfloat16", "bfloat16", "bf16", ...); unknown -> float32."""
        key = str(dtype).removeprefix("torch.").lower()
        key = _DTYPE_ALIASES.get(key, key)
        return self.peak_flops.get(key, self.peak_flops["float32"])

    def link_for(self, op: str, default: Link) -> Link | SegmentedLink:
        """The link fitted for collective ``op`` (preset key ``"collectives"``) if any, else ``default``."""
        return self.collective_links.get(op, default)

    def inter_link(self, nodes) -> Link:
        """The inter-node link of a ring through ``nodes``: the lowest bandwidth and highest latency
        among their NICs (``inter_node`` unless ``inter_node_overrides`` names the node)."""
        nics = {node: self.inter_node for node in nodes}
        for ids, link in self.inter_node_overrides:
            nics.update((node, link) for node in ids if node in nics)
        return Link(min(x.bandwidth_Bps for x in nics.values()), max(x.latency_s for x in nics.values()))


def list_presets() -> list[str]:
    """Sorted names of the bundled presets."""
    return sorted(p.stem for p in PRESET_DIR.iterdir() if p.suffix in (".json", ".toml"))


@lru_cache(maxsize=None)
def load_hardware(name_or_path: str) -> Hardware:
    """Load a preset by name (``"h100-sxm"``) or from a ``.json``/``.toml`` path; raise MeshError if bad."""
    text = str(name_or_path)
    if text in list_presets():
        path = next(p for p in (PRESET_DIR / f"{text}.json", PRESET_DIR / f"{text}.toml") if p.is_file())
    elif text.endswith((".json", ".toml")) or "/" in text or "\\" in text:
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # ~user with no such user
            path = Path(text)
        if not path.is_file():
            raise MeshError(f"hardware preset file {str(path)!r} does not exist")
    else:
        raise MeshError(f"unknown hardware preset {text!r}; valid presets: {', '.join(list_presets())} "
                        "(or pass a path to a .json or .toml preset file)")
    try:
        raw = path.read_text()
        data = __import__("tomllib").loads(raw) if path.suffix == ".toml" else json.loads(raw)
    except ImportError:  # Python 3.10
        raise MeshError(f"hardware preset file {str(path)!r}: TOML presets need Python 3.11+ (tomllib)") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # JSON and TOML errors are ValueErrors
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
        real = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max
        if not real or value < 0 or (value == 0 and not zero_ok):
            raise bad(prefix + field, f"must be a {'non-negative' if zero_ok else 'positive'} number, got {value!r}")
        return float(value)

    def link(field: str) -> Link:
        if not isinstance(data.get(field), dict):
            raise bad(field, "is missing or not an object with bandwidth_Bps and latency_s")
        return _link(data[field], field, number)

    if not isinstance(data, dict):
        raise MeshError(f"hardware preset file {source!r}: expected a JSON object or TOML table")
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
    omega = data.get("comm_compute_overlap", 1.0)
    if isinstance(omega, bool) or not isinstance(omega, (int, float)) or not 0 <= omega <= 1:
        raise bad("comm_compute_overlap", f"must be a number in [0, 1] (the fraction of a collective's time "
                  f"that overlaps compute without slowing it), got {omega!r}")
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
        inter_node_overrides=_overrides(data, bad, number),
        comm_compute_overlap=float(omega),
    )


def _collectives(data: dict, bad, number) -> dict:
    """The optional ``"collectives"`` block: op -> one link, or ``{"segments": [...]}`` (module docstring)."""
    from autopar.cost_models.comm import COLLECTIVE_OPS  # comm imports this module

    block = data.get("collectives", {})
    if not isinstance(block, dict):
        raise bad("collectives", "must be an object of collective name -> {bandwidth_Bps, latency_s}")
    out = {}
    for op, obj in block.items():
        where = f"collectives.{op}"
        if op not in COLLECTIVE_OPS:
            raise bad(where, f"is not a collective; expected one of {', '.join(sorted(COLLECTIVE_OPS))}")
        if not isinstance(obj, dict):
            raise bad(where, "is not an object with bandwidth_Bps and latency_s (or segments)")
        if "max_rel_error" in obj:
            number(obj, "max_rel_error", where + ".", zero_ok=True)
        if "segments" not in obj:
            out[op] = _link(obj, where, number)
            continue
        segs = obj["segments"]
        if not isinstance(segs, list) or not segs or not all(isinstance(x, dict) for x in segs):
            raise bad(where + ".segments", "must be a non-empty list of {max_bytes, bandwidth_Bps, latency_s}")
        bounds = [number(x, "max_bytes", f"{where}.segments[{i}].") for i, x in enumerate(segs[:-1])] + [math.inf]
        if bounds != sorted(set(bounds)):
            raise bad(where + ".segments", f"must have increasing max_bytes, got {bounds[:-1]}")
        out[op] = SegmentedLink(tuple((b, _link(x, f"{where}.segments[{i}]", number))
                                      for i, (b, x) in enumerate(zip(bounds, segs))))
    return out


def _link(obj: dict, where: str, number) -> Link:
    return Link(number(obj, "bandwidth_Bps", where + "."), number(obj, "latency_s", where + ".", zero_ok=True))


def _overrides(data: dict, bad, number) -> tuple:
    """The optional ``"inter_node_overrides": [{"nodes": [...], "bandwidth_Bps", "latency_s"}]``."""
    items, out, seen = data.get("inter_node_overrides", []), [], set()
    if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
        raise bad("inter_node_overrides", "must be a list of {nodes, bandwidth_Bps, latency_s}")
    for i, obj in enumerate(items):
        nodes = obj.get("nodes")
        if not isinstance(nodes, list) or not nodes or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in nodes):
            raise bad(f"inter_node_overrides[{i}].nodes", f"must be a non-empty list of node numbers >= 0, got {nodes!r}")
        if seen & set(nodes):
            raise bad(f"inter_node_overrides[{i}].nodes", f"repeats node(s) {sorted(seen & set(nodes))}")
        seen |= set(nodes)
        out.append((tuple(nodes), _link(obj, f"inter_node_overrides[{i}]", number)))
    return tuple(out)


def _flag(data: dict, field: str, bad) -> bool:
    value = data.get(field, False)
    if not isinstance(value, bool):
        raise bad(field, f"must be true or false, got {value!r}")
    return value
