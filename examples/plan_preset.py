"""Plan a model for a cluster you do not have: no GPUs, no process group, weights on ``meta``.

    python examples/plan_preset.py                                # GPT-3 1.3B on 64 H100s, dp=8 x tp=8
    python examples/plan_preset.py llama3-8b --mesh dp=2,tp=8     # any preset (autopar.models), any mesh
    python examples/plan_preset.py mixtral-8x7b --mesh dp=2,ep=8 --hardware a100-80g
    python examples/plan_preset.py --small                        # GPT-2 (124M) on 4 H100s, dp=2 x tp=2 (the test)

The model is built on the meta device, so planning GPT-3 175B takes no memory. The script prints
the plan's summary and the layout of the first block's parameters, and saves the plan JSON
(``autopar inspect PLAN.json`` shows all of it; see examples/inspect_export.py).
"""

from __future__ import annotations

import argparse

import autopar
from autopar import models


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", help=f"a preset: {', '.join(models.list_presets())} (default gpt3-1.3b)")
    ap.add_argument("--mesh", help="mesh axes, outer to inner (default dp=8,tp=8)")
    ap.add_argument("--hardware", default="h100-sxm", help="hardware preset (default h100-sxm)")
    ap.add_argument("--small", action="store_true", help="gpt2 on dp=2,tp=2 (the test)")
    args = ap.parse_args()
    name = args.model or ("gpt2" if args.small else "gpt3-1.3b")
    mesh = autopar.Mesh.parse(args.mesh or ("dp=2,tp=2" if args.small else "dp=8,tp=8"), hardware=args.hardware)

    model, inputs = models.build(name)  # on the meta device: no memory is allocated
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e9:.3g}B parameters, "
          f"input {tuple(inputs[0].shape)}, mesh {args.mesh or mesh.axes} on {args.hardware}")
    plan = autopar.plan(model, mesh, inputs, progress=lambda msg: print("  ", msg))
    print(plan.summary())
    first = [fqn for fqn in plan.param_placements if ".0." in fqn]
    for fqn in first:
        print(f"  {fqn:<48} {' '.join(f'{a}={p}' for a, p in plan.param_placements[fqn].items())}")
    out = f"{name}-{'-'.join(f'{a}{n}' for a, n in mesh.axes.items())}.json"
    plan.save(out)
    print(f"saved {out}; inspect it with: autopar inspect {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
