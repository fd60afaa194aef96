"""Regenerate the golden plans: ``python tests/golden/regen.py``.

A golden plan changes only when the planner's decisions change; say why in the commit message.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import autopar  # noqa: E402
from models import MLP, Block  # noqa: E402


def cases():
    """name -> (model, example_inputs, mesh); all on the meta device, planned for real hardware."""
    with torch.device("meta"):
        return {
            "gpt_block_tp8_h100": (Block(4096, 32, fused_qkv=False), (torch.randn(1, 1024, 4096),),
                                   autopar.Mesh({"tp": 8}, hardware="h100-sxm")),
            "mlp_dp8_h100": (MLP(d=128, hidden=256, out=128), (torch.randn(1 << 18, 128),),
                             autopar.Mesh({"dp": 8}, hardware="h100-sxm")),
            "gpt_block_dp2_tp4_a100": (Block(2048, 16, fused_qkv=False), (torch.randn(8, 2048, 2048),),
                                       autopar.Mesh({"dp": 2, "tp": 4}, hardware="a100-80g")),
        }


def plan(name):
    model, inputs, mesh = cases()[name]
    return autopar.plan(model, mesh, inputs)


if __name__ == "__main__":
    for name in cases():
        plan(name).save(os.path.join(HERE, f"{name}.json"))
        print("wrote", name)
