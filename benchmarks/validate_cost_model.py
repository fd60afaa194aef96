"""Whole-step prediction error and collective bytes, predicted against measured, on 2 gloo ranks.

    python benchmarks/validate_cost_model.py [--steps 5] [--rounds 3]

For the hand-written GPT (``examples/gpt.py``: tiny, small, medium) and HF GPT-2 tiny (the
``tiny-gpt2`` preset, also at batch 8 x 64 tokens, where its plans communicate), on ``tp=2`` and
``dp=2``: plan with the calibrated ``local`` preset and this device's op profile (made first,
cached), run the plan (``autopar validate``), and print the predicted and measured step time,
the error, and whether every collective's bytes were predicted exactly. Issue 3 asks for at most
20% error. Per-op-class tables: ``autopar validate --model M --mesh tp=2``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

CASES = [  # model, batch, seq
    ("examples/gpt.py:tiny", None, None),
    ("examples/gpt.py:small", None, None),
    ("examples/gpt.py:medium", None, None),
    ("tiny-gpt2", None, None),
    ("tiny-gpt2", 8, 64),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    from autopar.validate import validate

    rows = []
    for model, batch, seq in CASES:
        for mesh in ({"tp": 2}, {"dp": 2}):
            r = validate(model, mesh, steps=args.steps, rounds=args.rounds, batch=batch, seq=seq)
            p, m = r["predicted_s"], r["measured_s"]
            ops = sorted(set(r["predicted_bytes"]) | set(r["measured_bytes"]))
            exact = all(r["predicted_bytes"].get(o, 0) == r["measured_bytes"].get(o, 0) for o in ops)
            size = f" b{batch}xs{seq}" if batch else ""
            rows.append((f"{model}{size}", ",".join(f"{k}={v}" for k, v in mesh.items()), p, m, (p - m) / m,
                         sum(r["measured_bytes"].values()), exact))
            print(f"  {rows[-1][0]} {rows[-1][1]}: predicted {p * 1e3:.2f} ms, measured {m * 1e3:.2f} ms", flush=True)
    print(f"\n{'model':<30} {'mesh':<6} {'predicted ms':>12} {'measured ms':>11} {'error':>7} {'bytes sent':>11} "
          f"{'bytes':>8}")
    for model, mesh, p, m, err, sent, exact in rows:
        print(f"{model:<30} {mesh:<6} {p * 1e3:>12.2f} {m * 1e3:>11.2f} {err:>+7.1%} {sent:>11,d} "
              f"{'exact' if exact else 'DIFFER':>8}")
    worst = max(abs(r[4]) for r in rows)
    print(f"\nworst |error| {worst:.1%}: {'PASS' if worst <= 0.2 else 'FAIL'} against 20%; "
          f"bytes exact in {sum(r[6] for r in rows)}/{len(rows)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
