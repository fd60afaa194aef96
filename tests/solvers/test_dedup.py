"""Repeated-layer dedup (solvers/intra_op.py fold_copies, passes/annotate.py repeated_layers): exact."""

import itertools

import numpy as np
import pytest
import torch

import autopar
from autopar.cost_models.hardware import load_hardware
from autopar.passes.annotate import annotate
from autopar.passes.trace import trace
from autopar.solvers.intra_op import ShardingProblem, evaluate, fold_copies, solve
from models import GPT


@pytest.mark.parametrize("axes,hardware", [({"dp": 2, "tp": 4}, "h100-sxm"), ({"tp": 8}, "a100-80g")])
def test_dedup_objective_equals_the_full_solve_on_a_4_layer_gpt(axes, hardware, monkeypatch):
    with torch.device("meta"):
        model = GPT(vocab=512, d=256, heads=4, layers=4, max_len=128)
    inputs = (torch.zeros(64, 128, dtype=torch.long),)
    tg = trace(model, inputs)
    an = annotate(tg, axes, load_hardware(hardware), "train")
    classes = an.repeated_layers()
    # blocks 1 and 2 are identical; block 0 carries the embedding and block 3 the head
    assert [[len(layer) for layer in cls] for cls in classes] == [[46, 46]]
    problem = an.problem(load_hardware(hardware).memory_capacity_bytes)
    full, tied = solve(problem), solve(problem, copies=classes)
    assert tied.stats["folded_nodes"] == problem.num_nodes - 46
    assert tied.objective == pytest.approx(full.objective, rel=1e-9)
    assert tied.objective == evaluate(problem, tied.choice)  # priced on the whole graph
    for a, b in zip(*classes[0]):
        assert tied.choice[a] == tied.choice[b]
    # and end to end: the plan's predicted step is the same with and without dedup
    plan = autopar.plan(model, autopar.Mesh(axes, hardware=hardware), inputs, traced=tg)
    monkeypatch.setenv("AUTOPAR_NO_DEDUP", "1")
    assert autopar.plan(model, autopar.Mesh(axes, hardware=hardware), inputs, traced=tg).step_time_s == \
        pytest.approx(plan.step_time_s, rel=1e-9)


def test_fold_is_exact_for_every_tied_choice():
    """Random problem with two classes of copies (edges inside, between and across copies, and an
    edge between two copies of one position): folded objective == full objective, choice by choice."""
    rng = np.random.default_rng(0)
    k = [2, 3, 2, 3, 2, 3, 2]  # nodes 1,2 | 3,4 | 5,6 are three copies of one 2-node layer
    costs = [rng.random(n) for n in k]
    memory = [rng.random(n) for n in k]
    pairs = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (1, 3), (2, 4), (0, 6), (1, 5)]
    mats = [rng.random((k[u], k[v])) for u, v in pairs]
    p = ShardingProblem(costs, memory, pairs, mats)
    folded, rep = fold_copies(p, [[[1, 2], [3, 4], [5, 6]]])
    assert folded.num_nodes == 3
    for c in itertools.product(*(range(n) for n in (k[0], k[1], k[2]))):
        choice = [c[rep[v]] for v in range(7)]
        assert evaluate(folded, list(c)) == pytest.approx(evaluate(p, choice), rel=1e-12)
    best = min(evaluate(folded, list(c)) for c in itertools.product(*(range(n) for n in (k[0], k[1], k[2]))))
    assert solve(p, copies=[[[1, 2], [3, 4], [5, 6]]]).objective == pytest.approx(best, rel=1e-9)
