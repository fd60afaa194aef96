"""Check 3 of issue 3: does the α-β fit reproduce measured gloo collective times within 25%?

Usage::

    python benchmarks/calibrate_collectives.py                 # 2 ranks, 1 KiB .. 128 MiB
    python benchmarks/calibrate_collectives.py --nproc 2 --max-bytes 16777216 --repeats 5

Runs :func:`autopar.cost_models.calibrate.measure_collectives` on local gloo ranks (loopback):
per size, the fastest of ``--rounds`` interleaved rounds of ``--repeats`` timed bursts, max over
ranks. Fits each collective with :func:`~autopar.cost_models.calibrate.fit_segments`
(minimax relative error, one α-β line per size regime, comm.collective_time's ring factors) and
prints, per collective and size, the measured and fitted time and the relative error, then the
fitted regimes and PASS/FAIL of each collective's max error against ``--threshold``. Exit code 0
if every fitted collective passes, 1 otherwise. Nothing is written.

Run it on an idle machine: other work on the host (tests, builds) adds time to every call.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autopar.cli import profile_sections, render_text  # noqa: E402
from autopar.cost_models.calibrate import DEFAULT_SIZES, fit_all, launch_local  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--max-bytes", type=int, default=DEFAULT_SIZES[-1])
    ap.add_argument("--repeats", type=int, default=3, help="timed bursts per size and round (1 for calls over 10 ms)")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds over all sizes")
    ap.add_argument("--max-segments", type=int, default=3, help="size regimes allowed per collective (1: one line)")
    ap.add_argument("--threshold", type=float, default=0.25, help="max relative error allowed (default 0.25)")
    args = ap.parse_args()
    load_before, t0 = os.getloadavg()[0], time.perf_counter()
    sizes = [s for s in DEFAULT_SIZES if s <= args.max_bytes]
    times = launch_local(args.nproc, sizes=sizes, repeats=args.repeats, rounds=args.rounds)
    fits, failed = fit_all(times, args.nproc, max_segments=args.max_segments)
    print(f"# {args.nproc} gloo ranks on this host, fastest of {args.rounds} rounds x {args.repeats} bursts per size, "
          f"{time.perf_counter() - t0:.0f} s, 1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after\n")
    sys.stdout.write(render_text(profile_sections(times, fits, failed, args.nproc, args.threshold)))
    lines = fit_all(times, args.nproc, max_segments=1)[0]
    print("\nfor comparison, one minimax alpha-beta line over all sizes: max relative error "
          + ", ".join(f"{op} {100 * err:.1f}%" for op, (_, err) in lines.items()))
    return 0 if all(err <= args.threshold for _, err in fits.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
