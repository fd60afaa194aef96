"""Expert parallelism computes what the single-process MoE model computes: outputs, every
gradient and the parameters after three AdamW steps, on real gloo ranks.

The expert layouts are pinned so that each case runs the layout it names (on a tiny model the
solver would rather replicate the experts); ``AUTOPAR_FULL_MATRIX=1`` adds the hand-written MoE.
"""

from __future__ import annotations

import os

import pytest

from dist_utils import run_ranks
from test_numerics import _check_models, _param_tolerance

FULL = os.environ.get("AUTOPAR_FULL_MATRIX") == "1"
MIXTRAL, QWEN = "hf_mixtral", "hf_qwen_moe"  # 8 experts (grouped_mm); 4 experts and a shared expert
EP = {"moe_*": {"ep": "S(0)"}, "*experts*": {"ep": "S(0)"}}
# (mesh, pins, the layout every MoE layer must run, models). CI: both models on ep=2, Mixtral on
# ep=2 x tp=2, Qwen on dp=2 x ep=2 (the 2-D meshes); AUTOPAR_FULL_MATRIX=1 runs both models on
# every mesh, ep=4 included.
CASES = {
    2: [({"ep": 2}, EP, "ep=all-to-all", [MIXTRAL, QWEN]),
        # experts placed by the ILP from the routing of the batch: stored permuted, same numbers
        ({"ep": 2}, {**EP, "routing": True}, "ep=all-to-all", [MIXTRAL])],
    4: [({"ep": 4}, EP, "ep=all-to-all", [MIXTRAL, QWEN] if FULL else []),
        ({"dp": 2, "ep": 2}, EP, "dp=data ep=all-to-all", [MIXTRAL, QWEN] if FULL else [QWEN]),
        # tp inside the experts: each tp rank runs its half of the ep rank's experts, partial sums
        ({"ep": 2, "tp": 2}, {"moe_*": {"ep": "S(0)", "tp": "P(sum)"}, "*experts*": {"ep": "S(0)", "tp": "S(0)"}},
         "ep=all-to-all tp=own-experts", [MIXTRAL, QWEN] if FULL else [MIXTRAL])],
}
if FULL:
    CASES[2].append(({"ep": 2}, EP, "ep=all-to-all", ["hf_mixtral_bmm"]))
    CASES[4].append(({"ep": 2, "tp": 2}, {"moe_*": {"ep": "S(0)", "tp": "S(0)"}, "*experts*": {"ep": "S(0)", "tp": "R"}},
                     "ep=all-to-all tp=data", [MIXTRAL, QWEN]))


def _run_cases(rank, world, cases):
    out = []
    for axes, pins, _, names in cases:
        options = {}
        if pins.get("routing"):
            import autopar
            from models import build

            pins = {k: v for k, v in pins.items() if k != "routing"}
            options.update(routing=autopar.profile_routing(*build(names[0])), time_limit_s=2.0)
        out.append(_check_models(rank, world, axes, names, {n: pins for n in names}, options, share_plan=True))
    return out


@pytest.mark.parametrize("world", sorted(CASES))
def test_expert_parallel_matches_single_device(world):
    reports = run_ranks(_run_cases, world, CASES[world])
    for k, (axes, pins, layout, names) in enumerate(CASES[world]):
        assert set(reports[0][k]) == set(names)
        for name, rep in reports[0][k].items():
            what = (axes, name, rep["errs"])
            assert rep["errs"]["out"] < 1e-4 and rep["errs"]["grad"] < 1e-4, what
            assert rep["errs"]["param"] < _param_tolerance(name), what
            assert rep["fixups"] == [], (what, rep["fixups"])
            assert rep["moe"] == [layout], (what, rep["moe"])
            if pins.get("routing"):  # the placement is not the identity, so the permutation really ran
                assert rep["expert_orders"] and any(o != sorted(o) for o in rep["expert_orders"].values())
            # the experts really are sharded over ep: each rank holds its share only
            experts = {f: p for f, p in rep["placements"].items() if "experts" in f}
            assert experts and all(p["ep"] == "S(0)" for p in experts.values()), experts


def _pipelined(rank, world):
    import copy

    import torch
    import torch.nn.functional as F

    import autopar
    from models import hf_mixtral, logits, rel_err
    from test_numerics import SHARDING_PRESET

    torch.manual_seed(0)
    model = hf_mixtral(layers=2)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(2))

    def loss_fn(out, t):
        return F.cross_entropy(logits(out).flatten(0, 1), t.flatten())

    pm = autopar.compile(model, autopar.Mesh({"pp": 2, "ep": 2}, hardware=SHARDING_PRESET), (ids,), pins=EP,
                         pipeline={"schedule": "1f1b", "microbatches": 2})
    loss = pm.train_step(ids, target=target, loss_fn=loss_fn)
    ref_loss = loss_fn(ref(ids), target)
    ref_loss.backward()
    refs = dict(ref.named_parameters())
    grad = max(rel_err(p.grad.full_tensor(), refs[n].grad) for n, p in pm.named_parameters() if p.grad is not None)
    return float(loss), float(ref_loss), grad, sorted({n["moe"]["layout"] for n in pm.plan.nodes if n.get("moe")})


@pytest.mark.skipif(not FULL, reason="AUTOPAR_FULL_MATRIX=1: experts on ep inside pipeline stages")
def test_expert_parallel_inside_pipeline_stages():
    for loss, ref_loss, grad, layouts in run_ranks(_pipelined, 4):
        assert abs(loss - ref_loss) < 1e-5 and grad < 1e-4 and layouts == ["ep=all-to-all"]
