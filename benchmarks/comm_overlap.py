"""Overlapped gradient all-reduces on real ranks (issue 11: checks 1 and 3).

    python benchmarks/comm_overlap.py                      # 2 gloo ranks, GPT d=1024 x 2 layers (26M params, 103 MB of grads)
    python benchmarks/comm_overlap.py --d 512 --rounds 3   # smaller, quicker
    python benchmarks/comm_overlap.py --measure-overlap    # ω, the preset's comm_compute_overlap

examples/gpt.py's GPT (its loss inside, so the output is one number), planned on dp=2 with the
`local` preset and pinned to pure data parallelism (every op with a batch-derived dim 0 is S(0) on
dp). One run, interleaved rounds, the median of ``--steps`` forward+backward steps each (the
gradients synced and in place; no optimizer step), of:

  sync       the plan with today's per-parameter synchronous all-reduces (no comm_schedule)
  scheduled  the same plan with ``plan.comm_schedule``: bucketed, asynchronous, waited at the end
             of backward (codegen/buckets.py)
  scheduled_blocking  the same buckets, each waited for as it is issued (no overlap)
  ddp_buckets  the same executor with DDP's bucketing rule (25 MiB, the first 1 MiB) in the
             schedule's ready order instead of the solved buckets
  ddp        torch DDP (bucket_cap_mb=25) on the plain model, each rank on its half of the batch
  *_compute  the same two programs with no gradient sync at all (compiled: hooks removed; DDP:
             no_sync), to separate compute from communication

The schedule is the planner's ``plan.comm_schedule`` (passes/comm_schedule.py). Its predicted
makespan runs from the start of backward; the predicted step adds the forward, from the same plan:
the ops' compute (not the parameter nodes', which price the optimizer step this script does not
run) and collectives and the runtime overhead, less the schedule's backward. Both are printed next
to what was measured (the backward as step minus a separately timed forward).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import operator
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))


def with_schedule(plan, schedule):
    """``plan`` with another ``comm_schedule`` (None: per-parameter synchronous syncs)."""
    return dataclasses.replace(plan, comm_schedule=schedule)


def dp_pins(model, ids) -> dict:
    """S(0) on dp for every op whose dim 0 comes from the batch (B, B*S, B*(S-1) rows)."""
    from autopar.passes.trace import trace

    b, s = ids.shape
    rows = {b, b * s, b * (s - 1)}
    pins = {"ids": "S(0)"}
    for n in trace(model, (ids,)).gm.graph.nodes:
        v = n.meta.get("val")
        v = v[0] if isinstance(v, (tuple, list)) and v else v  # layer norm: its output
        if n.op == "call_function" and isinstance(v, torch.Tensor) and v.dim() and v.shape[0] in rows \
                and n.target is not operator.getitem:  # tuple outputs are pinned through their producer
            pins[n.name] = "S(0)"
    return pins


def ddp_rule(schedule: dict, params: dict) -> dict:
    """The schedule's gradients in its ready order, bucketed by DDP's rule instead (25 MiB, the
    first 1 MiB): the same executor with DDP's buckets."""
    buckets, cur, size, cap = [], [], 0, 1 << 20
    for f in (f for b in schedule["buckets"] for f in b["params"]):
        cur.append(f)
        size += params[f].numel() * params[f].element_size()
        if size >= cap:
            buckets.append({"axis": "dp", "params": cur, "bytes": size, "start_s": 0.0, "end_s": 0.0})
            cur, size, cap = [], 0, 25 << 20
    if cur:
        buckets.append({"axis": "dp", "params": cur, "bytes": size, "start_s": 0.0, "end_s": 0.0})
    return {**schedule, "buckets": buckets}


def _rank(rank, world, args):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import autopar
    from autopar.codegen.runtime import ParallelModule
    from gpt import WithLoss

    torch.manual_seed(0)
    model = WithLoss(vocab=512, d=args.d, heads=8, layers=args.layers, max_len=max(128, args.seq))
    copies = [copy.deepcopy(model) for _ in range(3)]
    ids = torch.randint(0, 512, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    mesh = autopar.Mesh({"dp": world}, hardware=args.hardware)
    t0 = time.perf_counter()
    copies.append(copy.deepcopy(model))
    st = autopar.compile(model, mesh, example_inputs=(ids,), pins=dp_pins(copies[-1], ids))._autopar
    plan = st["plan"]
    if not plan.comm_schedule:
        raise SystemExit("the plan has no comm_schedule (no gradient all-reduce to schedule?)")
    copies += [copy.deepcopy(copies[0]) for _ in range(2)]
    rule = ddp_rule(plan.comm_schedule, dict(copies[-1].named_parameters(remove_duplicate=False)))
    pms = {k: ParallelModule(m, with_schedule(plan, s), st["traced"], st["lowered"], st["mesh"])
           for k, m, s in (("sync", copies[0], None), ("scheduled", copies[1], plan.comm_schedule),
                           ("scheduled_blocking", copies[5], plan.comm_schedule), ("ddp_buckets", copies[4], rule),
                           ("compiled_compute", copies[3], None))}
    pms["scheduled_blocking"]._autopar["grad_buckets"].synchronous = True
    for p in pms["compiled_compute"].parameters():
        p._post_accumulate_grad_hooks.clear()  # compute only: gradients stay unsynced
    setup_s = time.perf_counter() - t0
    half = args.batch // world
    ddp = DDP(copies[2], bucket_cap_mb=25)
    local = ids[rank * half:(rank + 1) * half]

    def step(module, x, sync=True):
        """(forward+backward seconds, forward seconds)"""
        with module.no_sync() if not sync else contextlib.nullcontext():
            t = time.perf_counter()
            loss = module(x)
            f = time.perf_counter()
            loss.backward()
            e = time.perf_counter()
        module.zero_grad(set_to_none=True)
        return e - t, f - t

    runs = {**{k: functools.partial(step, pm, ids) for k, pm in pms.items()},
            "ddp": functools.partial(step, ddp, local), "ddp_compute": functools.partial(step, ddp, local, False)}
    times = {k: [] for k in runs}
    fwd = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            fn()  # warm-up
            samples = []
            for _ in range(args.steps):
                dist.barrier()
                samples.append(fn())
            times[name].append(statistics.median(s for s, _ in samples))
            fwd[name].append(statistics.median(f for _, f in samples))
    return {"times": times, "forward": fwd, "schedule": {k: v for k, v in plan.comm_schedule.items() if k != "timeline"},
            "breakdown": plan.time_breakdown, "op_compute_s": sum(n["compute_s"] for n in plan.nodes if n["kind"] == "op"), "grad_bytes": sum(p.numel() * 4 for p in pms["sync"].parameters()),
            "setup_s": setup_s, "plan_step_s": plan.step_time_s, "load": os.getloadavg()}


def _overlap_rank(rank, world, args):
    """Median seconds of: matmuls alone (the backward's kind of work), all-reduces alone, and both
    at once (the all-reduces issued asynchronously, then the matmuls, then waited)."""
    import torch.distributed as dist

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    bufs = [torch.ones(args.overlap_mb << 18) for _ in range(args.overlap_count)]  # float32: MB * 2**20 / 4

    def compute():
        for _ in range(args.overlap_mm):
            torch.mm(a, b)

    def comm(then=lambda: None):
        works = [dist.all_reduce(x, async_op=True) for x in bufs]
        then()
        for w in works:
            w.wait()

    out = {}
    for name, fn in (("compute", compute), ("all_reduce", comm), ("both", lambda: comm(compute))) * args.rounds:
        fn()
        dist.barrier()
        t = time.perf_counter()
        fn()
        dist.barrier()  # the slower rank's time
        out.setdefault(name, []).append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in out.items()}


def measure_overlap(args) -> float:
    """ω = (t_c + t_a − t_both) / min(t_c, t_a), clipped to [0, 1]: 1 when the collectives hide
    completely behind compute, 0 when running both costs their sum."""
    from autopar.launch import run_local

    t = run_local(_overlap_rank, 2, args)[0]
    omega = min(1.0, max(0.0, (t["compute"] + t["all_reduce"] - t["both"]) / min(t["compute"], t["all_reduce"])))
    print(f"2 gloo ranks, 1 thread each: {args.overlap_mm} 512x512 mm {t['compute'] * 1e3:.1f} ms, {args.overlap_count} "
          f"async all_reduce of {args.overlap_mb} MiB {t['all_reduce'] * 1e3:.1f} ms, both {t['both'] * 1e3:.1f} ms "
          f"(medians of {args.rounds}); comm_compute_overlap = {omega:.2f}")
    return omega


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--hardware", default="local")
    ap.add_argument("--measure-overlap", action="store_true", help="measure ω (comm_compute_overlap) instead")
    ap.add_argument("--overlap-mm", type=int, default=40, help="--measure-overlap: matmuls per compute run")
    ap.add_argument("--overlap-mb", type=int, default=16, help="--measure-overlap: MiB per all-reduce")
    ap.add_argument("--overlap-count", type=int, default=6, help="--measure-overlap: all-reduces per run")
    args = ap.parse_args(argv)
    if args.measure_overlap:
        return measure_overlap(args)
    from autopar.launch import run_local

    r = run_local(_rank, 2, args)[0]
    med = {k: statistics.median(v) for k, v in r["times"].items()}  # in run order
    spread = {k: (min(v), max(v)) for k, v in r["times"].items()}
    print(f"GPT d={args.d} x {args.layers} layers, batch {args.batch} x {args.seq} on 2 gloo ranks, "
          f"{r['grad_bytes'] / 1e6:.1f} MB of gradients; load average {r['load'][0]:.1f}; setup {r['setup_s']:.0f} s")
    sched = r["schedule"]
    print(f"schedule ({sched['solver'].get('name')}, {sched['solver'].get('status')}): {len(sched['buckets'])} buckets, MB: "
          + " ".join(f"{b['bytes'] / 1e6:.1f}" for b in sched["buckets"]))
    print(f"{'forward+backward':<20} {'median':>9} {'min':>9} {'max':>9} {'forward':>9}   (median of {args.rounds} "
          f"round medians of {args.steps} steps; rank 0)")
    for k in med:
        f = statistics.median(r["forward"][k])
        print(f"  {k:<18} {med[k] * 1e3:8.1f}ms {spread[k][0] * 1e3:8.1f}ms {spread[k][1] * 1e3:8.1f}ms {f * 1e3:8.1f}ms")
    print(f"sync / scheduled  = {med['sync'] / med['scheduled']:.3f}   (> 1: the schedule is faster)")
    print(f"scheduled / ddp   = {med['scheduled'] / med['ddp']:.3f}   (<= 1: not slower than DDP)")
    print(f"communication exposed: sync {1e3 * (med['sync'] - med['compiled_compute']):.1f} ms, scheduled "
          f"{1e3 * (med['scheduled'] - med['compiled_compute']):.1f} ms, ddp {1e3 * (med['ddp'] - med['ddp_compute']):.1f} ms")
    p, tb = sched["predicted"], r["breakdown"]
    # forward+backward only: the ops' compute (the parameter nodes carry the optimizer step, not run here)
    before = r["op_compute_s"] + sum(tb.get(k, 0.0) for k in ("comm_fwd_s", "comm_bwd_s", "runtime_s")) - p["backward_s"]
    fw = {k: statistics.median(v) for k, v in r["forward"].items()}
    bwd = med["scheduled"] - fw["scheduled"]
    print(f"plan: {', '.join(f'{k} {v * 1e3:.1f} ms' for k, v in tb.items())}, of which ops {r['op_compute_s'] * 1e3:.1f} ms; "
          f"predicted before backward "
          f"{before * 1e3:.1f} ms (measured forward {fw['scheduled'] * 1e3:.1f}), backward compute {p['backward_s'] * 1e3:.1f} "
          f"ms (measured, no sync: {(med['compiled_compute'] - fw['compiled_compute']) * 1e3:.1f})")
    print(f"predicted backward makespan {p['makespan_s'] * 1e3:.1f} ms vs measured backward {bwd * 1e3:.1f} ms: "
          f"ratio {p['makespan_s'] / bwd:.3f}")
    print(f"predicted step {(before + p['makespan_s']) * 1e3:.1f} ms vs measured scheduled {med['scheduled'] * 1e3:.1f} ms: "
          f"ratio {(before + p['makespan_s']) / med['scheduled']:.3f} (check 3: within 25%)")
    for k, m in (("synchronous_s", "sync"), ("ddp_s", "ddp")):
        print(f"predicted {k[:-2]} step {(before + p[k]) * 1e3:.1f} ms vs measured {m} {med[m] * 1e3:.1f} ms: "
              f"ratio {(before + p[k]) / med[m]:.3f}")
    return med


if __name__ == "__main__":
    main()
