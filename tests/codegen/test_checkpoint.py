"""Checkpoints on real gloo ranks: saved sharded under one plan and mesh, loaded under another
(dp=2,tp=2 -> tp=4 -> one plain process; expert orders of two plans), optimizer state included;
atomic saves (a save killed halfway leaves the previous checkpoint loadable); clear refusals."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from dist_utils import run_ranks

PRESET = os.path.join(os.path.dirname(__file__), "..", "data", "compute_bound.json")
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def _step(pm, opt, inputs):
    from models import logits

    logits(pm(*inputs)).float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _optim_state(model, opt, full):
    """FQN -> {state name -> whole tensor} of ``opt``."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: full(names[id(p)], v) for k, v in s.items()} for p, s in opt.state.items()}


def _gpt(seed):
    """A one-block GPT (small, to keep two compiles on 4 ranks quick) and its inputs."""
    from models import GPT

    torch.manual_seed(seed)
    return GPT(d=32, layers=1), (torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0)),)


def _reshard(rank, world, ckpt):
    import autopar
    from models import rel_err

    def full(fqn, t):
        return t.detach().full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()

    # one AdamW step on dp=2 x tp=2, then save parameters and optimizer state
    model, inputs = _gpt(0)
    pm = autopar.compile(model, autopar.Mesh({"dp": 2, "tp": 2}, hardware=PRESET), example_inputs=inputs)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2)
    _step(pm, opt, inputs)
    pm.save_checkpoint(ckpt, optimizer=opt)
    saved = {n: full(n, p) for n, p in pm.named_parameters()}
    saved_opt = _optim_state(pm, opt, full)

    # load into tp=4, other initial values, a fresh optimizer with no state yet
    other, _ = _gpt(1)
    pb = autopar.compile(other, autopar.Mesh({"tp": 4}, hardware=PRESET), example_inputs=inputs)
    opt_b = torch.optim.AdamW(pb.parameters(), lr=1e-2)
    pb.load_checkpoint(ckpt, optimizer=opt_b)
    out = {"placements_differ": any(str(p.placements) != str(dict(pm.named_parameters())[n].placements)
                                    for n, p in pb.named_parameters()),
           "params_equal": all(torch.equal(full(n, p), saved[n]) for n, p in pb.named_parameters()),
           "optim_equal": _optim_state(pb, opt_b, full).keys() == saved_opt.keys() and all(
               torch.equal(v, saved_opt[n][k]) for n, s in _optim_state(pb, opt_b, full).items() for k, v in s.items())}
    # one more step on each layout gives the same parameters
    _step(pm, opt, inputs)
    _step(pb, opt_b, inputs)
    b = dict(pb.named_parameters())
    out["next_step_err"] = max(rel_err(full(n, b[n]), full(n, p)) for n, p in pm.named_parameters())
    out["next_step"] = {n: full(n, p) for n, p in pb.named_parameters()}
    out["saved"], out["saved_opt"] = saved, saved_opt
    return out


def test_checkpoint_reshards_across_layouts(tmp_path):
    import autopar
    from models import GPT, rel_err

    ckpt = str(tmp_path / "ckpt")
    out = run_ranks(_reshard, 4, ckpt)[0]
    assert out["placements_differ"]
    assert out["params_equal"] and out["optim_equal"]
    assert out["next_step_err"] < 1e-4, out["next_step_err"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directory left behind

    # the same checkpoint in one plain process, no process group
    model, inputs = _gpt(2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    autopar.load_checkpoint(model, ckpt, optimizer=opt)
    assert all(torch.equal(p, out["saved"][n]) for n, p in model.named_parameters())
    state = _optim_state(model, opt, lambda n, t: t)
    assert state.keys() == out["saved_opt"].keys()
    assert all(torch.equal(v, out["saved_opt"][n][k]) for n, s in state.items() for k, v in s.items())
    _step(model, opt, inputs)
    assert max(rel_err(p.detach(), out["next_step"][n]) for n, p in model.named_parameters()) < 1e-4

    # a model with other shapes is refused before any tensor is read, naming the tensors
    with pytest.raises(autopar.AutoparError) as err:
        autopar.load_checkpoint(GPT(d=64, layers=1), ckpt)
    assert "does not fit this model" in str(err.value)
    assert "wte.weight: checkpoint (128, 32), model (128, 64)" in str(err.value)
    with pytest.raises(autopar.AutoparError, match=r"missing from the checkpoint: blocks\.1\."):
        autopar.load_checkpoint(GPT(d=32, layers=2), ckpt)
    with pytest.raises(autopar.AutoparError, match="another optimizer"):
        autopar.load_checkpoint(model, ckpt, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))


def _experts(rank, world, ckpt, examples):
    import sys

    sys.path.insert(0, examples)
    import autopar
    from autopar.codegen.runtime import expert_orders
    from moe import MoEGPT

    pins = {"moe_*": {"ep": "S(0)"}, "*.moe.w_*": {"ep": "S(0)"}}
    mesh = autopar.Mesh({"ep": 2}, hardware=PRESET)
    torch.manual_seed(0)
    model, ids = MoEGPT(d=32, layers=1, experts=4), torch.randint(0, 256, (4, 16))
    ref = MoEGPT(d=32, layers=1, experts=4)
    ref.load_state_dict(model.state_dict())
    base = autopar.plan(model, mesh, (ids,), pins=pins).to_dict()

    def with_order(order):
        for n in base["nodes"]:
            if n.get("moe"):
                n["moe"]["placement"] = order
        return autopar.Plan.from_dict(base)

    def model_order(pm):
        orders = expert_orders(pm.plan)
        out = {}
        for n, p in pm.named_parameters():
            x = p.full_tensor()
            if n in orders:
                x = x[torch.argsort(torch.tensor(orders[n]))]
            out[n] = x
        return out

    # saved from a plan storing the experts as [3, 1, 0, 2], loaded into one storing [1, 2, 3, 0]
    pm = autopar.compile(model, mesh, example_inputs=(ids,), plan=with_order([3, 1, 0, 2]))
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for m, o in ((pm, opt), (ref, ref_opt)):
        _step(m, o, (ids,))
    pm.save_checkpoint(ckpt, optimizer=opt)
    torch.manual_seed(1)
    pb = autopar.compile(MoEGPT(d=32, layers=1, experts=4), mesh, example_inputs=(ids,), plan=with_order([1, 2, 3, 0]))
    opt_b = torch.optim.AdamW(pb.parameters(), lr=1e-2)
    pb.load_checkpoint(ckpt, optimizer=opt_b)
    with torch.no_grad():
        same_output = float((pb(ids) - pm(ids)).abs().max())
    refs = dict(ref.named_parameters())
    out = {"orders": sorted({str(o) for o in expert_orders(pb.plan).values()}),
           "loaded_err": max(float((x - refs[n]).abs().max()) for n, x in model_order(pb).items()),
           "same_output": same_output, "ref": {n: p.detach().clone() for n, p in ref.named_parameters()}}
    for m, o in ((pb, opt_b), (ref, ref_opt)):  # AdamW's moments were loaded in the new order too
        _step(m, o, (ids,))
    out["next_step_err"] = max(float((x - refs[n]).abs().max()) for n, x in model_order(pb).items())
    return out


def test_checkpoint_is_in_model_order_across_expert_placements(tmp_path):
    import sys

    import autopar

    ckpt = str(tmp_path / "ckpt")
    out = run_ranks(_experts, 2, ckpt, EXAMPLES)[0]
    assert out["orders"] == ["[1, 2, 3, 0]"]
    assert out["loaded_err"] < 1e-6 and out["same_output"] < 1e-5 and out["next_step_err"] < 1e-5, out
    sys.path.insert(0, EXAMPLES)
    from moe import MoEGPT

    plain = MoEGPT(d=32, layers=1, experts=4)
    autopar.load_checkpoint(plain, ckpt)  # expert e is row e: the model's own order
    assert all(torch.allclose(p, out["ref"][n], atol=1e-6) for n, p in plain.named_parameters())


def _save_then_killed(rank, world, ckpt):
    import signal

    import torch.distributed.checkpoint.filesystem as fs

    import autopar
    from models import build

    model, inputs = build("mlp")
    pm = autopar.compile(model, autopar.Mesh({"tp": 2}, hardware=PRESET), example_inputs=inputs)
    pm.save_checkpoint(ckpt)  # A: the model as built
    with torch.no_grad():
        for p in pm.parameters():
            p.mul_(2)
    write = fs.FileSystemWriter.write_data

    def write_then_die(self, plan, planner):  # each rank dies right after writing its shard of B
        fut = write(self, plan, planner)
        fut.wait()
        os.kill(os.getpid(), signal.SIGKILL)

    fs.FileSystemWriter.write_data = write_then_die
    pm.save_checkpoint(ckpt)  # B, never finished


def test_save_killed_halfway_keeps_previous_checkpoint(tmp_path):
    import autopar
    from autopar.codegen.checkpoint import MARKER
    from models import build

    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(AssertionError, match="produced no result"):
        run_ranks(_save_then_killed, 2, ckpt, timeout=120)
    unfinished = [d for d in os.listdir(tmp_path) if d.startswith("ckpt.tmp-")]
    assert len(unfinished) == 1 and any(f.endswith(".distcp") for f in os.listdir(tmp_path / unfinished[0]))
    assert not os.path.exists(tmp_path / unfinished[0] / MARKER)

    # the previous checkpoint still loads, as it was; the unfinished one is reported and ignored
    model, _ = build("mlp", seed=5)
    with pytest.warns(UserWarning, match="unfinished save"):
        autopar.load_checkpoint(model, ckpt)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), build("mlp")[0].parameters()))

    # a directory without the marker is refused, even with every shard and DCP's metadata in it
    shutil.copytree(ckpt, tmp_path / "copy")
    os.remove(tmp_path / "copy" / MARKER)
    for where in (tmp_path / "copy", tmp_path / unfinished[0]):
        with pytest.raises(autopar.AutoparError, match="is incomplete: it was not finished"):
            autopar.load_checkpoint(model, where)
    with pytest.raises(autopar.AutoparError, match="is not a checkpoint; refusing to replace it"):
        autopar.save_checkpoint(model, tmp_path)  # a directory of other things
