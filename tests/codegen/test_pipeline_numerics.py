"""Pipelined execution computes what the single-device model computes.

Real gloo ranks; for each mesh with a ``pp`` axis, the hand-written GPT (tied embeddings, so the
tied gradient crosses stages) and HF Llama run every schedule: the full outputs on every rank,
the loss, every parameter's gradient and the parameters after three AdamW steps are compared with
an unparallelized copy. Each rank checks the parameters of its own stages; together the ranks
must cover every parameter.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from dist_utils import run_ranks

SHARDING_PRESET = os.path.join(os.path.dirname(__file__), "..", "data", "compute_bound.json")
LR = 1e-2
LAYERS = 4
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1")


def _model(name):
    from models import GPT, hf_llama

    torch.manual_seed(0)
    return GPT(layers=LAYERS) if name == "gpt" else hf_llama(layers=LAYERS)


def _check(rank, world, axes, cases):
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
        model = _model(name)
        ref = copy.deepcopy(model)
        v = 2 if schedule == "interleaved-1f1b" else 1
        plan = autopar.plan(model, mesh, (ids,))
        n = axes["pp"] * v
        plan.pipeline.update(schedule=schedule, microbatches=4, virtual_stages=v,
                             bounds=[[k * LAYERS // n, (k + 1) * LAYERS // n] for k in range(n)])
        pm = autopar.compile(model, mesh, (ids,), plan=plan)
        errs = {"out": rel_err(logits(pm(ids)), logits(ref(ids))), "grad": 0.0}
        opt, ref_opt = torch.optim.AdamW(pm.parameters(), lr=LR), torch.optim.AdamW(ref.parameters(), lr=LR)
        ref_params = dict(ref.named_parameters(remove_duplicate=False))
        for step in range(3):
            loss = pm.train_step(ids, target=target, loss_fn=loss_fn)
            ref_loss = loss_fn(ref(ids), target)
            ref_loss.backward()
            if step == 0:
                errs["loss"] = abs(float(loss) - float(ref_loss))
                for fqn, p in pm.named_parameters():
                    assert p.grad is not None, f"{name}/{schedule}: {fqn} got no gradient"
                    errs["grad"] = max(errs["grad"], rel_err(p.grad.full_tensor(), ref_params[fqn].grad))
            opt.step(), ref_opt.step()
            opt.zero_grad(), ref_opt.zero_grad()
        errs["param"] = max(float((p.full_tensor() - ref_params[fqn].detach()).abs().max())
                            for fqn, p in pm.named_parameters())
        report[name, schedule] = {
            "errs": errs, "fixups": list(pm.runtime_fixups), "params": sorted(n for n, _ in pm.named_parameters()),
            "all_params": sorted(n for n, _ in ref.named_parameters()),
            "stages": len(plan.pipeline["bounds"]), "schedule": plan.pipeline["schedule"],
            "sharded": sorted({a for pls in plan.param_placements.values() for a, p in pls.items() if p != "R"})}
    return report


CASES = {name: [(name, s) for s in SCHEDULES] for name in ("gpt", "hf_llama")}
MESHES = [({"pp": 2}, CASES["gpt"] + CASES["hf_llama"]),
          ({"pp": 4}, [("gpt", "1f1b"), ("gpt", "zb-h1"), ("hf_llama", "gpipe")]),
          ({"pp": 2, "tp": 2}, [("gpt", "zb-h1"), ("hf_llama", "interleaved-1f1b"), ("hf_llama", "1f1b")]),
          ({"pp": 2, "dp": 2}, [("gpt", "interleaved-1f1b"), ("hf_llama", "gpipe"), ("hf_llama", "zb-h1")]),
          ({"pp": 2, "dp": 2, "tp": 2}, [("gpt", "1f1b"), ("hf_llama", "interleaved-1f1b")])]


@pytest.mark.parametrize("axes,cases", MESHES, ids=[",".join(f"{a}{n}" for a, n in m.items()) for m, _ in MESHES])
def test_pipelined_numerics_match_single_device(axes, cases):
    world = 1
    for n in axes.values():
        world *= n
    reports = run_ranks(_check, world, axes, cases)
    for case in cases:
        covered = set()
        for rank, report in enumerate(reports):
            r = report[case]
            e = r["errs"]
            assert r["schedule"] == case[1] and r["stages"] == axes["pp"] * (2 if case[1] == "interleaved-1f1b" else 1)
            assert e["out"] < 1e-5 and e["grad"] < 1e-5 and e["loss"] < 1e-5, (case, rank, e)
            assert e["param"] < 0.02 * LR, (case, rank, e)
            assert not r["fixups"], (case, r["fixups"])
            covered.update(r["params"])
            if "tp" in axes:  # the stages really run tensor-parallel inside
                assert "tp" in r["sharded"], (case, r["sharded"])
        assert covered == set(reports[0][case]["all_params"]), (case, set(reports[0][case]["all_params"]) - covered)
