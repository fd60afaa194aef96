"""The gradient bucket schedule: the dp and CP-SAT against brute force, the baselines, and plans
whose bucket sizes follow the link's latency (issue 11, check 2)."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest

from autopar.solvers.comm_schedule import BucketProblem, ddp_schedule, simulate, solve, synchronous_s


def _random(rng, n, axes=1, shared=False, alphas=(0.1, 1.0, 3.0), betas=(0.01, 0.05)):
    return BucketProblem(sorted(round(rng.uniform(0, 10), 2) for _ in range(n)),
                         [rng.randint(1, 100) for _ in range(n)], [rng.randrange(axes) for _ in range(n)],
                         [rng.choice(alphas) for _ in range(axes)],
                         [rng.choice(betas) for _ in range(axes)], 10.0 + rng.uniform(0, 2),
                         stream=[0] * axes if shared else None)


def _ordered_partitions(items):
    """Every partition of ``items`` into blocks, with every order of the blocks."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for sub in _ordered_partitions(rest):
        for k in range(len(sub) + 1):  # first opens a new block at any position...
            yield sub[:k] + [[first]] + sub[k:]
        for k in range(len(sub)):  # ...or joins a block
            yield sub[:k] + [[first] + sub[k]] + sub[k + 1:]


def _contiguous(idx):
    """Every partition of ``idx`` into runs, in order."""
    for cuts in itertools.product((0, 1), repeat=max(0, len(idx) - 1)):
        groups, cur = [], [idx[0]]
        for i, c in zip(idx[1:], cuts):
            if c:
                groups.append(cur)
                cur = []
            cur.append(i)
        yield groups + [cur]


def _interleavings(a, b):
    if not a or not b:
        yield a + b
        return
    for rest in _interleavings(a[1:], b):
        yield [a[0]] + rest
    for rest in _interleavings(a, b[1:]):
        yield [b[0]] + rest


def _within_cap(p, sched) -> bool:
    """Bucket buffers in flight, from each bucket's last ready gradient to its end, never exceed the cap."""
    spans = [(max(p.ready_s[i] for i in b.grads), b.end_s, b.nbytes) for b in sched.buckets]
    return all(sum(x for s, e, x in spans if s <= t < e) <= p.memory_cap_bytes for t, _, _ in spans)


def test_the_dp_is_optimal_over_every_partition_and_order():
    """Contiguity in ready order loses nothing (the module's exchange argument): the dp's makespan
    equals the best over every partition of the gradients into buckets and every issue order."""
    rng = random.Random(1)
    for _ in range(16):
        p = _random(rng, rng.randint(1, 6))
        best = min(simulate(p, [(0, g) for g in part]).makespan_s for part in _ordered_partitions(list(range(p.n))))
        got = solve(p, method="dp")
        assert got.makespan_s == pytest.approx(best, abs=1e-9), p
        assert got.solver == "dp" and got.status == "optimal"


def test_dp_and_cpsat_agree_with_brute_force_on_contiguous_buckets():
    rng = random.Random(2)
    for _ in range(12):
        p = _random(rng, rng.randint(1, 8))
        scheds = [simulate(p, [(0, g) for g in part]) for part in _contiguous(p.order(0))]
        best = min(s.makespan_s for s in scheds)
        best_sum = min(s.completion_sum_s for s in scheds if s.makespan_s <= best + 1e-9)
        dp, cp = solve(p, method="dp"), solve(p, method="cp-sat", time_limit_s=2)
        assert dp.makespan_s == pytest.approx(best, abs=1e-9)
        assert dp.buckets[-1].end_s == pytest.approx(min(s.buckets[-1].end_s for s in scheds), abs=1e-9)
        assert cp.makespan_s == pytest.approx(best, rel=1e-4), p  # integer time units of horizon / 1e5
        assert cp.completion_sum_s == pytest.approx(best_sum, rel=1e-3), p
        assert cp.solver == "cp-sat" and cp.status == "optimal"


def test_cpsat_schedules_a_shared_link_and_a_memory_cap_like_brute_force():
    """Two axes on one stream (their buckets interleave), with and without a cap on buffers in flight."""
    rng, capped = random.Random(3), 0
    for trial in range(10):
        p0 = _random(rng, rng.randint(2, 6), axes=2, shared=True, alphas=(0.1, 1.0), betas=(0.002, 0.01))
        axis = [0, 1, *p0.axis[2:]]  # both axes used
        p = BucketProblem(p0.ready_s, p0.nbytes, axis, p0.alpha_s, p0.beta_s, p0.backward_s, p0.stream,
                          memory_cap_bytes=None if trial % 2 == 0 else max(max(p0.nbytes), 0.6 * sum(p0.nbytes)))
        best = float("inf")
        for a0 in _contiguous(p.order(0)) if p.order(0) else [[]]:
            for a1 in _contiguous(p.order(1)) if p.order(1) else [[]]:
                for seq in _interleavings([(0, g) for g in a0], [(1, g) for g in a1]):
                    s = simulate(p, seq)
                    if p.memory_cap_bytes is None or _within_cap(p, s):
                        best = min(best, s.makespan_s)
        if best == float("inf"):  # buffers released together overflow the cap whatever the buckets
            with pytest.raises(ValueError, match="memory cap"):
                solve(p, time_limit_s=2)
            continue
        got = solve(p, time_limit_s=2)
        assert got.solver == "cp-sat"
        assert got.makespan_s == pytest.approx(best, rel=1e-4), p
        if p.memory_cap_bytes is not None:
            assert _within_cap(p, got)
            free = BucketProblem(p.ready_s, p.nbytes, p.axis, p.alpha_s, p.beta_s, p.backward_s, p.stream)
            capped += not _within_cap(p, solve(free, time_limit_s=2))
    assert capped >= 1  # the cap changed the schedule at least once
    big = _random(rng, 100, axes=2, shared=True)  # past CP-SAT's size in "auto": the dp's buckets, list-scheduled
    got = solve(big)
    assert got.status.startswith("heuristic") and got.makespan_s <= synchronous_s(big)


def test_baselines_and_bucket_sizes_follow_the_latency():
    """Synchronous hooks and DDP's rule are priced by the same model, and never beat the optimum;
    a high alpha merges gradients into fewer, larger buckets than a low one."""
    rng = random.Random(4)
    n = 60
    ready = sorted(rng.uniform(0, 1e-2) for _ in range(n))
    nbytes = [rng.randint(1 << 10, 4 << 20) for _ in range(n)]
    counts = {}
    for alpha in (1e-6, 1e-4, 1e-3):
        p = BucketProblem(ready, nbytes, [0] * n, [alpha], [1 / 50e9], 1e-2)
        opt, ddp = solve(p), ddp_schedule(p)
        assert synchronous_s(p) == pytest.approx(1e-2 + sum(alpha + b / 50e9 for b in nbytes))
        assert opt.makespan_s <= ddp.makespan_s + 1e-12 and opt.makespan_s <= synchronous_s(p)
        full = sum(b.nbytes >= 25 << 20 for b in ddp.buckets)
        assert full >= len(ddp.buckets) - 2  # 25 MiB each but the first (1 MiB) and the last
        counts[alpha] = len(opt.buckets)
    assert counts[1e-6] > counts[1e-4] > counts[1e-3]


def test_a_plan_buckets_by_latency_and_round_trips(tmp_path):
    """Check 2 of issue 11, over plans: the same GPT on dp=2, planned for a high-latency link and
    for a low-latency, high-bandwidth one. The first gets fewer, larger buckets. The schedule is
    in the plan, in the format the executor reads, and survives save/load and the schema."""
    import torch

    import autopar
    from autopar.cost_models.comm import collective_time
    from autopar.cost_models.hardware import PRESET_DIR, Link
    from autopar.passes.replicate import trace_deep
    from autopar.plan import validate
    from models import GPT

    base = json.loads((PRESET_DIR / "h100-sxm.json").read_text())

    def preset(name, latency, bandwidth):
        path = tmp_path / f"{name}.json"
        link = {"latency_s": latency, "bandwidth_Bps": bandwidth}
        path.write_text(json.dumps({**base, "name": name, "intra_node": link}))
        return str(path)

    with torch.device("meta"):
        model = GPT(vocab=128, d=256, heads=4, layers=2, max_len=2048)
    ids = torch.zeros(32, 2048, dtype=torch.long, device="meta")
    tg = trace_deep(model, (ids,), None)
    # 10x H100's NVLink latency; and 1/30 of it with 10x the bandwidth
    links = {"high": (30e-6, 450e9), "low": (1e-7, 4500e9)}
    plans = {k: autopar.plan(model, autopar.Mesh({"dp": 2}, hardware=preset(k, *v)), (ids,), traced=tg,
                             time_limit_s=5, fusion_preview=False) for k, v in links.items()}
    buckets = {k: p.comm_schedule["buckets"] for k, p in plans.items()}
    params = {k: sorted(f for b in bs for f in b["params"]) for k, bs in buckets.items()}
    assert params["high"] == params["low"] and len(params["low"]) == len(set(params["low"])) > 20
    mean = {k: sum(b["bytes"] for b in bs) / len(bs) for k, bs in buckets.items()}
    assert len(buckets["high"]) < len(buckets["low"]) and mean["high"] > mean["low"]

    for k, plan in plans.items():
        cs = plan.comm_schedule
        assert set(cs) == {"version", "buckets", "predicted", "solver", "timeline"} and cs["version"] == 1
        assert cs["solver"] == {"name": "dp", "status": "optimal"}
        pred = cs["predicted"]
        assert pred["makespan_s"] <= pred["ddp_s"] + 1e-15 and pred["makespan_s"] < pred["synchronous_s"]
        assert pred["exposed_s"] == pytest.approx(pred["makespan_s"] - pred["backward_s"])
        parts = [v for n, v in plan.time_breakdown.items() if n != "grad_sync_exposed_s"]
        assert plan.step_time_s == pytest.approx(sum(parts))  # the step still counts every sync in full
        fqn = {f.replace(".", "_"): f for f in plan.param_placements}
        syncs = [c for c in plan.collectives if c["phase"] == "grad_sync"]
        bucketed = [c for c in syncs if fqn[c["tensor"][2:]] in params[k]]  # the rest stay in the hooks
        assert all(c["op"] == "all_reduce" for c in bucketed) and len(bucketed) == len(params[k])
        assert pred["synchronous_s"] == pytest.approx(pred["backward_s"] + sum(c["time_s"] for c in bucketed))
        hooked = sum(c["time_s"] for c in syncs if c not in bucketed)
        assert plan.time_breakdown["grad_sync_exposed_s"] == pytest.approx(pred["exposed_s"] + hooked)
        link = Link(links[k][1], links[k][0])
        prev = 0.0
        for b in cs["buckets"]:  # one dp all-reduce per bucket, FIFO, never two at once
            assert b["axis"] == "dp" and b["start_s"] >= prev - 1e-15
            assert b["end_s"] - b["start_s"] == pytest.approx(collective_time("all_reduce", b["bytes"], 2, link))
            prev = b["end_s"]
        assert [x[0] for x in cs["timeline"]["comm"]["dp"]] == list(range(len(cs["buckets"])))
        compute = cs["timeline"]["compute"]
        assert compute[0][1] == 0 and compute[-1][2] == pytest.approx(pred["backward_s"])

    path = tmp_path / "plan.json"
    plans["high"].save(path)
    validate(json.loads(path.read_text()))  # the schema (and its fast checker) accept it
    loaded = autopar.Plan.load(path)
    assert loaded.comm_schedule == plans["high"].comm_schedule and loaded.hash() == plans["high"].hash()
    bad = json.loads(path.read_text())
    bad["comm_schedule"]["buckets"][0]["axis"] = "tp"
    with pytest.raises(autopar.PlanError, match="comm_schedule"):
        autopar.Plan.from_dict(bad)
    del bad["comm_schedule"]
    assert autopar.Plan.from_dict(bad).comm_schedule is None  # plans without it load as before

    from autopar.html_report import render_html
    from autopar.report import inspect_sections, render_text

    sections = inspect_sections(loaded)
    text = render_text(sections)
    assert "Communication schedule" in text and re.search(r"^comm dp +\|[.0-9]+\|$", text, re.M)
    assert 'id="comm-schedule"' in render_html(loaded, sections)

    off = autopar.plan(model, autopar.Mesh({"dp": 2}, hardware=preset("low", *links["low"])), (ids,), traced=tg,
                       time_limit_s=5, fusion_preview=False, comm_schedule="off")
    assert off.comm_schedule is None and "grad_sync_exposed_s" not in off.time_breakdown


def test_partial_overlap_slows_compute_and_dp_cpsat_match_brute_force():
    """ω (the preset's comm_compute_overlap): (1 − ω) of each overlapped collective's time delays
    compute. The dp and CP-SAT still find the best contiguous buckets for ω in {0, 0.5, 1}; ω = 0
    serialises (C = T + Σ d_k), so one bucket per axis, never more than with ω = 1."""
    rng = random.Random(5)
    for _ in range(10):
        p0 = _random(rng, rng.randint(1, 7))
        got = {}
        for w in (0.0, 0.5, 1.0):
            p = BucketProblem(p0.ready_s, p0.nbytes, p0.axis, p0.alpha_s, p0.beta_s, p0.backward_s, overlap=w)
            best = min(simulate(p, [(0, g) for g in part]).makespan_s for part in _contiguous(p.order(0)))
            dp, cp = solve(p, method="dp"), solve(p, method="cp-sat", time_limit_s=2)
            assert dp.makespan_s == pytest.approx(best, abs=1e-9), (w, p)
            assert cp.makespan_s == pytest.approx(best, rel=1e-4), (w, p)
            got[w] = dp
        zero = got[0.0]
        assert zero.makespan_s == pytest.approx(p0.end_s + sum(b.end_s - b.start_s for b in zero.buckets), abs=1e-9)
        assert len(zero.buckets) == 1 <= len(got[1.0].buckets)
        assert got[1.0].makespan_s <= got[0.5].makespan_s + 1e-9 <= zero.makespan_s + 2e-9
    with pytest.raises(ValueError, match="overlap"):
        BucketProblem([0.0], [1], [0], [0.1], [0.01], 1.0, overlap=1.5)


@pytest.mark.parametrize("value", [-0.1, 1.5, "half", True])
def test_the_preset_field_comm_compute_overlap_is_validated(tmp_path, value):
    from autopar.cost_models.hardware import PRESET_DIR, load_hardware
    from autopar.errors import MeshError

    data = json.loads((PRESET_DIR / "local.json").read_text())
    assert 0 <= load_hardware("local").comm_compute_overlap <= 1
    (tmp_path / "ok.json").write_text(json.dumps({**data, "comm_compute_overlap": 0.25}))
    assert load_hardware(str(tmp_path / "ok.json")).comm_compute_overlap == 0.25
    data.pop("comm_compute_overlap", None)
    (tmp_path / "default.json").write_text(json.dumps(data))
    assert load_hardware(str(tmp_path / "default.json")).comm_compute_overlap == 1.0
    (tmp_path / "bad.json").write_text(json.dumps({**data, "comm_compute_overlap": value}))
    with pytest.raises(MeshError, match=r"comm_compute_overlap.*must be a number in \[0, 1\]"):
        load_hardware(str(tmp_path / "bad.json"))
