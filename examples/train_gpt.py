"""Compile the hand-written GPT (examples/gpt.py) and train it on 4 CPU ranks, dp=2 x tp=2.

    autopar run examples/train_gpt.py --nproc 4                  # d=64, 2 layers, 5 AdamW steps
    autopar run examples/train_gpt.py --nproc 4 -- --small       # d=32, 1 layer, 2 steps (the test)
    autopar run examples/train_gpt.py --nproc 2 -- --mesh tp=2   # any mesh with as many devices as ranks

Every rank builds the same model from the same seed and calls ``autopar.compile``; the loss is
inside the model (``gpt.WithLoss``), so the output is one number. The pins lay the model out
Megatron-style: the batch split over ``dp`` (from the token embedding on), q/k/v and fc1 split by
output features over ``tp``, proj and fc2 by input features. On a model this small the solver on
its own keeps everything replicated (communication costs more than it saves here); ``--auto``
shows that plan. Every step is checked against the same model trained in one process: the
script prints the largest difference of the losses, the gradients and the parameters, and exits
with status 1 if one is larger than the tolerance.
"""

from __future__ import annotations

import copy

import autopar
import common  # examples/common.py: the harness every training example shares
from gpt import WithLoss

LAYOUT = {
    "embedding": {"dp": "S(0)"},  # the token embedding's output: each dp rank takes half the batch
    "gpt.blocks.*.[qkv].weight": {"tp": "S(0)"},
    "gpt.blocks.*.fc1.*": {"tp": "S(0)"},
    "gpt.blocks.*.proj.weight": {"tp": "S(1)"},
    "gpt.blocks.*.fc2.weight": {"tp": "S(1)"},
}


def main() -> int:
    args = common.parse(common.arg_parser(__doc__, mesh="dp=2,tp=2"))
    config = dict(vocab=64, d=32, heads=4, layers=1, max_len=16) if args.small else \
        dict(vocab=128, d=64, heads=4, layers=2, max_len=64)
    batch, seq = (4, 8) if args.small else (8, 32)

    rank = common.start()
    mesh = autopar.Mesh.parse(args.mesh)
    model = WithLoss(**config)
    ids = common.token_ids(config["vocab"], batch, seq)
    ref = copy.deepcopy(model)  # the same model, trained in this one process
    pm = autopar.compile(model, mesh, example_inputs=(ids,), pins=common.pins(LAYOUT, mesh, args.auto))
    if rank == 0:
        print(pm.plan.summary())
    return common.train_and_compare(pm, ref, lambda m: m(ids), args.steps)  # the loss is the model's output


if __name__ == "__main__":
    raise SystemExit(main())
