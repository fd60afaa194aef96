"""autopar against DDP and torch's parallelize_module on 2 CPU gloo ranks, in one run.

    python benchmarks/bench_dp_tp.py [--steps 10] [--model mlp|gpt]

Prints the median training-step time of each, the ratios to autopar, and the collective bytes
autopar's plan predicted next to the bytes the run actually sent (counted by intercepting every
functional collective that DTensor issues). Timings are this noisy 2-core machine's; only ratios
from the same run mean anything.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def _time(step, steps):
    import torch.distributed as dist

    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bench(rank, world, model_name, steps):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torch.nn.parallel import DistributedDataParallel as DDP

    import autopar
    from autopar.codegen.comm_counter import CollectiveCounter, predicted_bytes
    from models import MLP, build, logits

    if model_name == "mlp":
        torch.manual_seed(0)
        model, inputs = MLP(d=512, hidden=2048, out=512), (torch.randn(256, 512),)
    else:
        model, inputs = build("gpt")
    base = copy.deepcopy(model)
    res = {}

    # autopar twice: on a "dp" axis (parameters stay replicated) and on a "tp" axis (free choice)
    for axis in ("dp", "tp"):
        pm = autopar.compile(copy.deepcopy(base), autopar.Mesh({axis: world}), example_inputs=inputs)
        opt = torch.optim.SGD(pm.parameters(), lr=1e-3)

        def ap_step():
            logits(pm(*inputs)).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

        ap_step()
        with CollectiveCounter() as counter:
            ap_step()
        key = f"autopar {axis}={world}"
        res[key] = _time(ap_step, steps)
        res[key + " measured_bytes"] = counter.bytes
        res[key + " predicted_bytes"] = predicted_bytes(pm.plan)
        res[key + " predicted_step_s"] = pm.plan.step_time_s
        res[key + " plan"] = {k: str(v) for k, v in pm.plan.param_placements.items()}

    # DDP: the data-parallel baseline. Each rank takes its slice of the batch.
    ddp = DDP(copy.deepcopy(base))
    dopt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    shard = tuple(x.chunk(world)[rank] for x in inputs)

    def ddp_step():
        logits(ddp(*shard)).float().pow(2).mean().backward()
        dopt.step()
        dopt.zero_grad()

    ddp_step()
    res["ddp"] = _time(ddp_step, steps)

    # parallelize_module with a Megatron-style plan (column-parallel then row-parallel).
    if model_name == "mlp":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        tp = parallelize_module(copy.deepcopy(base), mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
        topt = torch.optim.SGD(tp.parameters(), lr=1e-3)

        def tp_step():
            tp(*inputs).float().pow(2).mean().backward()
            topt.step()
            topt.zero_grad()

        tp_step()
        res["parallelize_module"] = _time(tp_step, steps)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", default="mlp", choices=["mlp", "gpt"])
    args = ap.parse_args()
    from dist_utils import run_ranks

    res = run_ranks(_bench, 2, args.model, args.steps)[0]
    print(f"model={args.model} ranks=2 (gloo, CPU) steps={args.steps}; median ms per training step")
    ours = [k for k in ("autopar dp=2", "autopar tp=2")]
    best = min(res[k] for k in ours)
    for k in ours + ["ddp", "parallelize_module"]:
        if k in res:
            extra = f"   predicted {res[k + ' predicted_step_s'] * 1e3:8.2f} ms" if k in ours else ""
            print(f"  {k:<20} {res[k] * 1e3:8.2f} ms   time / best autopar: {res[k] / best:.2f}x{extra}")
    for k in ours:
        print(f"{k} plan: {res[k + ' plan']}")
        print("  collective bytes per step, predicted by the plan vs sent by the run:")
        pred, meas = res[k + " predicted_bytes"], res[k + " measured_bytes"]
        for op in sorted(set(pred) | set(meas)):
            p, m = pred.get(op, 0), meas.get(op, 0)
            print(f"    {op:<15} predicted {p:>12,d}  measured {m:>12,d}  {'equal' if p == m else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
