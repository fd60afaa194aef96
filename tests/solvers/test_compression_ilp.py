"""The per-layer compression ILP (autopar/solvers/compression.py) against brute force, and its regimes."""

import itertools
import random

import pytest

from autopar.solvers.compression import Layer, Option, solve_compression


def _objective(layers, picks, overlap):
    comm = sum(o.comm_s for o in picks)
    return max(0.0, comm - overlap) + sum(o.codec_s for o in picks)


def _brute(layers, overlap, budget):
    total = sum(layer.norm2 for layer in layers)
    best = None
    for picks in itertools.product(*(layer.options for layer in layers)):
        if sum(o.err2 for o in picks) > budget ** 2 * total * (1 + 1e-9):
            continue
        obj = _objective(layers, picks, overlap)
        best = obj if best is None else min(best, obj)
    return best


def _random_layers(rng, n):
    layers = []
    for i in range(n):
        size = rng.choice([1e2, 1e4, 1e6])
        base = size * 4 / 1e9 + 1e-5
        norm2 = size * rng.uniform(0.5, 2)
        opts = [Option("none", base, 0.0, 0.0)]
        for m, ratio, err in (("int8", 0.27, 1e-4), ("topk:0.1", 0.2, 0.3), ("powersgd:4", 0.05, 0.5)):
            opts.append(Option(m, size * 4 * ratio / 1e9 + 2e-5, size * 1e-12 * rng.uniform(1, 30) + 2e-5,
                               err * rng.uniform(0.5, 2) * norm2))
        layers.append(Layer(f"l{i}", norm2, tuple(opts)))
    return layers


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(seed):
    rng = random.Random(seed)
    layers = _random_layers(rng, 5)
    overlap = rng.choice([0.0, 1e-3, 5e-3])
    budget = rng.choice([0.05, 0.3, 0.8])
    choice = solve_compression(layers, overlap, budget)
    assert choice.status == "optimal"
    picks = [next(o for o in layer.options if o.method == choice.methods[layer.name]) for layer in layers]
    assert choice.rel_error <= budget * (1 + 1e-6)
    # integer nanoseconds: optimal up to rounding of a few units per layer
    assert _objective(layers, picks, overlap) == pytest.approx(_brute(layers, overlap, budget), abs=1e-7)


def test_zero_budget_and_hidden_communication_compress_nothing():
    layers = _random_layers(random.Random(7), 6)
    assert set(solve_compression(layers, 0.0, 0.0).methods.values()) == {"none"}
    total = sum(layer.options[0].comm_s for layer in layers)
    assert set(solve_compression(layers, total * 1.01, 0.9).methods.values()) == {"none"}


def test_exposed_communication_compresses_the_big_layers_first():
    big = Layer("big", 1e6, (Option("none", 1.0, 0.0, 0.0), Option("int8", 0.27, 1e-3, 1e-4 * 1e6)))
    small = Layer("small", 1e2, (Option("none", 2e-5, 0.0, 0.0), Option("int8", 1.9e-5, 2e-5, 1e-4 * 1e2)))
    choice = solve_compression([big, small], 0.0, 0.1)
    assert choice.methods == {"big": "int8", "small": "none"}
    assert choice.objective_s == pytest.approx(0.27 + 2e-5 + 1e-3)


def test_options_must_start_with_the_exact_one():
    with pytest.raises(ValueError, match="options\\[0\\] must be the exact 'none'"):
        solve_compression([Layer("x", 1.0, (Option("int8", 1.0, 0.0, 0.1),))], 0.0, 0.5)
