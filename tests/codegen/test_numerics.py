"""The heart of correctness: a compiled model computes what the single-device model computes.

Real gloo ranks in separate processes; outputs, every parameter's gradient, and the parameters
after three optimizer steps are compared with an unparallelized copy of the same model.
"""

from __future__ import annotations

import copy
import fnmatch
import os

import pytest
import torch

from dist_utils import run_ranks

# CI: 1-D tp (4 ranks, the one that splits heads and MLPs furthest), 1-D dp and 2-D; tp=2 is the
# same code path as tp=4 and runs with AUTOPAR_FULL_MATRIX=1 (keeps the suite near 10 minutes).
MESHES = [{"dp": 2}, {"dp": 2, "tp": 2}, {"tp": 4}] + ([{"tp": 2}] if os.environ.get("AUTOPAR_FULL_MATRIX") == "1" else [])
MODELS = ["mlp", "gpt", "hf_gpt2", "hf_llama"]
# Slow compute on a free network: the solver shards everything it can, so these tests run real
# tensor- and data-parallel plans rather than the replicated plans tiny models get on real hardware.
SHARDING_PRESET = os.path.join(os.path.dirname(__file__), "..", "data", "compute_bound.json")


LR = 1e-2
ZERO_GRAD_MODELS = {"hf_gpt2", "convnet"}


def _optimizer(name, params):
    # GPT-2's attention key biases and the conv bias before BatchNorm have gradients that are
    # mathematically zero; Adam turns their rounding noise into full-size updates, so these
    # models' steps are checked with SGD + momentum, which is linear in the gradients
    # (FACTS.md, "Comparing numerics").
    if name in ZERO_GRAD_MODELS:
        return torch.optim.SGD(params, lr=LR, momentum=0.9)
    return torch.optim.AdamW(params, lr=LR)


def _param_tolerance(name) -> float:
    """Largest allowed |param - reference| after three steps, in absolute terms.

    SGD is linear in the gradients, so it gets the same relative bound as the gradients. Adam
    normalises each element by its own gradient scale, so an element whose gradient is 1e-9
    moves by a full lr whatever its rounding; equal gradients to 1e-7 can then move parameters
    by a few thousandths of lr. A missing or doubled gradient sync moves them by ~lr.
    """
    return 1e-6 if name in ZERO_GRAD_MODELS else 0.02 * LR


def _check_models(rank, world, axes, names, pins=None, options=None, share_plan=False):
    """``share_plan``: rank 0 plans and the others take its plan (``compile(plan=)``), which
    saves three joint-graph traces and solves per model where planning itself is not under test."""
    import autopar
    from models import build, logits, rel_err

    report = {}
    for name in names:
        model, inputs = build(name)
        ref = copy.deepcopy(model)
        mesh = autopar.Mesh(axes, hardware=SHARDING_PRESET)
        plan = None
        if share_plan:
            import torch.distributed as dist

            box = [autopar.plan(model, mesh, inputs, pins=(pins or {}).get(name), **(options or {})).to_json()
                   if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            plan = autopar.Plan.from_json(box[0])
        pm = autopar.compile(model, mesh, example_inputs=inputs, plan=plan,
                             pins=(pins or {}).get(name), **(options or {}))
        ref_opt, opt = _optimizer(name, ref.parameters()), _optimizer(name, pm.parameters())
        full = _model_order(pm.plan)
        errs = {"out": 0.0, "grad": 0.0, "param": 0.0}
        for step in range(3):
            y, y_ref = logits(pm(*inputs)), logits(ref(*inputs))
            if step == 0:
                errs["out"] = rel_err(y, y_ref)
            y.float().pow(2).mean().backward()
            y_ref.float().pow(2).mean().backward()
            ref_params = dict(ref.named_parameters())
            for fqn, p in pm.named_parameters():
                assert p.grad is not None, f"{name}: {fqn} got no gradient"
                if step == 0:
                    errs["grad"] = max(errs["grad"], rel_err(full(fqn, p.grad), ref_params[fqn].grad))
            opt.step(), ref_opt.step()
            opt.zero_grad(), ref_opt.zero_grad()
        for fqn, p in pm.named_parameters():
            diff = float((full(fqn, p) - ref_params[fqn].detach()).abs().max())
            errs["param"] = max(errs["param"], diff)
        report[name] = {"errs": errs, "fixups": list(pm.runtime_fixups),
                        "placements": pm.plan.param_placements,
                        "sharded_axes": sorted({a for n in pm.plan.nodes if isinstance(n["placements"], dict)
                                                for a, p in n["placements"].items() if p.startswith("S(")}),
                        "fqns": sorted(n for n, _ in pm.named_parameters()),
                        "attention": sorted({n["attention"] for n in pm.plan.nodes if n.get("attention")}),
                        "moe": sorted({n["moe"]["layout"] for n in pm.plan.nodes if n.get("moe")}),
                        "expert_orders": _expert_orders(pm.plan),
                        "ring_calls": sum(1 for n in pm.lowered_graph.graph.nodes if n.args[:1] == ("autopar.ring_attention",)),
                        # the norms' placements on tp (Megatron-SP runs them sequence-sharded, S(1))
                        "norms_tp": sorted({_first(n["placements"]).get("tp", "-") for n in pm.plan.nodes
                                            if n["op"] in ("aten.native_layer_norm.default", "aten.mean.dim")})}
    return report


def _expert_orders(plan):
    from autopar.codegen.runtime import expert_orders

    return expert_orders(plan)


def _model_order(plan):
    """``full(fqn, t)``: the whole tensor of a DTensor parameter (or gradient) in the model's own
    order (expert tensors are stored in the plan's expert placement order)."""
    import torch

    from autopar.codegen.runtime import expert_orders

    orders = expert_orders(plan)

    def full(fqn, t):
        x = t.full_tensor()
        if fqn in orders:
            inverse = torch.empty(len(orders[fqn]), dtype=torch.long)
            inverse[torch.tensor(orders[fqn])] = torch.arange(len(orders[fqn]))
            x = x[inverse]
        return x
    return full


def _first(placements) -> dict:
    """The first output's placements of a plan node (a multi-output op lists one per output)."""
    if isinstance(placements, list):
        placements = placements[0]
    return placements or {}


@pytest.mark.parametrize("axes", MESHES, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
def test_outputs_grads_and_steps_match_single_device(axes):
    world = 1
    for n in axes.values():
        world *= n
    reports = run_ranks(_check_models, world, axes, MODELS)
    for name in MODELS:
        rep = reports[0][name]
        assert rep["errs"]["out"] < 1e-4, (name, rep["errs"])
        assert rep["errs"]["grad"] < 1e-4, (name, rep["errs"])
        assert rep["errs"]["param"] < _param_tolerance(name), (name, rep["errs"])
        assert rep["fixups"] == [], (name, rep["fixups"])
        assert rep["sharded_axes"] == sorted(axes), (name, rep["sharded_axes"])  # every axis really shards something
        model, _ = __import__("models").build(name)
        assert rep["fqns"] == sorted(n for n, _ in model.named_parameters())
        # every rank planned and ran the same thing
        assert all(r[name]["placements"] == rep["placements"] for r in reports)


@pytest.mark.parametrize("axes", [{"dp": 2}, {"dp": 2, "tp": 2}], ids=["dp=2", "dp=2,tp=2"])
def test_convnet_and_a_custom_module(axes):
    world = 1
    for n in axes.values():
        world *= n
    reports = run_ranks(_check_models, world, axes, ["convnet", "custom"])
    for name in ("convnet", "custom"):
        rep = reports[0][name]
        assert rep["errs"]["out"] < 1e-4 and rep["errs"]["grad"] < 1e-4, (name, rep["errs"])
        assert rep["errs"]["param"] < _param_tolerance(name), (name, rep["errs"])
        assert rep["fixups"] == []


# Layouts the solver would not pick, forced with pins: row-parallel weights feeding each other,
# column-parallel output projections. They must still compute the single-device model.
PINNED = {"gpt": {"blocks.*.fc*.weight": "S(1)", "blocks.*.qkv.weight": "S(1)", "blocks.*.proj.weight": "S(0)"},
          "hf_llama": {"model.layers.*.mlp.*_proj.weight": "S(1)", "model.layers.*.self_attn.o_proj.weight": "S(0)"}}


def test_pinned_layouts_match_single_device():
    reports = run_ranks(_check_models, 2, {"tp": 2}, list(PINNED), PINNED)
    for name, pins in PINNED.items():
        rep = reports[0][name]
        assert rep["errs"]["out"] < 1e-4 and rep["errs"]["grad"] < 1e-4, (name, rep["errs"])
        assert rep["errs"]["param"] < _param_tolerance(name), (name, rep["errs"])
        assert rep["fixups"] == [], (name, rep["fixups"])
        for fqn, pl in rep["placements"].items():
            want = next((v for k, v in pins.items() if fnmatch.fnmatchcase(fqn, k)), None)
            assert want is None or pl["tp"] == want, (name, fqn, pl)
