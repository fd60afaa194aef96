"""How long planning takes at scale: issue 8's three cases, end to end from the CLI to plan.json.

    python benchmarks/planning_at_scale.py [--only 0]

Each case runs ``autopar plan ...`` in a fresh process (so tracing, the joint graph, annotation,
every mesh tried and writing the plan all count) and reads the written plan: graph nodes, the
decision nodes after repeated layers are folded, CP-SAT's variables (0 when the reductions solve
the problem exactly by dynamic programming) and the predicted step. The target times are issue
8's; the table says which are met. Timings are wall-clock on this machine, one run each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CASES = [
    ("llama3-8b dp=8,tp=8 16x8192", ["llama3-8b", "--mesh", "dp=8,tp=8", "--batch", "16", "--seq", "8192"], 10.0),
    ("llama3-70b --devices 1024", ["llama3-70b", "--devices", "1024"], 60.0),
    ("gpt3-175b --devices 1024", ["gpt3-175b", "--devices", "1024"], 60.0),
]


def run(args: list[str], out: str) -> tuple[float, dict, str]:
    cmd = [sys.executable, "-m", "autopar.cli", "plan", *args, "--hardware", "h100-sxm", "--out", out]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        return dt, {}, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
    with open(out) as f:
        return dt, json.load(f), ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", type=int, action="append", help="run only these case numbers (0, 1, 2)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, cli, target) in enumerate(CASES):
            if args.only and k not in args.only:
                continue
            dt, plan, err = run(cli, os.path.join(tmp, f"plan{k}.json"))
            s = plan.get("solver", {})
            order = ["pp", "dp", "ep", "cp", "tp"]  # outer to inner (JSON sorts the keys)
            mesh = ",".join(f"{a}={n}" for a, n in sorted(plan.get("mesh", {}).items(),
                                                          key=lambda kv: order.index(kv[0]) if kv[0] in order else 9))
            rows.append([name, f"{dt:.1f} s", f"{target:.0f} s", "met" if plan and dt <= target else "NOT met",
                         mesh or err, str(s.get("nodes_in", "-")), str(s.get("folded_nodes", "-")),
                         str(s.get("cp_vars", 0) if plan else "-"), f"{plan['step_time_s']:.3f} s" if plan else "-"])
            print(f"{name}: {dt:.1f} s", file=sys.stderr)
    headers = ["case", "wall", "target", "", "mesh", "decision nodes", "after dedup", "cp-sat vars", "step"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
