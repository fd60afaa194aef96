"""Plan a model for a cluster you do not have: no GPUs, no process group, weights on `meta`.

    python examples/plan_offline.py                # GPT-3 1.3B on 64 H100s, dp=8 x tp=8
    python examples/plan_offline.py llama3-8b 8 8  # any preset, dp, tp
"""

import sys

import autopar
from autopar import models


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "gpt3-1.3b"
    dp, tp = (int(x) for x in sys.argv[2:4]) if len(sys.argv) > 3 else (8, 8)
    model, inputs = models.build(name)  # on the meta device: no memory is allocated
    mesh = autopar.Mesh({"dp": dp, "tp": tp}, hardware="h100-sxm")
    plan = autopar.plan(model, mesh, inputs, progress=lambda msg: print("  ", msg))
    print(plan.summary())
    plan.save(f"{name}-dp{dp}-tp{tp}.json")
    print(f"saved {name}-dp{dp}-tp{tp}.json; inspect it with: autopar inspect {name}-dp{dp}-tp{tp}.json")


if __name__ == "__main__":
    main()
