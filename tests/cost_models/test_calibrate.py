"""Calibrated communication: fitting α-β links, calibrated presets, and a real 2-rank measurement."""

from __future__ import annotations

import json
import random

import pytest

from autopar import cli
from autopar.cost_models.calibrate import (DEFAULT_SIZES, OPS, CollectiveTimes, calibrated_preset, fit_alpha_beta,
                                           fit_all, fit_segments, ring_factors)
from autopar.cost_models.comm import collective_time
from autopar.cost_models.hardware import Link, SegmentedLink, load_hardware
from autopar.errors import MeshError
from dist_utils import run_ranks

SIZES = DEFAULT_SIZES


def test_default_sizes_are_1k_to_128m_by_powers_of_2():
    assert SIZES[0] == 1 << 10 and SIZES[-1] == 128 << 20 and len(SIZES) == 18
    assert all(b == 2 * a for a, b in zip(SIZES, SIZES[1:]))


@pytest.mark.parametrize("n", [2, 4, 8])
def test_ring_factors_match_collective_time(n):
    link = Link(3e9, 7e-6)
    for op in OPS:
        k_a, k_b = ring_factors(op, n)
        assert collective_time(op, 12345, n, link) == pytest.approx(k_a * 7e-6 + k_b * 12345 / 3e9)
    assert ring_factors("all_reduce", n) == pytest.approx((2 * (n - 1), 2 * (n - 1) / n))
    assert ring_factors("send_recv", n) == (1.0, 1.0)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n", [2, 8])
def test_fit_recovers_exact_alpha_beta(op, n):
    link = Link(1.7e9, 1.7e-4)
    times = {s: collective_time(op, s, n, link) for s in SIZES}
    alpha, bw, err = fit_alpha_beta(op, times, n)
    assert alpha == pytest.approx(link.latency_s, rel=1e-6)
    assert bw == pytest.approx(link.bandwidth_Bps, rel=1e-6)
    assert err < 1e-6
    # the fitted link plugs straight into collective_time
    assert collective_time(op, 5 << 20, n, Link(bw, alpha)) == pytest.approx(collective_time(op, 5 << 20, n, link))
    seg, seg_err = fit_segments(op, times, n)  # one line fits: no extra regimes
    assert len(seg.segments) == 1 and seg_err < 1e-6


def test_fit_with_noise_is_close():
    rng = random.Random(0)
    link = Link(2e9, 5e-5)
    times = {s: collective_time("all_gather", s, 2, link) * (1 + rng.uniform(-0.05, 0.05)) for s in SIZES}
    alpha, bw, err = fit_alpha_beta("all_gather", times, 2)
    assert alpha == pytest.approx(link.latency_s, rel=0.1)
    assert bw == pytest.approx(link.bandwidth_Bps, rel=0.1)
    assert err <= 0.05


def _rel_errors(op, times, n, link):
    return [(collective_time(op, s, n, link) - t) / t for s, t in sorted(times.items())]


def test_fit_minimises_the_largest_relative_error():
    """A minimax line equioscillates: its largest error is hit at >= 3 sizes, with both signs, and
    no nearby line does better (least squares would leave one worst size)."""
    rng = random.Random(1)
    times = {s: collective_time("all_reduce", s, 2, Link(1e9, 1e-4)) * (1 + rng.uniform(-0.3, 0.3)) for s in SIZES}
    alpha, bw, err = fit_alpha_beta("all_reduce", times, 2)
    errs = _rel_errors("all_reduce", times, 2, Link(bw, alpha))
    assert max(map(abs, errs)) == pytest.approx(err, rel=1e-9)
    assert sum(abs(e) > err * (1 - 1e-6) for e in errs) >= 3 and min(errs) < 0 < max(errs)
    for da, db in [(1.01, 1), (0.99, 1), (1, 1.01), (1, 0.99), (1.01, 1.01), (0.99, 0.99)]:
        assert max(map(abs, _rel_errors("all_reduce", times, 2, Link(bw * db, alpha * da)))) > err


def test_max_rel_error_is_the_worst_size():
    link = Link(1e9, 1e-4)
    times = {s: collective_time("send_recv", s, 2, link) for s in (1 << 10, 1 << 16, 1 << 20, 1 << 24)}
    times[1 << 16] *= 1.5  # one outlier
    alpha, bw, err = fit_alpha_beta("send_recv", times, 2)
    assert err == pytest.approx(max(map(abs, _rel_errors("send_recv", times, 2, Link(bw, alpha)))), rel=1e-12)
    assert 0.1 < err < 0.5 / 1.5  # the outlier is shared out, not all on one size


def test_fit_clamps_negative_latency_to_zero():
    # pure bandwidth with slight superlinear growth would give α < 0 unconstrained
    times = {s: s / 1e9 * (1 + 0.01 * i) for i, s in enumerate(SIZES)}
    alpha, bw, _ = fit_alpha_beta("send_recv", times, 2)
    assert alpha == 0.0 and bw > 0


def test_fit_errors():
    with pytest.raises(ValueError, match="two sizes"):
        fit_alpha_beta("all_reduce", {1024: 1e-4}, 2)
    with pytest.raises(ValueError, match="at least 2 ranks"):
        fit_alpha_beta("all_reduce", {1024: 1e-4, 4096: 2e-4}, 1)
    with pytest.raises(ValueError, match="do not grow"):
        fit_alpha_beta("all_reduce", {1024: 3e-4, 4096: 2e-4, 16384: 1e-4}, 2)
    with pytest.raises(ValueError, match="positive"):
        fit_alpha_beta("all_reduce", {1024: 0.0, 4096: 2e-4}, 2)
    with pytest.raises(ValueError, match="do not grow"):
        fit_segments("all_reduce", {1024: 3e-4, 4096: 2e-4, 16384: 1e-4}, 2)


SMALL, LARGE, HUGE = Link(3e9, 2e-4), Link(0.4e9, 1e-5), Link(0.1e9, 1e-3)  # three made-up gloo regimes


def _piecewise(op, n, cuts=(256 << 10,), links=(SMALL, LARGE)):
    return {s: collective_time(op, s, n, links[sum(s > c for c in cuts)]) for s in SIZES}


@pytest.mark.parametrize("op", ["all_reduce", "all_gather", "send_recv"])
def test_segments_fit_piecewise_data_that_one_line_cannot(op):
    times = _piecewise(op, 2)
    assert fit_alpha_beta(op, times, 2)[2] > 0.25  # one α-β line is far off somewhere
    link, err = fit_segments(op, times, 2)
    assert err < 1e-6 and len(link.segments) == 2
    (bound, small), (_, large) = link.segments
    assert 256 << 10 <= bound < 512 << 10  # between the last small size and the first large one
    assert small.bandwidth_Bps == pytest.approx(SMALL.bandwidth_Bps, rel=1e-6)
    assert large.latency_s == pytest.approx(LARGE.latency_s, rel=1e-6)
    assert link.at(1 << 10) is small and link.at(1 << 30) is large


def test_three_regimes_and_their_limits():
    times = _piecewise("all_reduce", 2, cuts=(64 << 10, 8 << 20), links=(SMALL, LARGE, HUGE))
    assert fit_segments("all_reduce", times, 2, max_segments=2)[1] > 0.05
    link, err = fit_segments("all_reduce", times, 2)
    assert err < 1e-6 and len(link.segments) == 3
    # a regime needs min_points sizes: two sizes past a cut are not a regime of their own
    times = _piecewise("all_reduce", 2, cuts=(32 << 20,))
    link, err = fit_segments("all_reduce", times, 2, min_points=3)
    assert err > 0.01 and all(sum(link.at(s) is x for s in SIZES) >= 3 for _, x in link.segments)
    assert fit_segments("all_reduce", times, 2, min_points=2)[1] < 1e-6


def test_segments_stop_once_within_tolerance():
    times = _piecewise("all_reduce", 2)
    line_err = fit_alpha_beta("all_reduce", times, 2)[2]
    link, err = fit_segments("all_reduce", times, 2, tol=line_err)
    assert len(link.segments) == 1 and err == pytest.approx(line_err)


def _fits():
    return {"all_reduce": (Link(1.2e9, 1.5e-4), 0.12), "all_gather": (Link(0.7e9, 2.5e-4), 0.2),
            "send_recv": (Link(2.6e9, 1.7e-4), 0.08)}


def test_calibrated_preset_round_trips(tmp_path):
    base = load_hardware("local")
    doc = calibrated_preset(base, _fits())
    assert doc["all_to_all_as_all_gather"] == base.all_to_all_as_all_gather
    assert doc["peak_flops"] == base.peak_flops and doc["devices_per_node"] == base.devices_per_node
    assert "autopar profile --collectives" in doc["notes"]
    assert doc["collectives"]["all_gather"]["max_rel_error"] == 0.2
    path = tmp_path / "calibrated.json"
    path.write_text(json.dumps(doc))
    hw = load_hardware(str(path))
    primary = Link(1.2e9, 1.5e-4)
    # local has intra_node == inter_node (one host), so both get the all_reduce fit
    assert hw.intra_node == primary and hw.inter_node == primary
    assert hw.link_for("all_reduce", hw.intra_node) == primary
    assert hw.link_for("all_gather", hw.intra_node) == Link(0.7e9, 2.5e-4)
    assert hw.link_for("send_recv", hw.inter_node) == Link(2.6e9, 1.7e-4)
    assert hw.link_for("reduce_scatter", hw.intra_node) == hw.intra_node  # not fitted: the default
    assert hash(hw) == hash(hw)
    assert hw.memory_bandwidth_Bps == base.memory_bandwidth_Bps and hw.peak("bf16") == base.peak("bf16")


def test_calibrated_preset_stores_size_regimes(tmp_path):
    fits = fit_all({"all_reduce": _piecewise("all_reduce", 2), "send_recv": _piecewise("send_recv", 2)}, 2)[0]
    doc = calibrated_preset(load_hardware("local"), fits)
    segs = doc["collectives"]["all_reduce"]["segments"]
    assert len(segs) == 2 and "max_bytes" in segs[0] and "max_bytes" not in segs[1]
    path = tmp_path / "calibrated.json"
    path.write_text(json.dumps(doc))
    hw = load_hardware(str(path))
    link = hw.link_for("all_reduce", hw.intra_node)
    assert isinstance(link, SegmentedLink)
    for s in (1 << 10, 100 << 10, 1 << 20, 1 << 30):  # each size priced by its own regime
        want = collective_time("all_reduce", s, 2, SMALL if s <= 256 << 10 else LARGE)
        assert collective_time("all_reduce", s, 2, link) == pytest.approx(want, rel=1e-3)
    # the levels get the regime of the largest messages
    assert hw.intra_node == hw.inter_node == link.segments[-1][1]


def test_calibrated_preset_keeps_inter_node_of_a_multi_node_preset(tmp_path):
    base = load_hardware("h100-sxm")
    doc = calibrated_preset(base, _fits())
    path = tmp_path / "h100.json"
    path.write_text(json.dumps(doc))
    hw = load_hardware(str(path))
    assert hw.intra_node == Link(1.2e9, 1.5e-4) and hw.inter_node == base.inter_node
    assert not hw.all_to_all_as_all_gather
    with pytest.raises(ValueError, match="all_reduce"):
        calibrated_preset(base, {"send_recv": (Link(1e9, 1e-5), 0.0)})


def test_presets_without_collectives_have_no_collective_links():
    hw = load_hardware("h100-sxm")
    assert hw.collective_links == {}
    assert hw.link_for("all_reduce", hw.inter_node) is hw.inter_node


def test_bundled_local_preset_is_calibrated_per_collective():
    hw = load_hardware("local")
    assert set(hw.collective_links) == {"all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv"}
    assert hw.link_for("all_reduce", hw.intra_node) is hw.collective_links["all_reduce"]


def _preset_with(tmp_path, collectives) -> str:
    doc = calibrated_preset(load_hardware("local"), _fits())
    doc["collectives"] = collectives
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    return str(path)


@pytest.mark.parametrize("collectives, message", [
    ({"all_reduce": {"bandwidth_Bps": -1.0, "latency_s": 1e-5}},
     "field 'collectives.all_reduce.bandwidth_Bps' must be a positive number, got -1.0"),
    ({"all_reduce": {"bandwidth_Bps": 0, "latency_s": 1e-5}},
     "field 'collectives.all_reduce.bandwidth_Bps' must be a positive number, got 0"),
    ({"all_gather": {"bandwidth_Bps": 1e9, "latency_s": -1e-5}},
     "field 'collectives.all_gather.latency_s' must be a non-negative number, got -1e-05"),
    ({"send_recv": {"latency_s": 1e-5}}, "field 'collectives.send_recv.bandwidth_Bps' is missing"),
    ({"broadcast": {"bandwidth_Bps": 1e9, "latency_s": 0}}, "field 'collectives.broadcast' is not a collective"),
    ({"all_reduce": 3}, "field 'collectives.all_reduce' is not an object"),
    ([1, 2], "field 'collectives' must be an object"),
    ({"all_reduce": {"segments": []}}, "field 'collectives.all_reduce.segments' must be a non-empty list"),
    ({"all_reduce": {"segments": [{"bandwidth_Bps": 1e9, "latency_s": 0}, {"bandwidth_Bps": 1e9, "latency_s": 0}]}},
     "field 'collectives.all_reduce.segments[0].max_bytes' is missing"),
    ({"all_reduce": {"segments": [{"max_bytes": 4096, "bandwidth_Bps": 1e9, "latency_s": 0},
                                  {"max_bytes": 1024, "bandwidth_Bps": 1e9, "latency_s": 0}, {"bandwidth_Bps": 1e9, "latency_s": 0}]}},
     "field 'collectives.all_reduce.segments' must have increasing max_bytes"),
    ({"all_reduce": {"segments": [{"max_bytes": 4096, "bandwidth_Bps": 1e9, "latency_s": 0}, {"bandwidth_Bps": -1, "latency_s": 0}]}},
     "field 'collectives.all_reduce.segments[1].bandwidth_Bps' must be a positive number"),
])
def test_bad_collectives_block_is_a_clear_error(tmp_path, collectives, message):
    path = _preset_with(tmp_path, collectives)
    with pytest.raises(MeshError) as e:
        load_hardware(path)
    assert message in str(e.value) and path in str(e.value)


def test_fit_all_reports_missing_ops():
    link = Link(1e9, 1e-4)
    times = CollectiveTimes({"all_reduce": {s: collective_time("all_reduce", s, 2, link) for s in SIZES[:4]},
                             "all_to_all": {}}, missing={"all_to_all": "RuntimeError: no alltoall"}, world=2)
    fits, failed = fit_all(times, 2)
    assert set(fits) == {"all_reduce"} and failed == {"all_to_all": "RuntimeError: no alltoall"}


def test_profile_table_says_pass_or_fail_per_collective():
    times = {"all_reduce": _piecewise("all_reduce", 2), "send_recv": _piecewise("send_recv", 2), "all_to_all": {}}
    fits, failed = fit_all(times, 2, max_segments=1)
    fits["all_reduce"] = fit_segments("all_reduce", times["all_reduce"], 2)
    failed["all_to_all"] = "RuntimeError: no alltoall"
    text = cli.render_text(cli.profile_sections(times, fits, failed, 2, threshold=0.25))
    summary = text[text.index("Fitted links"):].splitlines()
    row = {line.split()[0]: line for line in summary if line.split() and line.split()[0] in OPS}
    assert row["all_reduce"].rstrip().endswith("0.0%  PASS")  # two regimes reproduce it exactly
    assert row["send_recv"].rstrip().endswith("FAIL") and "SKIP (RuntimeError: no alltoall)" in row["all_to_all"]
    assert "128.00 MiB" in text and "max |relative error| 0.0%: PASS (threshold 25%)" in text


def _measure_small(rank, world):
    from autopar.cost_models.calibrate import measure_collectives

    times = measure_collectives(sizes=[1 << 10, 4 << 10, 16 << 10, 64 << 10], repeats=2, warmup=1, rounds=2, burst_s=0.002)
    return dict(times), times.missing, times.world, times.backend


def test_measure_on_two_gloo_ranks():
    results = run_ranks(_measure_small, 2, timeout=120)
    (times, missing, world, backend), other = results[0], results[1]
    assert other == results[0]  # max-reduced: every rank reports the same numbers
    assert world == 2 and backend == "gloo"
    assert set(times) == set(OPS)
    for op in ("all_reduce", "all_gather", "reduce_scatter", "send_recv"):
        assert sorted(times[op]) == [1 << 10, 4 << 10, 16 << 10, 64 << 10], op
        assert all(t > 0 for t in times[op].values()), op
    # all_to_all is measured where gloo has it, and recorded as missing where it does not
    assert bool(times["all_to_all"]) != ("all_to_all" in missing)


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_profile_collectives_argument_errors(capsys, tmp_path):
    code, _, err = run_cli(capsys, "profile", "--collectives", "--nproc", "1")
    assert code == 1 and err.strip() == "autopar: error: --nproc must be at least 2 to measure collectives, got 1"
    code, _, err = run_cli(capsys, "profile", "--collectives", "--max-bytes", "2047")
    assert code == 1 and "fewer than two sizes" in err
    code, _, err = run_cli(capsys, "profile", "--collectives", "--hardware", "nope")
    assert code == 1 and "unknown hardware preset 'nope'" in err
    code, _, err = run_cli(capsys, "profile", "--collectives", "--out", tmp_path / "missing" / "x.json")
    assert code == 1 and "does not exist" in err
    code, _, err = run_cli(capsys, "profile", "--collectives", "--bogus")
    assert code == 2  # a usage error once the command is real


def test_profile_collectives_end_to_end(capsys, tmp_path):
    out = tmp_path / "calibrated.json"
    # up to 16 MiB, so even on a loaded host (milliseconds of scheduling delay per call) all_reduce times grow
    code, stdout, err = run_cli(capsys, "profile", "--collectives", "--max-bytes", 16 << 20, "--repeats", 2,
                                "--rounds", 1, "--out", out)
    assert code == 0, err
    for op in ("all_reduce", "all_gather", "reduce_scatter", "send_recv"):
        assert f"{op} (2 ranks)" in stdout
    assert "Fitted links" in stdout and "16.00 MiB" in stdout and "max rel. error" in stdout
    hw = load_hardware(str(out))
    assert hw.name == "local" and hw.intra_node == hw.link_for("all_reduce", Link(1.0, 0.0)).at(1 << 40)
    # each collective is fitted (PASS or FAIL in its table and the summary) or says why not (SKIP)
    assert "all_reduce" in hw.collective_links
    assert stdout.count("PASS") + stdout.count("FAIL") == 2 * len(hw.collective_links)
    assert stdout.count("SKIP") == len(OPS) - len(hw.collective_links)
    assert f"wrote calibrated preset to {out}" in err


def _measure_in_program(rank, world):
    from autopar.cost_models.calibrate import measure_collectives

    times = measure_collectives(sizes=[1 << 10, 64 << 10], ops=("all_reduce",), repeats=2, rounds=2, gap_s=0.001)
    return dict(times)


def test_measure_in_program_mode_times_single_calls_after_compute():
    times = run_ranks(_measure_in_program, 2, timeout=120)[0]
    assert sorted(times["all_reduce"]) == [1 << 10, 64 << 10] and all(t > 0 for t in times["all_reduce"].values())
