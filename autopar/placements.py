"""Placement grammar shared by every stage: ``R | S(d) | P(op)``.

A placement says how one tensor lives along one mesh axis:

* ``R``       replicated: every rank on the axis holds the whole tensor;
* ``S(d)``    sharded: tensor dim ``d`` is split evenly across the axis;
* ``P(op)``   partial: each rank holds a partial value, reduced with ``op`` (always spelled out).

Plans hold placements as these strings, keyed by mesh axis name. Conversion to DTensor placement
objects lives in ``autopar.codegen.dtensor`` so that planning code never needs torch.distributed.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_RE = re.compile(r"^(R|S\((-?\d+)\)|P\((sum|avg|max|min)\))$")


class Placement(NamedTuple):
    kind: str  # "R", "S" or "P"
    dim: int | None = None  # for S
    op: str | None = None  # for P

    def __str__(self) -> str:
        if self.kind == "S":
            return f"S({self.dim})"
        if self.kind == "P":
            return f"P({self.op})"
        return "R"

    @property
    def is_shard(self) -> bool:
        return self.kind == "S"

    @property
    def is_partial(self) -> bool:
        return self.kind == "P"

    @property
    def is_replicate(self) -> bool:
        return self.kind == "R"


REPLICATE = Placement("R")


def shard(dim: int) -> Placement:
    return Placement("S", dim=dim)


def partial(op: str = "sum") -> Placement:
    return Placement("P", op=op)


def parse(text: str) -> Placement:
    """Parse ``"R"``, ``"S(1)"`` or ``"P(sum)"``; raise ValueError naming the bad text."""
    m = _RE.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"bad placement {text!r}: expected 'R', 'S(<dim>)' or 'P(sum|avg|max|min)'")
    if m.group(2) is not None:
        return shard(int(m.group(2)))
    if m.group(3) is not None:
        return partial(m.group(3))
    return REPLICATE


def local_shape(shape: tuple[int, ...], placements: tuple[Placement, ...], axis_sizes: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one rank's shard when ``shape`` is placed with ``placements`` on axes of ``axis_sizes``.

    Uneven splits round up (the largest shard), which is what a memory bound needs.
    """
    out = list(shape)
    for p, n in zip(placements, axis_sizes):
        if p.kind == "S":
            out[p.dim] = -(-out[p.dim] // n)
    return tuple(out)
