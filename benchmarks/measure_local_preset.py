"""Measure this machine and (optionally) write ``autopar/cost_models/presets/local.json``.

Usage::

    python benchmarks/measure_local_preset.py            # print the measured preset
    python benchmarks/measure_local_preset.py --write    # also write presets/local.json

What is measured, and how:

* ``peak_flops[dtype]``: best of 3 medians of ``2·n³ / t`` for an n×n @ n×n matmul (n = 1024).
* ``memory_bandwidth_Bps``: best of 3 medians of ``2·S / t`` for ``dst.copy_(src)`` of an S = 256 MiB tensor
  (S bytes read + S bytes written).
* ``intra_node`` / ``inter_node``: 2 local gloo ranks (torch.multiprocessing, loopback) run
  ``all_reduce`` on buffers of 4 KiB .. 16 MiB. For n = 2 the ring model is
  ``t = 2(n−1)α + 2((n−1)/n)·S/bw = 2α + S/bw``, so a least-squares line ``t = a + b·S`` (weighted
  1/t, i.e. relative error) gives ``α = a/2`` and ``bw = 1/b``. All local ranks share one host, so both links get these numbers.

Run it on an idle machine: the notes record the load average, and anything else running (tests,
other benchmarks) lowers every number. The numbers are for the whole host; N local ranks share it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PRESET = Path(__file__).resolve().parents[1] / "autopar" / "cost_models" / "presets" / "local.json"
SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20]


def _median_time(fn, repeats: int, warmup: int = 3, rounds: int = 3) -> float:
    """Best (lowest) of ``rounds`` medians: a VM's clock ramps up and is noisy, a peak should not be."""
    for _ in range(warmup):
        fn()
    medians = []
    for _ in range(rounds):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times))
    return min(medians)


def matmul_flops(dtype: torch.dtype, n: int = 1024, repeats: int = 9) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / _median_time(lambda: torch.mm(a, b), repeats)


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 9) -> float:
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_time(lambda: dst.copy_(src), repeats)


def _allreduce_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for size in SIZES:
        buf = torch.ones(size // 4, dtype=torch.float32)
        burst = 20 if size <= (256 << 10) else 4

        def step():
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(burst):
                dist.all_reduce(buf)
            return (time.perf_counter() - t0) / burst

        for _ in range(3):
            step()
        # best of 3 medians of 7 bursts: scheduler hiccups on a 2-core VM only ever add time
        results[size] = min(statistics.median(step() for _ in range(7)) for _ in range(3))
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def gloo_alpha_beta(world: int = 2) -> tuple[float, float, dict]:
    """Return (latency_s, bandwidth_Bps, raw {bytes: seconds}) fitted from gloo all_reduce."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_allreduce_worker, args=(world, port, queue), nprocs=world, start_method="spawn")
    raw = queue.get()
    sizes = np.array(sorted(raw), dtype=float)
    times = np.array([raw[int(s)] for s in sizes])
    slope, intercept = np.polyfit(sizes, times, 1, w=1 / times)  # relative error: small sizes count
    # t = 2(n-1)α + 2((n-1)/n)·S/bw
    alpha = max(intercept, 0.0) / (2 * (world - 1))
    bw = 2 * (world - 1) / world / slope
    return alpha, bw, raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"write {PRESET}")
    args = ap.parse_args()
    # One local "device" is one rank, and torchrun (like autopar run and the tests) gives each rank
    # one thread (OMP_NUM_THREADS=1): measure compute the way a rank sees it.
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"warning: 1-min load average is {load_before:.2f}; other work will skew the numbers")

    flops = {name: matmul_flops(getattr(torch, name)) for name in ("float32", "bfloat16", "float16")}
    mem_bw = copy_bandwidth()
    alpha, bw, raw = gloo_alpha_beta()
    link = {"bandwidth_Bps": float(f"{bw:.4g}"), "latency_s": float(f"{alpha:.4g}")}
    preset = {
        "schema": 1,
        "name": "local",
        "description": f"this host measured: {os.cpu_count()}-core {platform.machine()} CPU, gloo over loopback",
        "notes": (
            "Measured, not published: `python benchmarks/measure_local_preset.py --write` "
            f"(torch {torch.__version__}, {torch.get_num_threads()} threads, 1-min load average "
            f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after). peak_flops = best-of-3-medians 2n^3/t "
            "of 1024x1024 torch.mm per dtype; memory_bandwidth = best-of-3-medians 2S/t of a 256 MiB copy_; links = "
            "relative least-squares fit t = 2a + S/bw of 2-rank gloo all_reduce over 4 KiB..16 MiB. "
            "memory_capacity is host RAM. All local ranks share one host (devices_per_node = 8), "
            "so intra_node and inter_node are the same measured gloo link. "
            "Raw all_reduce times, best of 3 medians of bursts (bytes: s): "
            + ", ".join(f"{int(s)}: {raw[int(s)]:.3g}" for s in sorted(raw))
            + ". all_to_all_as_all_gather: gloo has no all-to-all, so DTensor all-gathers instead."
        ),
        "peak_flops": {k: float(f"{v:.4g}") for k, v in flops.items()},
        "memory_bandwidth_Bps": float(f"{mem_bw:.4g}"),
        "memory_capacity_bytes": float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
        "devices_per_node": 8,
        "intra_node": link,
        "inter_node": link,
        "all_to_all_as_all_gather": True,
    }
    text = json.dumps(preset, indent=2) + "\n"
    print(text)
    if args.write:
        PRESET.write_text(text)
        print(f"wrote {PRESET}")


if __name__ == "__main__":
    main()
