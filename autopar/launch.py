"""Run a function on N local ranks (separate processes, gloo over loopback) and collect results.

Used by ``autopar profile`` and by the tests; ``autopar run`` launches whole scripts instead.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback

from .errors import AutoparError


def _worker(rank, world, fn, args, outdir):
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # one local "device" is one rank with one thread, as under torchrun
    result = None
    try:  # rendezvous through a file in this run's own directory: no port to collide with another run's
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(outdir, 'store')}", rank=rank, world_size=world)
        result = ("ok", fn(rank, world, *args))
    except AutoparError as e:  # a user-facing error already says what is wrong: no traceback
        result = ("error", f"{type(e).__name__}: {e}")
    except BaseException:  # noqa: BLE001 - hand every failure, assertions included, to the launcher
        result = ("error", traceback.format_exc())
    finally:
        with open(os.path.join(outdir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        if dist.is_initialized():
            dist.destroy_process_group()


class RankError(RuntimeError):
    """One or more ranks failed; the message holds each failing rank's traceback."""


def run_local(fn, world: int, *args, timeout: float = 900) -> list:
    """Spawn ``world`` gloo ranks running ``fn(rank, world, *args)``; return their results by rank.

    ``fn`` must be importable by name (a module-level function). A rank that raises, crashes or
    outlives ``timeout`` seconds makes this raise RankError.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="autopar-ranks-") as outdir:
        ctx = mp.start_processes(_worker, args=(world, fn, args, outdir), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(max(0.1, deadline - time.monotonic())):  # returns as each rank exits
                if time.monotonic() >= deadline:
                    break
        except Exception:  # noqa: BLE001 - a rank died; its result file (if any) says why
            pass
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
        results = []
        for r in range(world):
            path = os.path.join(outdir, f"{r}.pkl")
            if not os.path.exists(path):
                raise RankError(f"rank {r} of {world} produced no result (crashed or timed out)")
            with open(path, "rb") as f:
                results.append(pickle.load(f))
    errors = [f"--- rank {r} ---\n{res[1]}" for r, res in enumerate(results) if res[0] != "ok"]
    if errors:
        raise RankError("\n".join(errors))
    return [res[1] for res in results]
