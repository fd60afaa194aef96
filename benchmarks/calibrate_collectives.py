"""Check 3 of issue 3: does the α-β fit reproduce measured gloo collective times within 25%?

Usage::

    python benchmarks/calibrate_collectives.py                 # 2 ranks, 1 KiB .. 64 MiB
    python benchmarks/calibrate_collectives.py --nproc 2 --max-bytes 16777216 --repeats 9

Runs :func:`autopar.cost_models.calibrate.measure_collectives` on local gloo ranks (loopback),
fits ``t = k_a·α + k_b·S/bw`` per collective with comm.collective_time's ring factors (least
squares in relative error), and prints, per collective, each size's measured (median of the
max over ranks) and fitted time, then the fitted links and whether each fit is within the
threshold at every size. Exit code 0 if every fitted collective is, 1 otherwise. Nothing is written.

Run it on an idle machine: other work on the host (tests, builds) adds time to every call.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autopar.cli import profile_sections, render_text  # noqa: E402
from autopar.cost_models.calibrate import DEFAULT_SIZES, fit_all, launch_local  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--max-bytes", type=int, default=DEFAULT_SIZES[-1])
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per size and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per size; the lowest median is kept")
    ap.add_argument("--threshold", type=float, default=0.25, help="max relative error allowed (default 0.25)")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    sizes = [s for s in DEFAULT_SIZES if s <= args.max_bytes]
    times = launch_local(args.nproc, sizes=sizes, repeats=args.repeats, rounds=args.rounds)
    fits, failed = fit_all(times, args.nproc)
    print(f"# {args.nproc} gloo ranks on this host, best of {args.rounds} medians of {args.repeats} calls per size, "
          f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after\n")
    sys.stdout.write(render_text(profile_sections(times, fits, failed, args.nproc)))
    print()
    ok = True
    for op in times:
        if op not in fits:
            print(f"{op:15s} SKIP  ({failed.get(op)})")
            continue
        err = fits[op][2]
        passed = err <= args.threshold
        ok &= passed
        print(f"{op:15s} {'PASS' if passed else 'FAIL'}  max relative error {100 * err:.1f}% (threshold {100 * args.threshold:.0f}%)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
