"""Communication cost: α-β ring collectives per mesh axis, and the pure redistribution planner.

Ring model (nccl-tests PERFORMANCE.md), n ranks, S bytes, link latency α and bandwidth bw:

=================  ======================================  ==========================
op                 time                                    S is
=================  ======================================  ==========================
all_reduce         2(n−1)α + 2((n−1)/n)·S/bw               the buffer
all_gather         (n−1)α + ((n−1)/n)·S/bw                 the gathered output
reduce_scatter     (n−1)α + ((n−1)/n)·S/bw                 the unscattered input
all_to_all         (n−1)α + ((n−1)/n)·S/bw                 one rank's buffer
send_recv          α + S/bw                                the message
=================  ======================================  ==========================

The factors 2(n−1)/n and (n−1)/n are nccl-tests' "bus bandwidth" factors.

Hierarchical (an axis whose n ranks sit g per node on N = n/g nodes): the collective runs inside
each node on the intra-node link, and across nodes on the inter-node link with each of the g
devices' NICs carrying 1/g of the bytes. For all-reduce (reduce-scatter in the node, all-reduce
across nodes, all-gather in the node)::

    2(g−1)α_intra + 2((g−1)/g)·S/bw_intra + 2(N−1)α_inter + 2((N−1)/N)·(S/g)/bw_inter

and the one-pass collectives (all-gather, reduce-scatter) take half of each term. An all-to-all
sends (g−1)/n of a rank's buffer inside the node and (n−g)/n across, over its own NIC.

A calibrated preset may give a collective a :class:`SegmentedLink` (α and bw per size regime):
the link of the regime that holds the message's bytes, counted as in the table, prices it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from autopar.cost_models.hardware import Hardware, Link, SegmentedLink
from autopar.placements import REPLICATE, Placement, local_shape, parse

# op -> (latency steps per (n−1), bandwidth factor per (n−1)/n); send_recv is special-cased.
_RING = {"all_reduce": (2, 2), "all_gather": (1, 1), "reduce_scatter": (1, 1), "all_to_all": (1, 1)}
COLLECTIVE_OPS = frozenset(_RING) | {"send_recv"}


@dataclass(frozen=True)
class HierarchicalLink:
    """A mesh axis that spans nodes: ``per_node`` of its ranks share a node (``intra``), and the
    node groups talk over ``inter`` (each device's own NIC)."""

    intra: Link
    inter: Link
    per_node: int


def axis_links(axes: dict[str, int], hw: Hardware) -> dict[str, Link | HierarchicalLink]:
    """Which link each mesh axis (ordered outer -> inner, ranks laid out row-major) runs on.

    Axis a of size n with stride s (the product of the sizes of the axes inner to it) groups ranks
    r, r+s, ..., r+(n−1)s. With D devices per node: if n·s <= D the group is inside a node
    (``hw.intra_node``); if s >= D every member is on another node (``hw.inter_node``); otherwise
    g = D / s members share each node and the axis is hierarchical. The groups of an axis run at
    once, so one through a node with a slower NIC (``inter_node_overrides``) sets the axis's time:
    the inter-node link is :meth:`Hardware.inter_link` over the nodes the mesh spans.
    """
    links, stride, d = {}, 1, hw.devices_per_node
    inter = hw.inter_link(range(-(-math.prod(axes.values()) // d)))
    for name in reversed(list(axes)):
        n = axes[name]
        if n * stride <= d:
            links[name] = hw.intra_node
        elif stride >= d:
            links[name] = inter
        else:
            g = max(1, d // stride)
            links[name] = HierarchicalLink(hw.intra_node, inter, g) if n % g == 0 and g > 1 else inter
        stride *= n
    return {name: links[name] for name in axes}


def collective_time(op: str, nbytes: float, n: int, link: Link | HierarchicalLink | SegmentedLink) -> float:
    """Seconds for collective ``op`` of ``nbytes`` among ``n`` ranks on ``link`` (see module table)."""
    if op not in COLLECTIVE_OPS:
        raise ValueError(f"unknown collective {op!r}; expected one of {sorted(COLLECTIVE_OPS)}")
    if n <= 1:
        return 0.0
    if isinstance(link, SegmentedLink):
        link = link.at(nbytes)
    if isinstance(link, HierarchicalLink):
        return _hierarchical_time(op, nbytes, n, link)
    if op == "send_recv":
        return link.latency_s + nbytes / link.bandwidth_Bps
    steps, factor = _RING[op]
    return steps * (n - 1) * link.latency_s + factor * (n - 1) / n * nbytes / link.bandwidth_Bps


def _hierarchical_time(op: str, nbytes: float, n: int, link: HierarchicalLink) -> float:
    g, nodes = link.per_node, n // link.per_node
    if op == "send_recv":
        return collective_time(op, nbytes, 2, link.inter)
    if op == "all_to_all":
        inside = (g - 1) * link.intra.latency_s + (g - 1) / n * nbytes / link.intra.bandwidth_Bps
        across = (nodes - 1) * link.inter.latency_s + (n - g) / n * nbytes / link.inter.bandwidth_Bps
        return inside + across
    steps, factor = _RING[op]
    inside = steps * (g - 1) * link.intra.latency_s + factor * (g - 1) / g * nbytes / link.intra.bandwidth_Bps
    across = steps * (nodes - 1) * link.inter.latency_s + factor * (nodes - 1) / nodes * (nbytes / g) / link.inter.bandwidth_Bps
    return inside + across


@dataclass(frozen=True)
class Collective:
    """One collective on one mesh axis: ``bytes`` as :func:`collective_time` counts them."""

    op: str
    axis: str
    bytes: int
    time_s: float


def redistribute_collectives(src: tuple, dst: tuple, shape: tuple[int, ...], itemsize: int,
                             axes: dict[str, int], links: dict[str, Link]) -> tuple[Collective, ...]:
    """Collectives that move a tensor of global ``shape`` from placements ``src`` to ``dst``.

    ``src``/``dst`` hold one Placement (or its string form) per mesh axis, in ``axes`` order. Axes are
    processed innermost first; on each axis a with src[a] != dst[a], B is the local byte size with
    a itself unsharded and every other axis at its current placement, and

    ==============  ======================  ==============  ======================
    src -> dst      collective              src -> dst      collective
    ==============  ======================  ==============  ======================
    P -> R          all_reduce(B)           R -> S(d)       none (local slice)
    P -> S(d)       reduce_scatter(B)       R -> P          none
    S(d) -> R       all_gather(B)           S(d) -> P       all_gather(B)
    S(d) -> S(e)    all_to_all(B / n)       P(x) -> P(y)    ValueError
    ==============  ======================  ==============  ======================

    Axes of size 1 cost nothing. Pure and cached. This is the default order; the cost model
    prices DTensor's own steps with :func:`price_steps`.
    """
    src, dst = tuple(_placements(src, len(shape))), tuple(_placements(dst, len(shape)))
    if not len(src) == len(dst) == len(axes):
        raise ValueError(f"need one placement per mesh axis {list(axes)}: got src={_fmt(src)}, dst={_fmt(dst)}")
    missing = [a for a in axes if a not in links]
    if missing:
        raise ValueError(f"no link for mesh axes {missing}; links has {list(links)}")
    return _plan(src, dst, tuple(shape), itemsize, tuple(axes.items()), tuple(links[a] for a in axes))


def redistribute_time(src: tuple, dst: tuple, shape: tuple[int, ...], itemsize: int,
                      axes: dict[str, int], links: dict[str, Link]) -> float:
    """Total seconds of :func:`redistribute_collectives` (they run one after another)."""
    return sum(c.time_s for c in redistribute_collectives(src, dst, shape, itemsize, axes, links))


@lru_cache(maxsize=65536)
def _plan(src, dst, shape, itemsize, axes, links) -> tuple[Collective, ...]:
    steps = tuple((a, src[a], dst[a]) for a in reversed(range(len(axes))) if src[a] != dst[a])
    return price_steps(steps, src, shape, itemsize, axes, links)


def price_steps(steps, src, shape, itemsize, axes, links, a2a_as_all_gather: bool = False) -> tuple[Collective, ...]:
    """Price a redistribution given as ordered steps ``(axis index, from, to)``, starting at ``src``.

    On each step's axis a, B is the local byte size with a itself unsharded and every other axis
    at its current placement (updated step by step), and the collective is chosen as in
    :func:`redistribute_collectives`. ``axes`` and ``links`` are tuples in mesh order; a link may
    be a dict of collective -> Link or SegmentedLink (a preset calibrated per collective). With
    ``a2a_as_all_gather`` (gloo has no all-to-all) S(d)->S(e) is an all-gather of B.
    The cost model passes DTensor's own steps, so it prices what actually runs.
    """
    sizes = tuple(n for _, n in axes)
    current = list(src)
    out = []
    for a, s, d in steps:
        name, n = axes[a]
        without_a = tuple(REPLICATE if i == a else p for i, p in enumerate(current))
        current[a] = d
        op = _transition(s, d)
        if op is None or n == 1:
            continue
        nbytes = math.prod(local_shape(shape, without_a, sizes)) * itemsize
        if op == "all_to_all":
            op, nbytes = ("all_gather", nbytes) if a2a_as_all_gather else (op, -(-nbytes // n))
        link = links[a][op] if isinstance(links[a], dict) else links[a]  # per-collective calibration
        out.append(Collective(op, name, nbytes, collective_time(op, nbytes, n, link)))
    return tuple(out)


def _transition(s: Placement, d: Placement) -> str | None:
    """The collective for one axis going from ``s`` to ``d`` (s != d); None when it is local."""
    if s.kind == "P":
        if d.kind == "P":
            raise ValueError(f"cannot redistribute {s} -> {d}: partial reductions with different ops")
        return "all_reduce" if d.kind == "R" else "reduce_scatter"
    if s.kind == "S":
        return "all_to_all" if d.kind == "S" else "all_gather"
    return None  # R -> S(d) slices locally; R -> P keeps the value on one rank (or divides it)


def _placements(items, ndim: int):
    """Parse strings and wrap negative shard dims, so S(-1) and S(ndim-1) are the same placement."""
    for p in items:
        p = parse(p) if isinstance(p, str) else p
        if p.kind == "S":
            if not -ndim <= p.dim < ndim:
                raise ValueError(f"placement {p} is out of range for a {ndim}-d tensor")
            p = p._replace(dim=p.dim % ndim)
        yield p


def _fmt(placements) -> str:
    return "(" + ", ".join(map(str, placements)) + ")"
