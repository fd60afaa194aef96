"""Plan the hand-written GPT offline on two meshes, save and reload the plans, inspect, explain and diff them.

    python examples/inspect_export.py            # d=1024, 4 layers, 16 x 512 tokens, on 8 H100s: tp=8 and dp=2 x tp=4
    python examples/inspect_export.py --small    # d=64, 1 layer, 4 x 16 tokens (the test)

What it does is what the command line does with a saved plan; each step names its command:

    autopar plan examples/gpt.py:small --mesh tp=8 --hardware h100-sxm --out plan_tp.json
    autopar inspect plan_tp.json --html report.html     # tables; a self-contained HTML report
    autopar explain plan_tp.json blocks.0.fc1.weight    # why one parameter was placed as it was
    autopar diff plan_tp.json plan_dp_tp.json           # what changed from one plan to the other

A plan is plain JSON (``Plan.save`` / ``Plan.load``, validated on load); ``Plan.hash()`` is the
sha256 of its canonical form without solver timings, so it is the same on every rank that made the
same decisions and survives a save and load. Files are written to the current directory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import autopar
from autopar import cli
from gpt import GPT  # examples/gpt.py, next to this script


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="d=64, 1 layer, 4 x 16 tokens, 4 devices (the test)")
    args = ap.parse_args()
    if args.small:
        config, (batch, seq), meshes = dict(vocab=128, d=64, heads=4, layers=1, max_len=16), (4, 16), \
            {"tp": {"tp": 4}, "dp_tp": {"dp": 2, "tp": 2}}
    else:
        config, (batch, seq), meshes = dict(vocab=32000, d=1024, heads=16, layers=4, max_len=512), (16, 512), \
            {"tp": {"tp": 8}, "dp_tp": {"dp": 2, "tp": 4}}
    with torch.device("meta"):  # planning needs shapes only: no memory, no process group
        model, ids = GPT(**config), torch.zeros(batch, seq, dtype=torch.long)

    # 1. plan on two meshes and save each plan (autopar plan ... --out)
    paths = {}
    for name, axes in meshes.items():
        plan = autopar.plan(model, autopar.Mesh(axes, hardware="h100-sxm"), (ids,))
        paths[name] = f"plan_{name}.json"
        plan.save(paths[name])
        # 2. load it back: the same decisions, the same hash
        loaded = autopar.Plan.load(paths[name])
        if loaded.hash() != plan.hash():
            print(f"FAIL: {paths[name]} reads back with another hash")
            return 1
        print(f"saved {paths[name]}: hash {plan.hash()[:16]} (the same after Plan.load), "
              f"predicted step {plan.step_time_s * 1e3:.3f} ms, {len(plan.collectives)} collectives")

    # 3. the tables and the HTML report (autopar inspect plan_tp.json --html report.html)
    print(f"\n$ autopar inspect {paths['tp']} --html report.html")
    rc = cli.main(["inspect", paths["tp"], "--html", "report.html"])
    print(f"report.html: {Path('report.html').stat().st_size} bytes")
    # 4. one parameter's placement, the alternatives and their costs (autopar explain)
    print(f"\n$ autopar explain {paths['tp']} blocks.0.fc1.weight")
    rc = rc or cli.main(["explain", paths["tp"], "blocks.0.fc1.weight"])
    # 5. the two plans side by side (autopar diff)
    print(f"\n$ autopar diff {paths['tp']} {paths['dp_tp']}")
    rc = rc or cli.main(["diff", paths["tp"], paths["dp_tp"]])
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
