"""The harness the training examples share: compile on every rank, train, compare with one process.

examples/common.py is not run on its own; ``examples/train_*.py`` and ``examples/moe.py``
import it (``python examples/X.py`` and ``autopar run examples/X.py`` both put examples/ on
``sys.path``). Each example follows the same pattern, and keeps in itself what is its own (the
model, its layout pins, what it prints about the plan)::

    args = common.parse(common.arg_parser(__doc__, mesh="dp=2,tp=2"))  # --small --steps --mesh --auto
    rank = common.start()                     # process group up, seed 0: every rank builds the same model
    model, ids = ..., common.token_ids(vocab, batch, seq)
    ref = copy.deepcopy(model)                # the same model, trained in this one process
    pm = autopar.compile(model, mesh, example_inputs=(ids,), pins=common.pins(LAYOUT, mesh, args.auto))
    return common.train_and_compare(pm, ref, loss_fn, args.steps)

``train_and_compare`` runs a few AdamW steps on both, prints every step's loss next to the one
process's and then the largest differences, on rank 0::

    step 0: loss 4.15346  (1 process: 4.15346)
    max |loss diff| vs 1 process: 0.00e+00
    max |grad diff| vs 1 process: 4.77e-07
    max |param diff| vs 1 process: 9.41e-06
    OK: matches 1 process

and returns 1 (the script's exit status) if a difference is over ``TOLERANCE``
(tests/test_examples.py reads these lines back).
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.distributed as dist

import autopar

TOLERANCE = {"loss": 1e-4, "grad": 1e-4, "param": 1e-4}


def arg_parser(doc: str, mesh: str, auto: bool = True) -> argparse.ArgumentParser:
    """``--small``, ``--steps``, ``--mesh`` (default ``mesh``) and, with ``auto``, ``--auto``; add your own."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="the smallest meaningful configuration (tests)")
    ap.add_argument("--steps", type=int, help="optimizer steps (default 5; 2 with --small)")
    ap.add_argument("--mesh", default=mesh, help=f"mesh axes, outer to inner (default {mesh})")
    if auto:
        ap.add_argument("--auto", action="store_true", help="no pins: the solver chooses every placement")
    return ap


def parse(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """``ap.parse_args()``, with ``--steps`` defaulting to 5 (2 with ``--small``)."""
    args = ap.parse_args()
    args.steps = args.steps or (2 if args.small else 5)
    return args


def start() -> int:
    """Join the ranks ``autopar run`` started (gloo, CPU) and seed 0, so every rank builds the same model.
    Returns this rank."""
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    return dist.get_rank()


def token_ids(vocab: int, batch: int, seq: int) -> torch.Tensor:
    """A fixed batch of token ids (its own seed), the same on every rank."""
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def pins(layout: dict, mesh: autopar.Mesh, auto: bool = False) -> dict | None:
    """The example's ``LAYOUT`` pins on the axes ``mesh`` has (a pin on an axis it lacks is dropped);
    None with ``--auto``, which leaves every placement to the solver."""
    return None if auto else {k: v for k, v in layout.items() if set(v) <= set(mesh.axes)}


def max_diff(pm, ref, grad: bool) -> float:
    """Largest |compiled - one process| over every parameter this rank holds (or its gradient; a
    pipeline rank holds only its stage's), taken over every rank."""
    ref_params = dict(ref.named_parameters())
    worst = torch.zeros(())
    with torch.no_grad():
        for fqn, p in pm.named_parameters():
            mine, theirs = (p.grad, ref_params[fqn].grad) if grad else (p, ref_params[fqn])
            worst = torch.maximum(worst, (mine.full_tensor() - theirs).abs().max())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def train_and_compare(pm, ref, loss_fn: Callable, steps: int, train_step: Callable | None = None) -> int:
    """Train ``pm`` (compiled) and ``ref`` (the same model in this process) side by side for
    ``steps`` AdamW steps, print the losses and the largest differences (rank 0), close the
    process group, and return the exit status: 1 if a difference is over ``TOLERANCE``.

    ``loss_fn(model)`` is the loss of one forward on the batch. ``train_step()``, if given, does
    the compiled model's forward and backward instead (``pm.train_step`` of a pipeline) and
    returns its loss."""
    rank = dist.get_rank()
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    diff = dict.fromkeys(TOLERANCE, 0.0)
    for step in range(steps):
        if train_step is None:
            loss = loss_fn(pm)
            loss.backward()
        else:
            loss = train_step()
        ref_loss = loss_fn(ref)
        ref_loss.backward()
        diff["loss"] = max(diff["loss"], abs(loss.item() - ref_loss.item()))
        diff["grad"] = max(diff["grad"], max_diff(pm, ref, grad=True))
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.5f}  (1 process: {ref_loss.item():.5f})")
    diff["param"] = max_diff(pm, ref, grad=False)
    bad = [k for k, tol in TOLERANCE.items() if diff[k] > tol]
    if rank == 0:
        for k in TOLERANCE:
            print(f"max |{k} diff| vs 1 process: {diff[k]:.2e}")
        print("FAIL: " + ", ".join(f"{k} over {TOLERANCE[k]:g}" for k in bad) if bad else "OK: matches 1 process")
    dist.destroy_process_group()
    return 1 if bad else 0
