"""Run a plan for real on local ranks and set what it measured beside what the plan predicted.

``autopar validate --model MODEL --mesh tp=2`` (see cli.py) plans MODEL, runs training steps on
local gloo ranks, and reports the whole step's predicted and measured time and, per collective
type, the predicted and measured bytes (counted on the real collectives).
"""

from __future__ import annotations

import statistics
import time


def _on_rank(rank, world, spec: dict) -> dict:
    import torch
    import torch.distributed as dist
    import torch.utils._pytree as pytree

    from . import models
    from .api import compile as compile_model
    from .codegen.comm_counter import CollectiveCounter, predicted_bytes
    from .mesh import Mesh

    torch.manual_seed(0)
    model, inputs = models.build(spec["model"], batch=spec["batch"], seq=spec["seq"], device="cpu")
    pm = compile_model(model, Mesh(spec["mesh"], hardware=spec["hardware"]), example_inputs=inputs, mode=spec["mode"])
    opt = torch.optim.SGD(pm.parameters(), lr=1e-4)

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
    times = []
    for _ in range(spec["steps"]):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank does
    return {"predicted_s": pm.plan.step_time_s, "measured_s": float(slowest), "breakdown": pm.plan.time_breakdown,
            "predicted_bytes": predicted_bytes(pm.plan), "measured_bytes": dict(counter.bytes),
            "plan": pm.plan.to_json()}


def validate(model: str, mesh: dict, *, hardware: str = "local", mode: str = "train", steps: int = 5,
             batch: int | None = None, seq: int | None = None) -> dict:
    """Plan and run ``model`` on local ranks; return predicted and measured time and bytes."""
    from .errors import AutoparError
    from .launch import RankError, run_local

    world = 1
    for n in mesh.values():
        world *= n
    spec = {"model": model, "mesh": mesh, "hardware": hardware, "mode": mode, "steps": steps, "batch": batch, "seq": seq}
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
             f"{'collective':<15} {'predicted bytes':>16} {'measured bytes':>16}"]
    ops = sorted(set(res["predicted_bytes"]) | set(res["measured_bytes"]))
    for op in ops:
        a, b = res["predicted_bytes"].get(op, 0), res["measured_bytes"].get(op, 0)
        lines.append(f"{op:<15} {a:>16,d} {b:>16,d}   {'equal' if a == b else f'{(a - b) / max(b, 1):+.1%}'}")
    if not ops:
        lines.append("(the plan communicates nothing)")
    return "\n".join(lines)
