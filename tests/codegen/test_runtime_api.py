"""The ParallelModule's contract on real ranks: plans re-used from disk, checkpoints, inputs."""

from __future__ import annotations

import os

from dist_utils import run_ranks

SHARDING_PRESET = os.path.join(os.path.dirname(__file__), "..", "data", "compute_bound.json")


def _contract(rank, world, tmpdir):
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate

    import autopar
    from models import build, logits

    mesh = autopar.Mesh({"tp": 2}, hardware=SHARDING_PRESET)
    model, inputs = build("gpt")
    pm = autopar.compile(model, mesh, example_inputs=inputs)
    out = {}
    y = logits(pm(*inputs))

    # a plan saved on disk and passed back gives the same program and the same outputs
    path = os.path.join(tmpdir, "plan.json")
    if rank == 0:
        pm.plan.save(path)
    dist.barrier()
    model2, _ = build("gpt")
    pm2 = autopar.compile(model2, mesh, example_inputs=inputs, plan=autopar.Plan.load(path))
    out["same_output_from_saved_plan"] = bool(torch.equal(logits(pm2(*inputs)), y))

    # inference plans run under no_grad and compute the same thing
    model3, _ = build("gpt")
    pm3 = autopar.compile(model3, mesh, example_inputs=inputs, mode="infer")
    with torch.no_grad():
        out["infer_error"] = float((logits(pm3(*inputs)) - y).abs().max())
    out["infer_mode"] = pm3.plan.mode

    # a plan for another model is refused
    other, other_inputs = build("mlp")
    try:
        autopar.compile(other, mesh, example_inputs=other_inputs, plan=autopar.Plan.load(path))
        out["other_model"] = "accepted"
    except autopar.PlanError as exc:
        out["other_model"] = exc.path

    # inputs may be DTensors
    ids = DTensor.from_local(inputs[0], pm.device_mesh, [Replicate()], run_check=False)
    out["dtensor_input"] = bool(torch.equal(logits(pm(ids)), y))

    # wrong shapes get a clear error
    try:
        pm(inputs[0][:, :8])
        out["bad_shape"] = "accepted"
    except autopar.AutoparError as exc:
        out["bad_shape"] = str(exc)

    # checkpoints round-trip through torch.distributed.checkpoint; a second save replaces the first
    # once it is complete, leaving no temporary directory (tests/codegen/test_checkpoint.py has more)
    ckpt = os.path.join(tmpdir, "ckpt")
    pm.save_checkpoint(ckpt)
    pm.save_checkpoint(ckpt)
    out["checkpoint_dirs"] = sorted(d for d in os.listdir(tmpdir) if d.startswith("ckpt"))
    before = {n: p.full_tensor().clone() for n, p in pm.named_parameters()}
    with torch.no_grad():
        for p in pm.parameters():
            p.mul_(0)
    pm.load_checkpoint(ckpt)
    out["checkpoint"] = all(torch.equal(p.full_tensor(), before[n]) for n, p in pm.named_parameters())
    out["params_are_dtensors"] = all(isinstance(p, DTensor) for p in pm.parameters())

    # train_step (the call a pp mesh trains with) is forward + backward here
    def loss_fn(o, t):
        return (logits(o).float() - t).pow(2).mean()

    loss = pm.train_step(*inputs, target=torch.ones(()), loss_fn=loss_fn)
    ref = loss_fn(pm2(*inputs), torch.ones(()))
    ref.backward()
    grads2 = dict(pm2.named_parameters())
    out["train_step"] = bool(torch.equal(loss, ref.detach())) and all(
        torch.equal(p.grad.full_tensor(), grads2[n].grad.full_tensor()) for n, p in pm.named_parameters())
    return out


def test_parallel_module_contract(tmp_path):
    out = run_ranks(_contract, 2, str(tmp_path))[0]
    assert out["same_output_from_saved_plan"]
    assert out["infer_mode"] == "infer" and out["infer_error"] < 1e-5
    assert out["other_model"] == "$.graph_hash"
    assert out["dtensor_input"]
    assert "compiled for" in out["bad_shape"] and "(4, 8)" in out["bad_shape"]
    assert out["checkpoint"] and out["checkpoint_dirs"] == ["ckpt"]
    assert out["params_are_dtensors"]
    assert out["train_step"]
