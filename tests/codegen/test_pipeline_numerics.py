"""Pipelined execution computes what the single-device model computes.

Real gloo ranks; for each mesh with a ``pp`` axis, the hand-written GPT (tied embeddings, so the
tied gradient crosses stages) and HF Llama run every schedule: the full outputs on every rank,
the loss, every parameter's gradient and the parameters after three AdamW steps are compared with
an unparallelized copy. Each rank checks the parameters of its own stages; together the ranks
must cover every parameter.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch

from dist_utils import run_ranks

SHARDING_PRESET = os.path.join(os.path.dirname(__file__), "..", "data", "compute_bound.json")
LR = 1e-2
LAYERS = 4
# Adam divides each element by its own gradient's scale, so an element whose gradient is at fp32's
# rounding floor (a causal attention's key weights have some) moves by a full lr whatever its
# rounding. Parameters are compared to 0.02 lr where the first gradient is above the floor, and
# to 3 lr (three steps) everywhere; a missing or doubled gradient fails the first.
NOISE_FLOOR = 1e-6
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1")


def _model(name, layers):
    from models import GPT, hf_llama

    torch.manual_seed(0)
    return GPT(layers=layers) if name == "gpt" else hf_llama(layers=layers)


def _check(rank, world, axes, cases, plans):
    import torch.nn.functional as F

    import autopar
    from models import logits, rel_err

    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(2))

    def loss_fn(out, t):
        return F.cross_entropy(logits(out).flatten(0, 1), t.flatten())

    mesh = autopar.Mesh(axes, hardware=SHARDING_PRESET)
    report = {}
    for name, schedule in cases:
        v = 2 if schedule == "interleaved-1f1b" else 1
        n = axes["pp"] * v
        layers = max(LAYERS, n)  # interleaved on pp=4: 8 stages
        model = _model(name, layers)
        ref = copy.deepcopy(model)
        base = autopar.Plan.from_json(plans[name, layers])
        plan = dataclasses.replace(base, pipeline={
            **base.pipeline, "schedule": schedule, "microbatches": 4, "virtual_stages": v,
            "bounds": [[k * layers // n, (k + 1) * layers // n] for k in range(n)]})
        pm = autopar.compile(model, mesh, (ids,), plan=plan)
        errs = {"out": rel_err(logits(pm(ids)), logits(ref(ids))), "grad": 0.0}
        opt, ref_opt = torch.optim.AdamW(pm.parameters(), lr=LR), torch.optim.AdamW(ref.parameters(), lr=LR)
        ref_params = dict(ref.named_parameters(remove_duplicate=False))
        signal = {}
        for step in range(3):
            loss = pm.train_step(ids, target=target, loss_fn=loss_fn)
            ref_loss = loss_fn(ref(ids), target)
            ref_loss.backward()
            if step == 0:
                errs["loss"] = abs(float(loss) - float(ref_loss))
                for fqn, p in pm.named_parameters():
                    assert p.grad is not None, f"{name}/{schedule}: {fqn} got no gradient"
                    g = ref_params[fqn].grad
                    errs["grad"] = max(errs["grad"], rel_err(p.grad.full_tensor(), g))
                    signal[fqn] = g.abs() > NOISE_FLOOR * g.abs().max()
            opt.step(), ref_opt.step()
            opt.zero_grad(), ref_opt.zero_grad()
        diffs = {fqn: (p.full_tensor() - ref_params[fqn].detach()).abs() for fqn, p in pm.named_parameters()}
        errs["param"] = max(float((d * signal[fqn]).max()) for fqn, d in diffs.items())
        errs["param_any"] = max(float(d.max()) for d in diffs.values())
        report[name, schedule] = {
            "errs": errs, "fixups": list(pm.runtime_fixups), "params": sorted(n for n, _ in pm.named_parameters()),
            "all_params": sorted(n for n, _ in ref.named_parameters()),
            "stages": len(plan.pipeline["bounds"]), "schedule": plan.pipeline["schedule"],
            "sharded": sorted({a for pls in plan.param_placements.values() for a, p in pls.items() if p != "R"})}
    return report


MESHES = [{"pp": 2}, {"pp": 4}, {"pp": 2, "tp": 2}, {"pp": 2, "dp": 2}, {"pp": 2, "dp": 2, "tp": 2}]
# CI runs every schedule on {"pp": 2} (each on one model) and a rotation on the bigger meshes, so
# that both models and every schedule meet a 2-D mesh within the suite's time budget (8 gloo ranks on 2 cores are
# slow). AUTOPAR_FULL_MATRIX=1 runs every model x schedule on every mesh.
ROTATION = {
    "pp2": [("gpt", "gpipe"), ("gpt", "interleaved-1f1b"), ("hf_llama", "1f1b"), ("hf_llama", "zb-h1")],
    "pp4": [("gpt", "zb-h1")],
    "pp2,tp2": [("hf_llama", "zb-h1")],
    "pp2,dp2": [("gpt", "interleaved-1f1b"), ("hf_llama", "gpipe")],
    "pp2,dp2,tp2": [("gpt", "1f1b")],
}
FULL = os.environ.get("AUTOPAR_FULL_MATRIX") == "1"


def _id(axes):
    return ",".join(f"{a}{n}" for a, n in axes.items())


def _cases(axes):
    return [(m, s) for m in ("gpt", "hf_llama") for s in SCHEDULES] if FULL else ROTATION[_id(axes)]


def _world(axes) -> int:
    world = 1
    for n in axes.values():
        world *= n
    return world


def _check_meshes(rank, world, jobs):
    return [_check(rank, world, axes, cases, plans) for axes, cases, plans in jobs]


@pytest.mark.parametrize("world", [2, 4, 8], ids=lambda w: f"{w}ranks")
def test_pipelined_numerics_match_single_device(world):
    """Every mesh of ``world`` ranks in one launch ({pp: 4}, {pp: 2, tp: 2} and {pp: 2, dp: 2}
    share theirs): starting 4 or 8 processes on 2 cores is a good part of the cost."""
    import autopar

    # the layout on the other axes, planned once per model (offline, as every rank would) and
    # shared by the schedules, which only change the pipeline part
    ids = torch.zeros(8, 16, dtype=torch.long)
    jobs = []
    for axes in (m for m in MESHES if _world(m) == world):
        cases, plans = _cases(axes), {}
        for name, schedule in cases:
            layers = max(LAYERS, axes["pp"] * (2 if schedule == "interleaved-1f1b" else 1))
            if (name, layers) not in plans:
                mesh = autopar.Mesh(axes, hardware=SHARDING_PRESET)
                plans[name, layers] = autopar.plan(_model(name, layers), mesh, (ids,)).to_json()
        jobs.append((axes, cases, plans))
    results = run_ranks(_check_meshes, world, jobs)
    for j, (axes, cases, _) in enumerate(jobs):
        reports = [per_rank[j] for per_rank in results]
        for case in cases:
            covered = set()
            where = (_id(axes), case)
            for rank, report in enumerate(reports):
                r = report[case]
                e = r["errs"]
                assert r["schedule"] == case[1], where
                assert r["stages"] == axes["pp"] * (2 if case[1] == "interleaved-1f1b" else 1), where
                assert e["out"] < 1e-5 and e["grad"] < 1e-5 and e["loss"] < 1e-5, (where, rank, e)
                assert e["param"] < 0.02 * LR and e["param_any"] < 3 * LR, (where, rank, e)
                assert not r["fixups"], (where, r["fixups"])
                covered.update(r["params"])
                if "tp" in axes:  # the stages really run tensor-parallel inside
                    assert "tp" in r["sharded"], (where, r["sharded"])
            missing = set(reports[0][case]["all_params"]) - covered
            assert not missing, (where, missing)


def _misuse(rank, world):
    import torch.nn.functional as F

    import autopar
    from models import GPT

    torch.manual_seed(0)
    model = GPT(layers=2)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    mesh = autopar.Mesh({"pp": 2}, hardware=SHARDING_PRESET)
    plan = autopar.plan(model, mesh, (ids,), pipeline={"microbatches": 2, "schedule": "1f1b"})
    msgs = {"pipeline": (plan.pipeline["microbatches"], plan.pipeline["schedule"], plan.pipeline["bounds"])}
    try:
        autopar.compile(GPT(layers=2), mesh, (ids[:3],), plan=plan)
    except autopar.AutoparError as exc:
        msgs["batch"] = str(exc)
    pm = autopar.compile(model, mesh, (ids,), plan=plan)
    out = pm(ids)
    try:
        out.sum().backward()
    except autopar.AutoparError as exc:
        msgs["backward"] = str(exc)
    try:
        pm(ids[:2])
    except autopar.AutoparError as exc:
        msgs["shape"] = str(exc)
    try:
        pm.train_step(ids, target=ids, loss_fn=None)
    except autopar.AutoparError as exc:
        msgs["loss_fn"] = str(exc)
    loss = pm.train_step(ids, target=ids, loss_fn=lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten()))
    msgs["loss"] = float(loss)
    return msgs


def test_pipelined_misuse_gets_clear_errors():
    reports = run_ranks(_misuse, 2)
    for msgs in reports:
        assert msgs["pipeline"] == (2, "1f1b", [[0, 1], [1, 2]]), msgs
        assert "plan was made for another model" in msgs["batch"] or "graph hash" in msgs["batch"], msgs
        assert "train_step" in msgs["backward"], msgs
        assert "compiled for" in msgs["shape"] and "(4, 16)" in msgs["shape"], msgs
        assert "loss_fn must be a callable" in msgs["loss_fn"], msgs
    losses = [msgs["loss"] for msgs in reports]
    assert losses[0] == losses[1] and losses[0] > 0, losses  # the last stage's loss, broadcast
