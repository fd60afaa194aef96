"""Inputs are checked at the boundary of a compiled module: wrong shapes or dtypes, a batch that dp
does not divide (refused: autopar pads no batch), a model changed after compile. Each is a clear
AutoparError that says what to do, never a torch traceback or a wrong result."""

from __future__ import annotations

import pytest
import torch

from autopar.codegen.pipeline import check_microbatches
from autopar.errors import AutoparError
from dist_utils import run_ranks


def _boundary(rank, world):
    import torch.nn as nn

    import autopar
    from models import MLP

    torch.manual_seed(0)
    model, x = MLP(), torch.randn(8, 32)
    mesh = autopar.Mesh({"dp": world})
    pm = autopar.compile(model, mesh, example_inputs=(x,), time_limit_s=2.0)
    y = pm(x)
    out = {}

    def attempt(case, fn):
        try:
            fn()
            out[case] = "accepted"
        except autopar.AutoparError as exc:  # only autopar's own errors count as clear
            out[case] = str(exc)

    attempt("batch", lambda: pm(torch.randn(6, 32)))
    attempt("dtype", lambda: pm(x.double()))
    attempt("structure", lambda: pm(x, x))
    attempt("indivisible", lambda: autopar.compile(MLP(), mesh, example_inputs=(torch.randn(3, 32),)))

    with torch.no_grad():  # values changed in place are the same program
        bias = pm.fc3.bias.clone()
        pm.fc3.bias.add_(1.0)
        out["in_place"] = bool(torch.allclose(pm(x), y + 1.0))
        pm.fc3.bias.copy_(bias)
    weight = pm.fc1.weight
    pm.fc1.weight = nn.Parameter(torch.randn(64, 32))  # a plain tensor where the plan put a DTensor
    attempt("pm_parameter", lambda: pm(x))
    pm.fc1.weight = weight
    out["restored"] = bool(torch.equal(pm(x), y))
    fc2 = model.fc2
    model.fc2 = nn.Linear(64, 64)  # the original model, which pm no longer reads at its root
    attempt("model_submodule", lambda: pm(x))
    model.fc2 = fc2
    model.fc2.weight = nn.Parameter(torch.randn(64, 64))  # a child pm shares with the original model
    attempt("model_parameter", lambda: pm(x))
    model.fc2.weight = pm.fc2.weight = nn.Parameter(torch.randn(70, 64))
    attempt("shape", lambda: pm(x))

    from models import GPT  # a pipelined module checks the same, at each step

    gpt, ids = GPT(vocab=64, d=32, heads=2, layers=2, max_len=16), torch.randint(0, 64, (4, 8))
    pp = autopar.compile(gpt, autopar.Mesh({"pp": world}), example_inputs=(ids,), time_limit_s=2.0,
                         pipeline={"microbatches": 2})
    pp(ids)
    gpt.ln_f = nn.LayerNorm(32)
    attempt("pipelined", lambda: pp(ids))
    return out


@pytest.fixture(scope="module")
def boundary():
    return run_ranks(_boundary, 2)[0]


def test_wrong_input_shape_dtype_and_structure_are_refused(boundary):
    assert "input 'x' has shape (6, 32) and dtype torch.float32, but the model was compiled for (8, 32)" \
        in boundary["batch"]
    assert "dtype torch.float64, but the model was compiled for (8, 32) torch.float32" in boundary["dtype"]
    assert "call autopar.compile again" in boundary["batch"]
    assert "got (args, kwargs) ((x, x), {}), expected ((x,), {})" in boundary["structure"]


def test_batch_not_divisible_by_dp_is_refused_not_padded(boundary):
    msg = boundary["indivisible"]
    assert "input 0 has shape (3, 32): a batch of 3 does not split over dp=2" in msg
    assert "pads no batch" in msg and "multiple of 2" in msg


def test_pipeline_microbatches_must_split_over_dp():
    check_microbatches([torch.zeros(8, 4), torch.zeros(()), 3], 1, 2)  # scalars carry no batch without a pipeline
    with pytest.raises(AutoparError, match=r"a microbatch of 3 rows does not split over dp=2.*multiple of 4"):
        check_microbatches([torch.zeros(6, 4)], 2, 2)
    with pytest.raises(AutoparError, match="into 4 microbatches"):
        check_microbatches([torch.zeros(6, 4)], 4, 1)
    with pytest.raises(AutoparError, match="into 2 microbatches"):
        check_microbatches([torch.zeros(())], 2, 1)


def test_a_model_changed_after_compile_is_refused(boundary):
    assert boundary["in_place"] and boundary["restored"]
    for case, what in [("pm_parameter", "fc1.weight replaced"),
                       ("model_submodule", "fc2 of the model given to compile replaced"),
                       ("model_parameter", "fc2.weight replaced"),
                       ("shape", "fc2.weight is (70, 64) torch.float32, compiled as (64, 64) torch.float32")]:
        msg = boundary[case]
        assert msg.startswith(f"the model was changed after autopar.compile: {what}"), (case, msg)
        assert "compile the changed model again" in msg
    assert boundary["pipelined"].startswith("the model was changed after autopar.compile: ln_f of the model given to "
                                            "compile replaced"), boundary["pipelined"]
    for case in ("pm_parameter",):
        msg = boundary[case]
        assert "compile the changed model again" in msg

