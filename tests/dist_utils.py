"""Run a test function on N real gloo ranks (separate processes) and collect what each returns."""

from __future__ import annotations

import os
import sys

from autopar.launch import RankError, run_local


def run_ranks(fn, world: int, *args, timeout: float = 600):
    """``fn(rank, world, *args)`` on ``world`` gloo ranks; a failing rank fails the test with its traceback."""
    sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import test helpers by name
    try:
        return run_local(fn, world, *args, timeout=timeout)
    except RankError as exc:
        raise AssertionError(str(exc)) from None
