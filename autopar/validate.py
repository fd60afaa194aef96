"""Run a plan for real on local ranks and set what it measured beside what the plan predicted.

``autopar validate --model MODEL --mesh tp=2`` (see cli.py) plans MODEL, runs training steps on
local gloo ranks, and reports the whole step's predicted and measured time and, per collective
type, the predicted and measured bytes (counted on the real collectives).
"""

from __future__ import annotations

import statistics
import time


def step_time(step, steps: int) -> float:
    """The median of ``steps`` timed calls of ``step`` (each after a barrier), on the slowest rank:
    a step ends when its slowest rank does. Every rank must call it."""
    import torch
    import torch.distributed as dist

    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest)


def _on_rank(rank, world, spec: dict) -> dict:
    import torch
    import torch.utils._pytree as pytree

    from . import models
    from .api import compile as compile_model
    from .codegen.comm_counter import CollectiveCounter, predicted_bytes
    from .mesh import Mesh

    torch.manual_seed(0)
    model, inputs = models.build(spec["model"], batch=spec["batch"], seq=spec["seq"], device="cpu")
    pm = compile_model(model, Mesh(spec["mesh"], hardware=spec["hardware"]), example_inputs=inputs, mode=spec["mode"])
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-4)  # what the plan prices

    def loss_of(out):
        return sum(t.float().pow(2).mean() for t in pytree.tree_leaves(out)
                   if isinstance(t, torch.Tensor) and t.dtype.is_floating_point)

    def step():
        if spec["mode"] == "train":
            loss_of(pm(*inputs)).backward()
            opt.step()
            opt.zero_grad()
        else:
            with torch.no_grad():
                pm(*inputs)

    step()  # warm-up
    with CollectiveCounter() as counter:
        step()
    # noise only ever slows a step: keep the best round's median
    slowest = min(step_time(step, spec["steps"]) for _ in range(spec["rounds"]))
    return {"predicted_s": pm.plan.step_time_s, "measured_s": slowest, "breakdown": pm.plan.time_breakdown,
            "classes": {"predicted": predicted_classes(pm.plan), "measured": _measured_classes(step, slowest)},
            "predicted_bytes": predicted_bytes(pm.plan), "measured_bytes": dict(counter.bytes),
            "plan": pm.plan.to_json()}


CLASSES = ("matmul", "attention", "conv", "reduction", "pointwise", "view", "comm", "optimizer", "other")
_BWD = {"mm": "matmul", "addmm": "matmul", "bmm": "matmul", "baddbmm": "matmul", "linear": "matmul",
        "scaleddotproduct": "attention", "convolution": "conv", "nativelayernorm": "reduction",
        "softmax": "reduction", "logsoftmax": "reduction", "sum": "reduction", "mean": "reduction",
        "redistribute": "comm", "totorchtensor": "comm", "fromtorchtensor": "comm", "contiguousgrad": "comm",
        "accumulategrad": "optimizer", "view": "view", "reshape": "view", "unsafeview": "view",
        "permute": "view", "transpose": "view", "t": "view", "expand": "view", "unsqueeze": "view",
        "squeeze": "view", "slice": "view", "select": "view", "split": "view", "unbind": "view", "alias": "view"}


def _class_of_event(name: str) -> str | None:
    """The cost class of a profiler event autopar labels or autograd names; None for others."""
    if name.startswith("autopar::"):
        return name.removeprefix("autopar::")
    if name.startswith("Optimizer."):
        return "optimizer"
    prefix = "autograd::engine::evaluate_function: "
    if not name.startswith(prefix):
        return None
    fn = name.removeprefix(prefix).split("::")[-1].lower().replace("_", "")
    base = fn.split("backward")[0]
    return _BWD.get(base, next((c for k, c in _BWD.items() if len(k) > 3 and base.startswith(k)), "pointwise"))


def _measured_classes(step, step_s: float) -> dict:
    """One step under torch.profiler with autopar's nodes labelled, summed per cost class and
    scaled to ``step_s`` (the profiler slows the step); what no class claims is "other"."""
    import torch

    from .codegen import runtime

    runtime.LABEL_OPS = True
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            step()
            total = time.perf_counter() - t0
    finally:
        runtime.LABEL_OPS = False
    out = dict.fromkeys(CLASSES, 0.0)
    for ev in prof.events():
        cls = _class_of_event(ev.name)
        parent, nested = ev.cpu_parent, False
        while parent is not None and not nested:  # count the outermost classified event only
            nested = _class_of_event(parent.name) is not None
            parent = parent.cpu_parent
        if cls is not None and not nested:
            out[cls] += ev.cpu_time_total * 1e-6
    out["other"] = max(0.0, total - sum(out.values()))
    return {k: v * step_s / total for k, v in out.items()}


def predicted_classes(plan) -> dict:
    """The plan's predicted step, split into the same classes (collectives: comm and optimizer)."""
    from .cost_models.profile import op_class

    out = dict.fromkeys(CLASSES, 0.0)
    for n in plan.nodes:
        if n["kind"] == "op":
            out[op_class(n["op"])] += n["compute_s"]
        elif n["kind"] == "param":
            out["optimizer"] += n["compute_s"]
    b = plan.time_breakdown
    out["comm"] += b.get("comm_fwd_s", 0.0) + b.get("comm_bwd_s", 0.0)
    out["optimizer"] += b.get("grad_sync_s", 0.0)  # gradient all-reduces run in the accumulate hooks
    out["other"] += b.get("runtime_s", 0.0)
    return out


def validate(model: str, mesh: dict, *, hardware: str = "local", mode: str = "train", steps: int = 5, rounds: int = 3,
             batch: int | None = None, seq: int | None = None, profile: bool = True) -> dict:
    """Plan and run ``model`` on local ranks; return predicted and measured time and bytes.

    On the ``local`` preset the model's ops are profiled first (``autopar profile``; cached), so
    the plan is costed with measured op times unless ``profile=False``."""
    from .errors import AutoparError
    from .launch import RankError, run_local

    world = 1
    for n in mesh.values():
        world *= n
    spec = {"model": model, "mesh": mesh, "hardware": hardware, "mode": mode, "steps": steps, "rounds": rounds,
            "batch": batch, "seq": seq}
    if hardware == "local" and profile:  # cost the plan with this device's measured ops (cached)
        from .profiler import profile_model

        profile_model(model, mesh, mode=mode, batch=batch, seq=seq, verbose=False)
    try:
        return run_local(_on_rank, world, spec)[0]
    except RankError as exc:
        raise AutoparError(f"validating {model} on {mesh} failed on the local ranks:\n{exc}") from None


def report(res: dict) -> str:
    """The predicted-against-measured tables, as text."""
    p, m = res["predicted_s"], res["measured_s"]
    lines = [f"step time   predicted {p * 1e3:10.3f} ms   measured {m * 1e3:10.3f} ms   "
             f"error {(p - m) / m:+.1%}", "", "predicted breakdown: " +
             ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in res["breakdown"].items()), "",
             f"{'op class':<15} {'predicted ms':>13} {'measured ms':>12}"]
    for cls in CLASSES:
        a, b = res["classes"]["predicted"][cls], res["classes"]["measured"][cls]
        if a or b:
            lines.append(f"{cls:<15} {a * 1e3:>13.3f} {b * 1e3:>12.3f}")
    lines += ["(measured per class: one step under torch.profiler, scaled to the measured step; comm includes "
              "waiting for the other ranks; optimizer includes gradient accumulation, sync hooks and the AdamW step)",
              "", f"{'collective':<15} {'predicted bytes':>16} {'measured bytes':>16}"]
    ops = sorted(set(res["predicted_bytes"]) | set(res["measured_bytes"]))
    for op in ops:
        a, b = res["predicted_bytes"].get(op, 0), res["measured_bytes"].get(op, 0)
        lines.append(f"{op:<15} {a:>16,d} {b:>16,d}   {'equal' if a == b else f'{(a - b) / max(b, 1):+.1%}'}")
    if not ops:
        lines.append("(the plan communicates nothing)")
    return "\n".join(lines)
