"""A rank that raises, dies or hangs ends the run promptly, and the report names it (issue 10).

``autopar run`` cases run the CLI in a subprocess on 4 ranks, as a user would; ``run_local`` cases
use the test launcher. Each measures how long the run took: none may wait out a timeout meant for
a hang it does not have.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import autopar
from autopar.launch import Failure, RankError, explain_failures, run_local

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# rank 1 fails in the forward pass of the second step; the plan has tensor-parallel collectives
# in every forward (the pins), so the other ranks are waiting for rank 1 in one when it fails
SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, {tests!r})
    import autopar
    from models import MLP

    how = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    pins = {{"fc1.weight": {{"tp": "S(0)"}}, "fc2.weight": {{"tp": "S(1)"}}}}
    pm = autopar.compile(MLP(), autopar.Mesh({{"dp": 2, "tp": 2}}), (torch.randn(8, 32),), time_limit_s=5, pins=pins)
    steps = []

    def fail_on_step_2(module, args):
        steps.append(1)
        if rank == 1 and len(steps) == 2:
            if how == "raise":
                raise RuntimeError("injected failure on rank 1")
            os._exit(3)

    pm.register_forward_pre_hook(fail_on_step_2)
    for step in range(4):
        pm(torch.randn(8, 32)).sum().backward()
        print(f"rank {{rank}} finished step {{step}}", flush=True)
    dist.destroy_process_group()
""")


def _autopar_run(tmp_path, how: str) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "fails.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "autopar.cli", "run", str(script), "--nproc", "4", "--timeout", "60",
                        "--", how], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return r, time.monotonic() - t0


def test_autopar_run_names_the_rank_that_raises_in_forward(tmp_path):
    r, took = _autopar_run(tmp_path, "raise")
    assert took < 60, f"the run took {took:.0f} s"
    assert r.returncode != 0
    assert "autopar: rank 1 of 4 failed: RuntimeError: injected failure on rank 1" in r.stderr, r.stderr[-3000:]
    tb = r.stderr.split("rank 1: Traceback (most recent call last):", 1)[1]  # rank 1's own traceback, printed once
    assert 'raise RuntimeError("injected failure on rank 1")' in tb and "in fail_on_step_2" in tb
    assert "rank 1 finished step 0" in r.stdout and "rank 1 finished step 1" not in r.stdout
    print(f"autopar run, rank 1 raises: {took:.1f} s")


def test_autopar_run_names_the_rank_that_dies(tmp_path):
    r, took = _autopar_run(tmp_path, "exit")
    assert took < 60, f"the run took {took:.0f} s"
    assert r.returncode == 3  # the failing rank's own exit code
    assert "autopar: rank 1 of 4 died (exit code 3)" in r.stderr, r.stderr[-3000:]
    print(f"autopar run, rank 1 dies: {took:.1f} s")


def _allreduce_steps(rank, world, how):
    import torch
    import torch.distributed as dist

    for step in range(3):
        if rank == 1 and step == 1:
            if how == "raise":
                raise ValueError("rank 1 gave up")
            time.sleep(600)  # "hang": alive, but never joins the collective
        t = torch.ones(4)
        dist.all_reduce(t)
    return t.sum().item()


def test_run_local_names_the_raising_rank_promptly():
    sys.path.insert(0, str(TESTS))  # the spawned ranks import this module by name
    t0 = time.monotonic()
    with pytest.raises(RankError) as info:
        run_local(_allreduce_steps, 4, "raise", timeout=120)
    took = time.monotonic() - t0  # mostly 4 processes importing torch; the collective timeout is 300 s
    assert info.value.rank == 1 and took < 60, (took, str(info.value))
    msg = str(info.value)
    assert msg.startswith("rank 1 of 4 failed: ValueError: rank 1 gave up\nTraceback") and "in _allreduce_steps" in msg
    assert "rank 0 failed after it" in msg  # the others are told apart from the cause
    print(f"run_local, rank 1 raises: {took:.1f} s")


def test_run_local_names_a_hanging_rank_after_the_collective_timeout(monkeypatch):
    sys.path.insert(0, str(TESTS))
    monkeypatch.setenv("AUTOPAR_TIMEOUT", "3")
    t0 = time.monotonic()
    with pytest.raises(RankError) as info:
        run_local(_allreduce_steps, 2, "hang", timeout=120)
    took = time.monotonic() - t0
    assert info.value.rank == 1 and took < 30, (took, str(info.value))
    assert str(info.value).startswith("rank 1 of 2 never reached the collective that rank 0 timed out in")
    print(f"run_local, rank 1 hangs (3 s timeout): {took:.1f} s")


def test_explain_failures_tells_cause_from_effect():
    peer = "RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:1234"
    timeout = "RuntimeError: [unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete"
    # the first exception is the cause; a peer's closed socket is an effect even when its clock is earlier
    root, head, tb, after = explain_failures(
        4, {1: Failure(1, 10.0, "ValueError: bad", "Traceback ...\nValueError: bad"), 0: Failure(0, 9.9, peer)},
        {0: 1, 1: 1, 2: None, 3: None})
    assert (root, head, tb) == (1, "rank 1 of 4 failed: ValueError: bad", "Traceback ...\nValueError: bad")
    assert after == [f"rank 0 failed after it: {peer}", "ranks 2, 3 stopped"]
    # a rank that died without an exception comes first
    root, head, _, _ = explain_failures(2, {0: Failure(0, 1.0, peer)}, {0: 1, 1: -9})
    assert root == 1 and head.startswith("rank 1 of 2 died (signal SIGKILL)")
    # a collective timed out: the rank still running never joined it
    root, head, _, after = explain_failures(3, {0: Failure(0, 5.0, timeout), 2: Failure(2, 5.1, timeout)},
                                            {0: 1, 1: None, 2: 1})
    assert root == 1 and head.startswith("rank 1 of 3 never reached the collective that rank 0 timed out in")
    assert after == [f"rank 2 failed after it: {timeout}"]


def test_compile_without_a_process_group_says_how_to_launch():
    import torch
    import torch.distributed as dist

    from models import MLP

    assert not dist.is_initialized()
    with pytest.raises(autopar.MeshError, match=r"no process group is running.*autopar run.*autopar\.plan"):
        autopar.compile(MLP(), autopar.Mesh({"dp": 2}), (torch.randn(4, 32),))
