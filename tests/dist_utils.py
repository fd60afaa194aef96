"""Run a function on N real gloo ranks (separate processes) and collect what each returns."""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, outdir):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    result = None
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = ("ok", fn(rank, world, *args))
    except BaseException:  # report everything, including assertion failures, to the parent
        result = ("error", traceback.format_exc())
    finally:
        with open(os.path.join(outdir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 600):
    """Spawn ``world`` gloo ranks running ``fn(rank, world, *args)``; return their results by rank.

    A rank that raises makes this raise AssertionError with that rank's traceback.
    """
    sys.path.insert(0, os.path.dirname(__file__))
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_worker, args=(world, _free_port(), fn, args, outdir), nprocs=world,
                                 join=False, start_method="spawn")
        ctx.join(timeout)
        results = []
        for r in range(world):
            path = os.path.join(outdir, f"{r}.pkl")
            if not os.path.exists(path):
                raise AssertionError(f"rank {r} produced no result (crashed or timed out)")
            with open(path, "rb") as f:
                results.append(pickle.load(f))
    errors = [f"--- rank {r} ---\n{res[1]}" for r, res in enumerate(results) if res[0] == "error"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [res[1] for res in results]
