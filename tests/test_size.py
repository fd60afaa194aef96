"""The core stays small enough to read in an afternoon (STYLE.md): a line budget, checked in CI."""

from pathlib import Path

BUDGET = 14200  # lines of Python in autopar/ but its command line and reports, blank lines and comments included (6000 until issue 3 added
# profiled ops, segmented collective fits and the memory model; 7500 until issue 4 added pipelined
# execution, four schedules in the stage solver and their pass-by-pass simulation; 8500 until issue 5
# added ring attention with its own backward, the Triton block kernel, Megatron-SP/CP strategies and
# costs, and the variable-length batch MILP, about 1,100 lines; 10000 until issue 6 added MoE detection
# on the graph with its probes, expert-parallel dispatch, the Triton permute/combine kernels, the
# expert placement ILP and routing statistics, about 1,650 lines; 11500 until issue 7 added the fusion
# pass with its Triton code generator, the int8/top-k/PowerSGD compressors with their quantize
# kernels, calibration and the per-layer compression ILP, about 1,600 lines; 13200 until issue 8's
# repeated-layer fold, annotation memo and mesh-search memory floor, about 100 lines; 13300 until
# issue 8's tracing of deep models from 2- and 3-block exports, passes/replicate.py, about 300 lines;
# 13600 until issue 8's planning-speed work: DTensor's greedy redistribution rule on placements,
# its rules without their own pricing, the memory floor before edges, about 60 lines; 13700 until
# issue 9 took the command line and the reports out of this count (12,471 lines of core then), and
# then added the z3 model of a plan request that explains an infeasible one, solvers/feasibility.py
# and its hooks, about 240 lines, the plan's model FLOPs, about 20, and issue 10's sharded,
# reshardable, atomically swapped checkpoints, codegen/checkpoint.py, about 300; the JSON Schema
# took 30 lines out of plan.py; 13060 until issue 10's failure handling (the launcher naming the
# failing rank, the rank runner, collective timeouts on every group), about 250 lines, its
# boundary checks and parser hardening, about 70, and issue 11's communication schedule: the
# bucketing model with its exact DP and CP-SAT forms, solvers/comm_schedule.py, about 420 lines,
# the pass that reads ready times off a plan, about 220, and the asynchronous bucket executor,
# codegen/buckets.py, about 120; 14150 until the schedule modelled how much of a collective
# really overlaps compute (the preset's comm_compute_overlap, measured 0.14 on this host), a
# Pareto-front dp and its CP-SAT terms, about 65 lines)
# The command line and what it prints: argument handling, the inspect tables with their rich
# rendering, the HTML report's SVG charts, progress bars. Counted on their own so that presentation
# never crowds out the compiler; 2100 since issue 9 (rich layout, charts, progress, about 800 lines).
SURFACE = ("cli.py", "report.py", "html_report.py", "progress.py")
SURFACE_BUDGET = 2100


def _lines(paths) -> int:
    return sum(len(p.read_text().splitlines()) for p in paths)


def test_core_fits_its_line_budget():
    root = Path(__file__).resolve().parent.parent / "autopar"
    lines = _lines(p for p in root.rglob("*.py") if not (p.parent == root and p.name in SURFACE))
    assert lines <= BUDGET, f"autopar/ has {lines} lines, over the {BUDGET}-line budget; simplify before adding"


def test_command_line_and_reports_fit_their_line_budget():
    root = Path(__file__).resolve().parent.parent / "autopar"
    lines = _lines(root / name for name in SURFACE)
    assert lines <= SURFACE_BUDGET, f"{', '.join(SURFACE)} have {lines} lines, over {SURFACE_BUDGET}; simplify first"
