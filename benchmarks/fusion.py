"""Fused vs unfused training step of the hand-written GPT, on one GPU.

    python benchmarks/fusion.py [--steps 20] [--d 1024] [--batch 16] [--seq 512]

Compiles examples/gpt.py's GPT twice on a one-device mesh (NCCL), with ``fusion=True`` (the
pointwise and row-reduction chains run as the Triton kernels codegen/fusion.py generates) and
``fusion=False`` (the same program's unfused torch ops), and prints the median forward+backward
time of each and their ratio (and the plain model's in eager torch), measured in one run, plus the
kernels the plan recorded.

Without a CUDA device there is nothing to measure: on a CPU the kernels run only under Triton's
interpreter (about 70x slower than eager, FACTS.md), so the script lists the kernels that would be
generated and says so, rather than printing a meaningless time.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

import torch  # noqa: E402

import autopar  # noqa: E402


def _step_time(pm, ids, steps: int) -> float:
    times = []
    for _ in range(steps):
        for p in pm.parameters():
            p.grad = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = pm(ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = sorted(times[2:])  # the first steps compile the kernels
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    import gpt

    torch.manual_seed(0)
    model = gpt.GPT(vocab=8192, d=args.d, heads=args.d // 64, layers=4, max_len=args.seq)
    ids = torch.randint(0, 8192, (args.batch, args.seq))
    if not torch.cuda.is_available():
        plan = autopar.plan(model, autopar.Mesh({"dp": 1}, hardware="h100-sxm"), (ids,))
        kernels = plan.fusion["kernels"]
        print(f"no CUDA device here: nothing measured. On a GPU, compile would generate {len(kernels)} fused kernels "
              f"for this GPT ({sum(len(k['groups']) for k in kernels)} fused groups):")
        for k in kernels:
            print(f"  {k['name']}  {k['pattern']:<9}  x{len(k['groups'])}  {' '.join(o.removeprefix('aten.') for o in k['ops'])}")
        return
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    model, ids = model.cuda(), ids.cuda()
    mesh = autopar.Mesh({"dp": 1}, hardware="h100-sxm")
    plan = autopar.plan(model, mesh, (ids,))
    results = {}
    for fused in (False, True):  # compile turns the model's parameters into DTensors: compile a copy
        pm = autopar.compile(copy.deepcopy(model), mesh, (ids,), plan=plan, fusion=fused)
        results[fused] = (_step_time(pm, ids, args.steps), pm.plan.fusion)
    eager = _step_time(model, ids, args.steps)
    unfused, (fused_t, record) = results[False][0], results[True]
    print(f"GPT d={args.d}, 4 layers, batch {args.batch} x {args.seq}, fp32, {torch.cuda.get_device_name()}")
    print(f"fusion backend: {record['backend']} ({record['reason']}); {len(record['kernels'])} kernels, "
          f"{sum(len(k['groups']) for k in record['kernels'])} fused groups")
    print(f"step (fwd+bwd), median of {args.steps - 2}: unfused {unfused * 1e3:.2f} ms, fused {fused_t * 1e3:.2f} ms, "
          f"fused/unfused {fused_t / unfused:.3f}; the plain model in eager torch {eager * 1e3:.2f} ms")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
