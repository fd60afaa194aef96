"""α-β collectives, axis -> link mapping, and the redistribution planner."""

import dataclasses

import pytest

from autopar.cost_models.comm import (
    Collective,
    HierarchicalLink,
    axis_links,
    collective_time,
    price_steps,
    redistribute_collectives,
    redistribute_time,
)
from autopar.cost_models.hardware import Link, SegmentedLink, load_hardware
from autopar.placements import REPLICATE as R
from autopar.placements import partial, shard

P = partial("sum")
LINK = Link(bandwidth_Bps=100e9, latency_s=1e-6)


# --- collective_time -------------------------------------------------------------------------

def test_ring_formulas_by_hand():
    S, n = 1e9, 4  # (n-1)/n = 3/4; S/bw = 0.01 s
    assert collective_time("all_reduce", S, n, LINK) == pytest.approx(2 * 3 * 1e-6 + 2 * 0.75 * 0.01)
    assert collective_time("all_gather", S, n, LINK) == pytest.approx(3 * 1e-6 + 0.75 * 0.01)
    assert collective_time("reduce_scatter", S, n, LINK) == pytest.approx(3e-6 + 0.0075)
    assert collective_time("all_to_all", S, n, LINK) == pytest.approx(3e-6 + 0.0075)
    assert collective_time("send_recv", S, n, LINK) == pytest.approx(1e-6 + 0.01)


@pytest.mark.parametrize("n", [2, 4, 8, 64])
def test_bus_bandwidth_factors_reach_link_bandwidth(n):
    """nccl-tests busbw = algbw · factor equals the link bandwidth when latency is 0."""
    link, S = Link(50e9, 0.0), 1e8
    factors = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n,
               "reduce_scatter": (n - 1) / n, "all_to_all": (n - 1) / n}
    for op, factor in factors.items():
        algbw = S / collective_time(op, S, n, link)
        assert algbw * factor == pytest.approx(50e9)


def test_all_reduce_is_reduce_scatter_plus_all_gather():
    for n in (2, 8, 32):
        ar = collective_time("all_reduce", 3e7, n, LINK)
        assert ar == pytest.approx(collective_time("reduce_scatter", 3e7, n, LINK)
                                   + collective_time("all_gather", 3e7, n, LINK))


def test_latency_dominates_small_messages():
    assert collective_time("all_reduce", 8, 8, LINK) == pytest.approx(14e-6, rel=1e-3)


def test_single_rank_is_free_and_unknown_op_raises():
    for op in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv"):
        assert collective_time(op, 1e9, 1, LINK) == 0.0
    with pytest.raises(ValueError, match="broadcast"):
        collective_time("broadcast", 1e6, 4, LINK)


def test_segmented_link_prices_each_size_on_its_regime():
    small, large = Link(1e9, 1e-4), Link(5e9, 1e-3)
    link = SegmentedLink(((64 << 10, small), (float("inf"), large)))
    for op in ("all_reduce", "all_gather", "send_recv"):
        assert collective_time(op, 64 << 10, 4, link) == collective_time(op, 64 << 10, 4, small)
        assert collective_time(op, (64 << 10) + 1, 4, link) == collective_time(op, (64 << 10) + 1, 4, large)
    # a per-collective dict of links (a calibrated preset) is priced per message size too
    shape = lambda nbytes: (nbytes // 4,)  # noqa: E731
    (c,) = price_steps(((0, P, R),), (P,), shape(4096), 4, (("tp", 4),), ({"all_reduce": link},))
    assert c.time_s == collective_time("all_reduce", 4096, 4, small)
    (c,) = price_steps(((0, P, R),), (P,), shape(1 << 20), 4, (("tp", 4),), ({"all_reduce": link},))
    assert c.time_s == collective_time("all_reduce", 1 << 20, 4, large)


# --- axis_links --------------------------------------------------------------------------------

def test_axis_links_h100_dp_inter_tp_intra():
    hw = load_hardware("h100-sxm")
    links = axis_links({"dp": 4, "tp": 8}, hw)
    assert list(links) == ["dp", "tp"]
    assert links["tp"] == hw.intra_node
    assert links["dp"] == hw.inter_node


def test_axis_links_fill_a_node_from_the_inside():
    hw = load_hardware("h100-sxm")
    assert set(axis_links({"dp": 2, "tp": 4}, hw).values()) == {hw.intra_node}
    links = axis_links({"pp": 4, "dp": 2, "cp": 2, "tp": 2}, hw)
    assert [links[a] is hw.intra_node for a in ("pp", "dp", "cp", "tp")] == [False, True, True, True]
    tp16 = axis_links({"tp": 16}, hw)["tp"]  # 8 per node on 2 nodes: hierarchical
    assert isinstance(tp16, HierarchicalLink) and tp16.per_node == 8 and tp16.inter == hw.inter_node
    assert axis_links({"dp": 2, "tp": 8}, hw)["dp"] == hw.inter_node  # stride 8: one rank per node


def test_a_mesh_spanning_a_slow_node_is_priced_slower():
    base = load_hardware("h100-sxm")
    slow = Link(base.inter_node.bandwidth_Bps / 4, base.inter_node.latency_s)
    hw = dataclasses.replace(base, inter_node_overrides=(((2, 3), slow),))  # nodes 2 and 3 have slower NICs
    # dp=2 x tp=8 spans nodes 0, 1: unchanged; dp=4 x tp=8 spans node 2 and 3: every dp ring waits on them
    assert axis_links({"dp": 2, "tp": 8}, hw) == axis_links({"dp": 2, "tp": 8}, base)
    links = axis_links({"dp": 4, "tp": 8}, hw)
    assert links["dp"] == slow and links["tp"] == base.intra_node
    tp32 = axis_links({"tp": 32}, hw)["tp"]  # hierarchical: the across-node part runs on the slow NICs
    assert isinstance(tp32, HierarchicalLink) and tp32.inter == slow and tp32.intra == base.intra_node
    for axes in ({"dp": 4, "tp": 8}, {"tp": 32}):
        args = ((P, R), (R, R), (1 << 20, 64), 4) if "dp" in axes else ((P,), (R,), (1 << 20, 64), 4)
        assert redistribute_time(*args, axes, axis_links(axes, hw)) > 1.5 * redistribute_time(*args, axes, axis_links(axes, base))


def test_hierarchical_all_reduce_by_hand():
    intra, inter = Link(400e9, 2e-6), Link(50e9, 10e-6)
    link = HierarchicalLink(intra, inter, per_node=8)
    S, n = 1e9, 16  # g = 8 per node, N = 2 nodes
    want = 2 * 7 * 2e-6 + 2 * 7 / 8 * S / 400e9 + 2 * 1 * 10e-6 + 2 * 1 / 2 * (S / 8) / 50e9
    assert collective_time("all_reduce", S, n, link) == pytest.approx(want)
    assert collective_time("all_gather", S, n, link) == pytest.approx(want / 2)
    # cheaper than a flat ring over the NICs, dearer than a flat ring over NVLink
    assert collective_time("all_reduce", S, n, intra) < collective_time("all_reduce", S, n, link) \
        < collective_time("all_reduce", S, n, inter)


# --- redistribute_collectives -----------------------------------------------------------------

AXES1 = {"tp": 4}
LINKS1 = {"tp": LINK}
SHAPE, ITEM = (8, 16), 4  # 512 bytes in all


def plan1(src, dst, shape=SHAPE):
    return [(c.op, c.axis, c.bytes) for c in redistribute_collectives((src,), (dst,), shape, ITEM, AXES1, LINKS1)]


@pytest.mark.parametrize(
    "src, dst, expected",
    [
        (P, R, [("all_reduce", "tp", 512)]),
        (P, shard(0), [("reduce_scatter", "tp", 512)]),
        (shard(0), R, [("all_gather", "tp", 512)]),
        (shard(0), shard(1), [("all_to_all", "tp", 128)]),
        (R, shard(1), []),
        (R, P, []),
        (shard(1), P, [("all_gather", "tp", 512)]),
        (shard(0), shard(0), []),
        (P, P, []),
    ],
)
def test_each_transition(src, dst, expected):
    assert plan1(src, dst) == expected


def test_partial_ops_do_not_mix():
    with pytest.raises(ValueError, match="P\\(sum\\) -> P\\(max\\)"):
        plan1(P, partial("max"))


def test_times_match_collective_time():
    (c,) = redistribute_collectives((P,), (R,), SHAPE, ITEM, AXES1, LINKS1)
    assert isinstance(c, Collective)
    assert c.time_s == pytest.approx(collective_time("all_reduce", 512, 4, LINK))


def test_strings_negative_dims_and_uneven_shapes():
    assert redistribute_collectives(("S(-1)",), ("S(1)",), SHAPE, ITEM, AXES1, LINKS1) == ()
    assert plan1("P(sum)", "R") == [("all_reduce", "tp", 512)]
    assert plan1(shard(0), shard(1), shape=(10, 6)) == [("all_to_all", "tp", 60)]  # 240 B / 4


AXES2 = {"dp": 2, "tp": 4}
LINKS2 = {"dp": Link(10e9, 5e-6), "tp": Link(100e9, 1e-6)}


def plan2(src, dst):
    return [(c.op, c.axis, c.bytes) for c in redistribute_collectives(src, dst, SHAPE, ITEM, AXES2, LINKS2)]


def test_2d_bytes_use_the_other_axis_sharding():
    # dp keeps rows sharded: the tp all_gather moves an (8/2, 16) slab
    assert plan2((shard(0), shard(1)), (shard(0), R)) == [("all_gather", "tp", 256)]
    # both axes on dim 0: the tp gather sees dp's half, the dp gather the whole tensor
    assert plan2((shard(0), shard(0)), (R, R)) == [("all_gather", "tp", 256), ("all_gather", "dp", 512)]


def test_2d_innermost_first_updates_current_placement():
    # tp reduces first (dp still S(0): 256 B), then dp gathers with tp already R (512 B)
    assert plan2((shard(0), P), (R, R)) == [("all_reduce", "tp", 256), ("all_gather", "dp", 512)]
    # dp reduce-scatters after tp went R -> S(1): dp sees a (8, 16/4) tensor
    assert plan2((P, R), (shard(0), shard(1))) == [("reduce_scatter", "dp", 128)]


def test_2d_each_axis_uses_its_link_and_time_sums():
    cs = redistribute_collectives((shard(0), P), (R, R), SHAPE, ITEM, AXES2, LINKS2)
    assert [c.time_s for c in cs] == pytest.approx(
        [collective_time("all_reduce", 256, 4, LINKS2["tp"]), collective_time("all_gather", 512, 2, LINKS2["dp"])])
    assert redistribute_time((shard(0), P), (R, R), SHAPE, ITEM, AXES2, LINKS2) == pytest.approx(sum(c.time_s for c in cs))


def test_size_one_axes_cost_nothing():
    axes = {"dp": 1, "tp": 4}
    cs = redistribute_collectives((P, shard(0)), (R, R), SHAPE, ITEM, axes, LINKS2)
    assert [(c.op, c.axis) for c in cs] == [("all_gather", "tp")]


def test_planner_is_cached_and_checks_lengths():
    a = redistribute_collectives((P, R), (R, R), SHAPE, ITEM, AXES2, LINKS2)
    assert redistribute_collectives((P, R), (R, R), SHAPE, ITEM, AXES2, LINKS2) is a
    with pytest.raises(ValueError, match="one placement per mesh axis"):
        redistribute_collectives((P,), (R, R), SHAPE, ITEM, AXES2, LINKS2)
    with pytest.raises(ValueError, match="no link"):
        redistribute_collectives((P, R), (R, R), SHAPE, ITEM, AXES2, {"tp": LINK})


def test_price_steps_follows_the_given_order_and_intermediates():
    from autopar.cost_models.comm import price_steps

    axes, links = tuple(AXES2.items()), (LINKS2["dp"], LINKS2["tp"])
    # DTensor's way from (S(1), S(1)) to (S(0), S(0)): tp gathers, dp swaps dims, tp re-slices
    steps = ((1, shard(1), R), (0, shard(1), shard(0)), (1, R, shard(0)))
    got = [(c.op, c.axis, c.bytes) for c in price_steps(steps, (shard(1), shard(1)), SHAPE, ITEM, axes, links)]
    assert got == [("all_gather", "tp", 256), ("all_to_all", "dp", 256)]
    # without an all-to-all (gloo), the swap is an all-gather of the whole buffer
    got = [(c.op, c.axis, c.bytes) for c in price_steps(steps, (shard(1), shard(1)), SHAPE, ITEM, axes, links, True)]
    assert got == [("all_gather", "tp", 256), ("all_gather", "dp", 512)]
