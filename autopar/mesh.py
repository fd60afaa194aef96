"""The abstract device mesh: axis names and sizes, plus the hardware they run on.

Planning needs only names, sizes and links; a process group is made only when a plan is run
(``Mesh.device_mesh()``), as in JAX's AbstractMesh / Mesh split.
"""

from __future__ import annotations

import math
import os
import re
from enum import Enum

from .errors import MeshError


class Axis(str, Enum):
    """Mesh axis names, outer to inner. ``tp`` is innermost so that it stays on the fastest link."""

    PP = "pp"
    DP = "dp"
    EP = "ep"
    CP = "cp"
    TP = "tp"


AXIS_ORDER = tuple(a.value for a in Axis)


class Mesh:
    """``Mesh({"dp": 2, "tp": 4}, hardware="h100-sxm")``.

    Axes are kept in canonical order (pp, dp, ep, cp, tp: outer to inner) whatever order the dict
    gives, so that the same request always means the same rank layout.
    """

    def __init__(self, axes: dict[str, int], *, hardware: str = "local"):
        if not isinstance(axes, dict) or not axes:
            raise MeshError(f"a mesh needs a non-empty dict of axis name to size, got {axes!r}")
        bad_names = [a for a in axes if a not in AXIS_ORDER]
        if bad_names:
            raise MeshError(f"unknown mesh axis name(s) {bad_names}; valid names are {list(AXIS_ORDER)}")
        bad_sizes = {a: n for a, n in axes.items() if not isinstance(n, int) or isinstance(n, bool) or n < 1}
        if bad_sizes:
            raise MeshError(f"mesh axis sizes must be positive integers, got {bad_sizes}")
        self.axes: dict[str, int] = {a: axes[a] for a in AXIS_ORDER if a in axes}
        self.given_order = tuple(axes)
        if not isinstance(hardware, (str, os.PathLike)):
            raise MeshError(f"hardware must be a preset name or a .json/.toml preset path, got {hardware!r}")
        from .cost_models.hardware import load_hardware  # validates the preset name

        self.hardware_spec = load_hardware(hardware)
        self.hardware = hardware

    @property
    def reordered(self) -> bool:
        """True if the axes were given in another order than autopar lays them out."""
        return self.given_order != self.names

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.axes.values())

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return f"Mesh({self.axes}, hardware={self.hardware!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Mesh) and self.axes == other.axes and self.hardware == other.hardware

    def __hash__(self) -> int:
        return hash((tuple(self.axes.items()), self.hardware))

    @classmethod
    def parse(cls, text: str, *, hardware: str = "local") -> "Mesh":
        """Parse the CLI form ``dp=2,tp=4``: axis=size pairs, each axis once, sizes in decimal digits."""
        if not isinstance(text, str):
            raise MeshError(f"a mesh is text like dp=2,tp=4, got {type(text).__name__} {text!r}")
        axes: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, size = (s.strip() for s in part.partition("="))
            if not sep or not re.fullmatch(r"[0-9]{1,12}", size):
                raise MeshError(f"bad mesh {text!r} at {part!r}: expected comma-separated axis=size pairs, like dp=2,tp=4")
            if name in axes:
                raise MeshError(f"bad mesh {text!r}: axis {name!r} is given twice")
            axes[name] = int(size)
        return cls(axes, hardware=hardware)

    def device_mesh(self):
        """Bind to the running default process group; the mesh size must equal the world size.
        Every group of the mesh, and the default one, waits ``collective_timeout()`` in a collective."""
        import torch
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_available() or not dist.is_initialized():
            raise MeshError(
                "no process group is running, and autopar.compile runs the model on one: launch the script with "
                "`autopar run script.py --nproc N` (or torchrun) and call torch.distributed.init_process_group() "
                "before compiling, or use autopar.plan(...) to plan without executing"
            )
        world = dist.get_world_size()
        if world != self.size:
            raise MeshError(
                f"mesh {self.axes} has {self.size} devices but the process group has world size {world}; "
                f"make the product of the axis sizes equal {world}"
            )
        device_type = "cuda" if dist.get_backend() == "nccl" and torch.cuda.is_available() else "cpu"
        shape, names = self.shape, self.names
        if names == ("pp",):  # each stage still runs its program on a (one-device) DeviceMesh
            shape, names = (*shape, 1), ("pp", "tp")
        device_mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
        timeout = collective_timeout()
        for group in {dist.group.WORLD, *device_mesh.get_all_groups()}:  # torch gives new groups its 30 min default
            try:
                dist.distributed_c10d._set_pg_timeout(timeout, group)  # private: skipped where it is missing
            except (AttributeError, ValueError, RuntimeError):
                pass
        return device_mesh


def collective_timeout():
    """How long a collective waits for the other ranks before it fails (a ``timedelta``):
    ``$AUTOPAR_TIMEOUT`` seconds (``autopar run --timeout``, default 300), else the default process
    group's own (``init_process_group(timeout=...)``; torch's default is 30 minutes)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    text = os.environ.get("AUTOPAR_TIMEOUT")
    if text:
        try:
            seconds = float(text)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:
            raise MeshError(f"AUTOPAR_TIMEOUT must be a positive number of seconds, got {text!r}")
        return timedelta(seconds=seconds)
    pg = dist.group.WORLD
    try:
        return pg._get_backend(torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")).options._timeout
    except (AttributeError, RuntimeError):
        return dist.default_pg_timeout
