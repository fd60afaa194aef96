"""``autopar profile --hardware local``: time a model's ops on this device and cache them.

The planner asks the cost model for every (op, local shapes, dtype) that any strategy on the
mesh would run; this driver collects exactly those calls (annotation with ``collect=True``),
times the ones the cache lacks on one rank with one thread (as a local rank runs), measures the
runtime's per-op and per-parameter overheads once, refits the per-class roofline efficiencies,
and saves the cache (cost_models/profile.py says what is in it and how the planner uses it).
"""

from __future__ import annotations

import statistics
import time


def _on_rank(rank, world, spec: dict) -> dict:
    from . import models
    from .cost_models.hardware import load_hardware
    from .cost_models.profile import load_profile, measure_overheads, new_profile, refit, time_recipe
    from .passes.annotate import annotate
    from .passes.trace import trace

    say = print if spec["verbose"] else (lambda *a, **k: None)
    prof = (None if spec["refresh"] else load_profile()) or new_profile()
    model, inputs = models.build(spec["model"], batch=spec["batch"], seq=spec["seq"], device="cpu")
    tg = trace(model, inputs, {})
    an = annotate(tg, spec["mesh"], load_hardware("local"), spec["mode"], collect=True)
    wanted = an.ctx.wanted
    todo = [k for k in wanted if k not in prof.ops]
    say(f"{len(wanted)} distinct op calls on {spec['mesh']}: {len(wanted) - len(todo)} cached, timing {len(todo)}",
        flush=True)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1,))  # ops the runtime runs on DTensors are timed on DTensors
    t0, timed = time.perf_counter(), 0
    for i, key in enumerate(todo):
        w = wanted[key]
        try:
            prof.ops[key] = {**time_recipe(w["recipe"], repeats=spec["repeats"], mesh=mesh), "op": w["recipe"]["op"],
                             "class": w["class"], "roofline_s": w["roofline_s"]}
            prof.failed.pop(key, None)
            timed += 1
        except Exception as exc:  # an op that cannot run on random inputs keeps its roofline estimate
            prof.failed[key] = f"{type(exc).__name__}: {str(exc)[:200]}"
        if (i + 1) % 25 == 0 or i + 1 == len(todo):
            say(f"  timed {i + 1}/{len(todo)} ops in {time.perf_counter() - t0:.1f} s", flush=True)
    if spec["refresh"] or "step_s" not in prof.overhead:
        say("measuring the runtime's per-op and per-parameter overheads on a 1-rank mesh ...", flush=True)
        prof.overhead = measure_overheads(repeats=spec["repeats"])
    refit(prof)
    path = prof.save()
    failed = [k for k in wanted if k in prof.failed]
    rows = sorted(((wanted[k]["recipe"]["op"], wanted[k]["recipe"]["shapes"], prof.ops[k]["fwd_s"],
                    prof.ops[k]["train_s"], wanted[k]["roofline_s"]) for k in wanted if k in prof.ops),
                  key=lambda r: -r[3])
    return {"path": str(path), "wanted": len(wanted), "timed": timed, "cached": len(wanted) - len(todo),
            "failed": {k: prof.failed[k] for k in failed}, "overhead": prof.overhead,
            "efficiency": prof.efficiency, "rows": rows, "device": prof.device, "torch": prof.torch}


def _collective_overhead(rank, world, repeats: int) -> tuple[float, float]:
    """(a, b): a collective costs a step ``a + b·bytes`` seconds beyond its link time, on
    ``world`` ranks. Each sample computes (a few ms of matmuls), then redistributes a Partial
    DTensor to Replicate and uses it, as a step does; less the matmuls and the preset's α-β time
    of that all-reduce; at 64 KiB and 1 MiB, a line through the two. On hosts whose communication
    threads sleep while a rank computes, this is most of what a collective costs a step, and far
    more than a back-to-back benchmark shows."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate

    from .cost_models.comm import collective_time
    from .cost_models.hardware import load_hardware

    mesh = init_device_mesh("cpu", (world,))
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    hw = load_hardware("local")
    link = hw.link_for("all_reduce", hw.intra_node)

    def compute():
        for _ in range(8):
            a @ b

    def extra(rows):
        x = DTensor.from_local(torch.ones(rows, 256), mesh, [Partial()])

        def sample(with_collective):
            compute()
            t0 = time.perf_counter()
            compute()
            if with_collective:
                x.redistribute(mesh, [Replicate()]).to_local().sum()
            return time.perf_counter() - t0

        for _ in range(3):
            sample(True)
        pairs = [(sample(True), sample(False)) for _ in range(max(repeats, 5) * 3)]
        return statistics.median(t - c for t, c in pairs) - collective_time("all_reduce", rows * 1024, world, link)

    (s0, e0), (s1, e1) = [(rows * 1024, extra(rows)) for rows in (64, 1024)]
    per_byte = max(0.0, (e1 - e0) / (s1 - s0))
    return max(0.0, e0 - per_byte * s0), per_byte


def profile_model(model: str, mesh: dict, *, mode: str = "train", batch: int | None = None, seq: int | None = None,
                  repeats: int = 7, refresh: bool = False, verbose: bool = True) -> dict:
    """Profile ``model``'s ops for ``mesh`` on this device (one spawned rank); return a summary."""
    from .errors import AutoparError
    from .launch import RankError, run_local

    spec = {"model": model, "mesh": dict(mesh), "mode": mode, "batch": batch, "seq": seq, "repeats": repeats,
            "refresh": refresh, "verbose": verbose}
    try:
        res = run_local(_on_rank, 1, spec)[0]
        from .cost_models.profile import load_profile

        prof = load_profile(res["path"])
        if refresh or "collective_s_ranks" not in prof.overhead:
            if verbose:
                print("measuring what a collective costs a step on 2 ranks ...", flush=True)
            runs = [run_local(_collective_overhead, 2, repeats)[0] for _ in range(3)]  # a noisy host: median of 3
            prof.overhead["collective_s"] = statistics.median(a for a, _ in runs)
            prof.overhead["collective_s_per_byte"] = statistics.median(b for _, b in runs)
            prof.overhead["collective_s_ranks"] = 2
            prof.save()
            res["overhead"] = prof.overhead
        return res
    except RankError as exc:
        raise AutoparError(f"profiling {model} on {mesh} failed:\n{exc}") from None


def report(res: dict, top: int = 12) -> str:
    lines = [f"op profile of {res['device']} (torch {res['torch']}): {res['path']}",
             f"{res['wanted']} distinct op calls: {res['timed']} timed now, {res['cached']} from the cache, "
             f"{len(res['failed'])} could not run (roofline estimate kept)", "",
             f"{'op':<42} {'local input shapes':<34} {'fwd us':>9} {'fwd+bwd us':>11} {'roofline us':>12}"]
    for op, shapes, fwd, train, roof in res["rows"][:top]:
        lines.append(f"{op:<42} {str(shapes)[:34]:<34} {fwd * 1e6:>9.1f} {train * 1e6:>11.1f} {roof * 1e6:>12.2f}")
    if len(res["rows"]) > top:
        lines.append(f"... {len(res['rows']) - top} more")
    lines += ["", f"{'class':<10} {'ops':>5} {'base us':>9} {'efficiency':>11} {'max rel err':>12}"]
    for cls, f in res["efficiency"].items():
        lines.append(f"{cls:<10} {f['n']:>5} {f['base_s'] * 1e6:>9.2f} {f['eff']:>11.3f} {f['max_rel_error']:>12.1%}")
    o = res["overhead"]
    lines += ["", "runtime overhead: "
              f"{o.get('op_fwd_s', 0) * 1e6:.1f} us per op forward, {o.get('op_train_s', 0) * 1e6:.1f} us per op "
              f"forward+backward, {o.get('param_s', 0) * 1e6:.1f} us per trainable parameter (hook + AdamW step), "
              f"{o.get('collective_s', 0) * 1e6:.1f} us + {o.get('collective_s_per_byte', 0) * 1e9:.2f} ns/byte per "
              "collective a step issues (beyond its link time), "
              f"{o.get('step_s', 0) * 1e6:.1f} us per step"]
    for k, why in list(res["failed"].items())[:5]:
        lines.append(f"not timed: {k[:100]}: {why}")
    return "\n".join(lines)
