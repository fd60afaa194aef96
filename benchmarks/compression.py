"""Compressed gradient all-reduce, measured: bytes and step time per method on local gloo ranks.

    python benchmarks/compression.py [--nproc 2] [--steps 5]

The hand-written GPT (examples/gpt.py, d=256), planned on {dp: N}: every parameter's gradient
is all-reduced (the only collectives of a backward here), uncompressed or as ``int8``, ``topk:0.01``
(DGC) or ``powersgd:4`` (codegen/compress.py). For each method it prints the bytes the
collectives moved in one backward (counted from the profiler, codegen/comm_counter.py) next to
the prediction (codegen/compress.py ``wire_bytes``), both as ratios to the uncompressed run, the
gradient's relative L2 error against the uncompressed gradient of the same step, and the median
step time as a ratio to the uncompressed one, all from one run. Then what the solver chooses for
the same model on a10g-eth10g (10 Gb/s Ethernet) and on h100-sxm (NVLink) at a 1024 x 128 batch.
On 2 CPU cores a codec's work is not hidden and loopback gloo is fast, so CPU step times say how
much the codecs cost, not what a slow network saves; the bytes are what carry over.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

import gpt  # noqa: E402
import torch  # noqa: E402

import autopar  # noqa: E402

METHODS = ("none", "int8", "topk:0.01", "powersgd:4")
CONFIG = dict(vocab=512, d=256, heads=4, layers=2, max_len=128)


def _data(batch=16, seq=64):
    return torch.randint(0, CONFIG["vocab"], (batch, seq), generator=torch.Generator().manual_seed(1))


def _rank(rank, world, plan_json, steps, preset):
    import torch.distributed as dist

    from autopar.codegen.comm_counter import CollectiveCounter
    from autopar.codegen.compress import wire_bytes

    base = autopar.Plan.from_json(plan_json)
    ids = _data()
    out = {}
    for method in METHODS:
        torch.manual_seed(0)
        model = gpt.WithLoss(**CONFIG)
        plan = autopar.Plan.from_json(plan_json)
        plan.compression = {"grads": {f: {"method": method} for f in base.param_placements}}
        pm = autopar.compile(model, autopar.Mesh({"dp": world}, hardware=preset), (ids,), plan=plan)
        times = []
        for step in range(steps):
            for p in pm.parameters():
                p.grad = None
            dist.barrier()
            t0 = time.perf_counter()
            loss = pm(ids)
            if step == 0:
                with CollectiveCounter() as counter:
                    loss.backward()
            else:
                loss.backward()
            times.append(time.perf_counter() - t0)
        grads = {n: p.grad.full_tensor() for n, p in pm.named_parameters()}
        predicted = sum(wire_bytes(method, p.to_local().shape, world) for p in pm.parameters())
        out[method] = {"bytes": sum(counter.bytes.values()), "predicted": predicted, "grads": grads, "ops": (dict(counter.bytes), dict(counter.calls)),
                       "time": sorted(times[1:])[len(times[1:]) // 2]}
    return out if rank == 0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    from autopar.launch import run_local

    torch.manual_seed(0)
    # a preset with slow compute and a 0.1 s latency per collective makes the plan pure data
    # parallelism (the subject here; every redistribution costs more than a gradient sync)
    import json
    import tempfile

    with open(os.path.join(HERE, "..", "tests", "data", "compute_bound.json")) as f:
        doc = json.load(f)
    doc.update(name="dp-bench", intra_node={"bandwidth_Bps": 1e12, "latency_s": 0.1},
               inter_node={"bandwidth_Bps": 1e12, "latency_s": 0.1})
    preset = os.path.join(tempfile.mkdtemp(), "dp_bench.json")
    with open(preset, "w") as f:
        json.dump(doc, f)
    torch.manual_seed(0)
    plan = autopar.plan(gpt.WithLoss(**CONFIG), autopar.Mesh({"dp": args.nproc}, hardware=preset), (_data(),))
    syncs = [c for c in plan.collectives if c["phase"] == "grad_sync"]
    print(f"GPT d=256 on dp={args.nproc} (gloo, CPU): {len(syncs)} gradient all-reduces per step, "
          f"{sum(c['bytes'] for c in syncs) / 2**20:.2f} MiB")
    res = run_local(_rank, args.nproc, plan.to_json(), args.steps, preset)[0]
    none = res["none"]
    # the backward also gathers a few saved activations again (runtime.Executor keeps them as
    # shards): the uncompressed run's non-all-reduce bytes, the same in every run, are set apart
    other = none["bytes"] - none["ops"][0].get("all_reduce", 0)
    print(f"backward collectives other than gradient syncs (re-gathered activations): {other / 2**20:.2f} MiB, "
          f"{sum(none['ops'][1].values()) - none['ops'][1].get('all_reduce', 0)} calls")
    print(f"{'method':<12} {'sync bytes/none':>15} {'predicted':>10} {'grad L2 err':>12} {'step/none':>10}")
    for m in METHODS:
        r = res[m]
        err = (sum(float((r["grads"][n] - none["grads"][n]).pow(2).sum()) for n in none["grads"])
               / sum(float(g.pow(2).sum()) for g in none["grads"].values())) ** 0.5
        print(f"{m:<12} {(r['bytes'] - other) / (none['bytes'] - other):>15.4f} {r['predicted'] / none['predicted']:>10.4f} "
              f"{err:>12.3g} {r['time'] / none['time']:>10.2f}")
    from autopar.compression import calibrate_compression

    torch.manual_seed(0)
    stats = calibrate_compression(gpt.WithLoss(**CONFIG), (_data(8, 128),), loss_fn=lambda loss: loss)
    with torch.device("meta"):
        big = gpt.WithLoss(**CONFIG)
    ids = torch.zeros(1024, 128, dtype=torch.long, device="meta")
    for hw, axes in (("a10g-eth10g", {"dp": 4}), ("h100-sxm", {"dp": 8})):
        p = autopar.plan(big, autopar.Mesh(axes, hardware=hw), (ids,), compression={"calibration": stats})
        chosen = {}
        for g in p.compression["grads"].values():
            chosen[g["method"]] = chosen.get(g["method"], 0) + 1
        pred = p.compression["predicted"]
        print(f"solver on {hw} {axes}: {chosen}; grad sync {pred['grad_sync_s'] * 1e3:.2f} -> "
              f"{pred['compressed_grad_sync_s'] * 1e3:.2f} ms + codec {pred['codec_s'] * 1e3:.2f} ms, exposed "
              f"{pred['exposed_s'] * 1e3:.2f} -> {pred['compressed_exposed_s'] * 1e3:.2f} ms, error {pred['rel_error']:.3f}")


if __name__ == "__main__":
    main()
