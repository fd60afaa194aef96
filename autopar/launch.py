"""Run local ranks and say which one failed.

``run_local`` runs a function on N local ranks (separate processes, gloo over loopback) and
collects results: ``autopar profile``, ``validate`` and the tests use it. ``run_script`` is ``autopar
run``: torch.distributed.run's agent, each rank's script wrapped by ``autopar._rankrun``. Either
way, when one rank fails the others are stopped at once, and ``explain_failures`` names the rank
that failed first, with its traceback, apart from the ranks that failed because of it. Collectives
time out after ``$AUTOPAR_TIMEOUT`` seconds (``mesh.collective_timeout``), so a rank that hangs
ends the run too.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

from .errors import AutoparError

TIMEOUT_ENV, FAILURE_DIR_ENV = "AUTOPAR_TIMEOUT", "AUTOPAR_FAILURE_DIR"
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Failure:
    """One rank's exception: when it was caught (time.time()), its first line, its traceback."""

    rank: int
    time: float
    error: str
    traceback: str = ""

    @classmethod
    def of(cls, rank: int, exc: BaseException, with_traceback: bool = True) -> "Failure":
        text = f"{type(exc).__name__}: {str(exc).strip()}".rstrip(": ")
        first = text.splitlines()[0][:300]
        return cls(rank, time.time(), first, "".join(traceback.format_exception(exc)) if with_traceback else
                   text * (text != first))


_PEER_FAILED = re.compile(r"(closed|reset) by peer|errors while waiting for send/recv from rank")  # gloo's words


def _ranks(rs) -> str:
    return f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}"


def explain_failures(world: int, failures: dict, exitcodes: dict) -> tuple[int | None, str, str, list]:
    """(root rank, headline, its traceback, what the others did) of a failed run. ``failures``:
    {rank: Failure} of the ranks that raised; ``exitcodes``: {rank: code} of the ranks that did not end cleanly, None for one
    stopped while still running. The root is a rank that died without a Python exception (os._exit,
    a signal, a native crash); else, when the first exception is a collective timing out, the ranks
    that were still running (they never joined it); else the rank whose exception came first, not
    counting those that say a peer's connection closed."""
    crashed = sorted(r for r, c in exitcodes.items() if c not in (None, 0) and r not in failures)
    stopped = sorted(r for r, c in exitcodes.items() if c is None and r not in failures)
    first = min(failures.values(), key=lambda f: (_PEER_FAILED.search(f.error) is not None, f.time, f.rank),
                default=None)  # a peer's closed socket is an effect, even when its clock came first
    tb = ""
    if crashed:
        root, code = crashed[0], exitcodes[crashed[0]]
        how = f"signal {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"exit code {code}"
        head = (f"rank {root} of {world} died ({how}) and produced no result (no Python exception: os._exit, a "
                "signal or a native crash)")
    elif first is not None and "timed out" in first.error.lower() and stopped:
        root = stopped[0]
        head = (f"{_ranks(stopped)} of {world} never reached the collective that rank {first.rank} timed out in "
                f"(still running: stuck, or on another code path); {first.error}")
    elif first is not None:
        root, head, tb = first.rank, f"rank {first.rank} of {world} failed: {first.error}", first.traceback
    else:
        return None, f"the run failed with no rank failing ({world} ranks)", "", []
    after = [f"rank {f.rank} failed after it: {f.error[:200]}" for f in sorted(failures.values(), key=lambda f: f.rank)
             if f.rank != root and not (f is first and root in stopped)]
    after += [f"rank {r} died with code {exitcodes[r]} after it" for r in crashed[1:]]
    rest = [r for r in stopped if r != root]
    after += [f"{_ranks(rest)} stopped"] if rest else []
    return root, head, tb.rstrip(), after


class RankError(RuntimeError):
    """A rank failed: ``rank`` is the one that failed first (None if none is known); the message
    names it, with its traceback, and says what the other ranks did."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


def _worker(rank, world, fn, args, outdir, timeout_s):
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), **{TIMEOUT_ENV: str(timeout_s)})
    torch.set_num_threads(1)  # one local "device" is one rank with one thread, as under torchrun
    try:  # rendezvous through a file in this run's own directory: no port to collide with another run's
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(outdir, 'store')}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s))
        result = ("ok", fn(rank, world, *args))
    except AutoparError as e:  # a user-facing error already says what is wrong: no traceback
        result = ("error", Failure.of(rank, e, with_traceback=False))
    except BaseException as e:  # noqa: BLE001 - hand every failure, assertions included, to the launcher
        result = ("error", Failure.of(rank, e))
    path = os.path.join(outdir, f"{rank}.pkl")
    with open(path + ".tmp", "wb") as f:
        pickle.dump(result, f)
    os.replace(path + ".tmp", path)  # the launcher never reads half a result
    if result[0] == "error":  # exit now: closing the sockets fails the peers' pending collectives at once
        os._exit(1)
    dist.destroy_process_group()


def run_local(fn, world: int, *args, timeout: float = 900) -> list:
    """Spawn ``world`` gloo ranks running ``fn(rank, world, *args)``; return their results by rank.

    ``fn`` must be importable by name (a module-level function). When a rank raises or dies, the
    others are stopped at once and this raises RankError naming it; a collective that waits
    longer than ``$AUTOPAR_TIMEOUT`` (default 300 s, at most ``timeout``) fails, and a run longer
    than ``timeout`` seconds is stopped.
    """
    import torch.multiprocessing as mp

    collective_s = min(timeout, float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S))
    with tempfile.TemporaryDirectory(prefix="autopar-ranks-") as outdir:
        ctx = mp.start_processes(_worker, args=(world, fn, args, outdir, collective_s), nprocs=world,
                                 join=False, start_method="spawn")
        procs, results, deadline, stop_at = ctx.processes, {}, time.monotonic() + timeout, None

        def collect():
            for r in range(world):
                path = os.path.join(outdir, f"{r}.pkl")
                if r not in results and os.path.exists(path):
                    with open(path, "rb") as f:
                        results[r] = pickle.load(f)

        while len(results) < world and time.monotonic() < (stop_at or deadline):
            collect()
            failed = any(res[0] != "ok" for res in results.values()) or any(
                p.exitcode not in (None, 0) for p in procs)
            if failed and stop_at is None:  # a moment for the ranks it failed to record why, then stop them
                stop_at = time.monotonic() + 1.0
            time.sleep(0.05)
        alive = {r for r, p in enumerate(procs) if p.is_alive()}
        for r in alive:
            procs[r].terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        collect()
    if len(results) == world and all(res[0] == "ok" for res in results.values()):
        return [results[r][1] for r in range(world)]
    failures = {r: res[1] for r, res in results.items() if res[0] != "ok"}
    exitcodes = {r: None if r in alive else p.exitcode for r, p in enumerate(procs) if r not in results}
    if not failures and all(c is None for c in exitcodes.values()):
        raise RankError(f"{_ranks(sorted(exitcodes))} of {world} still running after the {timeout:g} s limit",
                        min(exitcodes))
    root, head, tb, after = explain_failures(world, failures, exitcodes)
    raise RankError("\n".join([head, *([tb] if tb else []), *after]), root)


def run_script(script: str, script_args: list[str], *, nproc: int, addr: str, port: int, timeout: float) -> int:
    """``autopar run``: ``script`` on ``nproc`` local ranks under torch.distributed.run; its exit
    code. A failing rank's traceback and a line naming it are printed (autopar._rankrun)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="autopar-run-") as faildir:
        env = {**os.environ, TIMEOUT_ENV: f"{timeout:g}", FAILURE_DIR_ENV: faildir,  # ranks import this autopar
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        if nproc > 1:  # what torchrun sets, without its banner
            env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [sys.executable, "-m", "autopar._rankrun", "agent", "--nnodes", "1", "--nproc-per-node", str(nproc),
               "--master-addr", addr, "--master-port", str(port), "--module", "autopar._rankrun", "rank", script,
               *script_args]
        return subprocess.run(cmd, env=env).returncode
