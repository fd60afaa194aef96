"""The fusion pass (autopar/codegen/fusion.py): groups, generated kernels against torch, and a fused
GPT on two gloo ranks against the single-process model.

Every test but the last runs twice: here (the eager ops of each fused group on CPU) and, in a fresh
process with TRITON_INTERPRET=1, on the generated Triton kernels through the interpreter (it must be
on before triton is imported, hence the subprocess); there ``_path`` asserts the kernels really ran.
"""

from __future__ import annotations

import copy
import operator
import os
import subprocess
import sys

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from autopar.codegen import fusion
from autopar.codegen import lower as L

from dist_utils import run_ranks

KERNEL = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter run below sets it
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESET = os.path.join(ROOT, "tests", "data", "compute_bound.json")


def _lowered(fn, *args) -> fx.GraphModule:
    """``fn`` traced to ATen and shaped like a lowered graph on a 1-rank mesh: each op followed by
    its ``check``, every tensor replicated."""
    from torch.fx.experimental.proxy_tensor import make_fx

    traced = make_fx(fn)(*args)
    g, env = fx.Graph(), {}
    for n in traced.graph.nodes:
        sub = lambda a: env[a] if isinstance(a, fx.Node) else a  # noqa: E731
        if n.op == "output":
            g.output(fx.map_arg(n.args[0], sub))
            continue
        if n.op == "placeholder":
            new = g.placeholder(n.name)
        elif n.target is operator.getitem:
            new = g.call_function(operator.getitem, (env[n.args[0]], n.args[1]))
        else:
            op = g.call_function(n.target, fx.map_arg(n.args, sub), fx.map_arg(n.kwargs, sub))
            op.meta["val"] = n.meta["val"]
            new = g.call_function(L.check, (op, (("R",),), n.name))
        new.meta["val"] = n.meta["val"]
        new.meta[L.META_ORIGIN] = n.name
        if isinstance(n.meta["val"], torch.Tensor):
            new.meta[L.META_PLACED] = ("R",)
        env[n] = new
    return fx.GraphModule(torch.nn.Module(), g)


def _is_fused(n: fx.Node) -> bool:
    return n.target is L.local_call and isinstance(n.args[0], tuple) and n.args[0][0] == L.FUSED


def _fused(fn, *args):
    """(fused callable over ``args``, its one FusedOp): ``fn`` must make exactly one group."""
    gm = _lowered(fn, *[a.detach() for a in args])
    report = fusion.fuse(gm, "triton")
    calls = [n for n in gm.graph.nodes if _is_fused(n)]
    assert len(calls) == 1 and len(report["kernels"]) == 1, gm.graph
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    which = [names.index(t.name) for t in calls[0].args[2]]
    op = calls[0].args[0][1]
    return (lambda *xs: fusion.run_fused(op, None, [xs[i] for i in which])), op, report["kernels"][0]


def _path(op, args):
    assert fusion.uses_kernel(op, args) is KERNEL, f"expected the {'triton' if KERNEL else 'torch'} path"


def _rand(shape, dtype, seed, grad=True):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x.requires_grad_(grad)


def _bias_gelu(x, b):
    h = (x + b).view(x.shape[0], 1, x.shape[1])
    return F.gelu(h), F.gelu(h - 1.0, approximate="tanh")


def _bias_residual_layernorm(x, b, r, w, lb):
    h = r + (x + b)
    return h, F.layer_norm(h, h.shape[-1:], w, lb, 1e-5)


def _softmax(x, s, m):
    return torch.softmax(x * s + m, dim=-1)


def _rmsnorm(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _casts(x, y):
    return ((x.to(torch.bfloat16) * 2.0).to(torch.float32) + y).sigmoid()


def _where_max(x, y, c):
    return torch.where(c, torch.maximum(x, y), torch.minimum(x, y.neg())) * torch.sigmoid(y)


def _misc(x, y):
    a = torch.sub(F.silu(x), torch.tanh(y), alpha=2) + torch.log(y.abs() + 1) * torch.erf(x)
    a = a + torch.sqrt(torch.relu(x)) - torch.reciprocal(1 + x.pow(2)) + torch.exp(-y.abs()) / 3
    return a - a.amax(-1, keepdim=True), a / (a * a).sum(-1, keepdim=True)


def _inputs(name, R, C, dtype):
    t = lambda *shape, seed, grad=True: _rand(shape, dtype, seed, grad)  # noqa: E731
    return {
        "bias_gelu": lambda: (_bias_gelu, "pointwise", (t(R, C, seed=1), t(C, seed=2))),
        "bias_residual_layernorm": lambda: (_bias_residual_layernorm, "row", (
            t(R, C, seed=1), t(C, seed=2), t(R, C, seed=3), t(C, seed=4), t(C, seed=5))),
        "softmax": lambda: (_softmax, "row", (t(R, C, seed=1), t(seed=2), t(R, 1, seed=3))),
        "rmsnorm": lambda: (_rmsnorm, "row", (t(R, C, seed=1), t(C, seed=2))),
        "casts": lambda: (_casts, "pointwise", (t(R, C, seed=1), t(R, C, seed=2))),
        "where_max": lambda: (_where_max, "pointwise", (t(R, C, seed=1), t(R, C, seed=2),
                                                        torch.rand(R, C, generator=torch.Generator().manual_seed(3)) < 0.5)),
        "misc": lambda: (_misc, "row", (t(R, C, seed=1), t(R, C, seed=2))),
    }[name]()


# (R, C): C not a power of two; 3 x 1500 loops over two column blocks in pointwise kernels.
SHAPES = [(7, 33), (3, 1500)]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("R,C", SHAPES)
@pytest.mark.parametrize("name", ["bias_gelu", "bias_residual_layernorm", "softmax", "rmsnorm", "casts",
                                  "where_max", "misc"])
def test_kernel_matches_torch_forward_and_backward(name, R, C, dtype):
    fn, pattern, args = _inputs(name, R, C, dtype)
    run, op, kernel = _fused(fn, *args)
    assert kernel["pattern"] == pattern, kernel
    _path(op, args)
    tup = lambda t: (t,) if isinstance(t, torch.Tensor) else t  # noqa: E731
    want, got = tup(fn(*args)), tup(run(*args))
    # A kernel computes in fp32 and rounds once, at the store: compare it against fp32 math.
    exact = tup(fn(*[a.detach().float() if a.dtype == torch.bfloat16 else a for a in args])) if KERNEL else want
    assert len(got) == len(want)
    for w, e, g in zip(want, exact, got):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g.float(), e.float(), **TOL[dtype])
    leaves = [a for a in args if a.requires_grad]
    douts = [_rand(w.shape, w.dtype, 10 + k, grad=False) for k, w in enumerate(want)]
    ref = torch.autograd.grad(want, leaves, douts)
    res = torch.autograd.grad(got, leaves, douts)
    for r, s in zip(ref, res):
        torch.testing.assert_close(s, r, **TOL[dtype])


def test_groups_respect_the_rules():
    x, b = torch.randn(6, 40), torch.randn(40)
    # one cast alone is not worth a kernel; a sum over dim 0 is not a row op; a [6, 1] mean of a
    # [6, 40] value is one, and a [40]-wide gelu joins its bias add.
    assert fusion.find_groups(_lowered(lambda x: x.to(torch.bfloat16), x)) == []
    assert fusion.find_groups(_lowered(lambda x: (x * 2).sum(0, keepdim=True).exp(), x)) == []
    (g,) = fusion.find_groups(_lowered(lambda x, b: F.gelu(x + b), x, b))
    assert [i.kind for i in g.inputs.values()] == ["full", "col"] and g.program.pattern == "pointwise"
    (g,) = fusion.find_groups(_lowered(lambda x: x - x.mean(-1, keepdim=True), x))
    assert g.program.pattern == "row"
    # an input broadcast over dim 0 ([40] against [2, 6, 40] is a col, [6, 40] is neither) is not fused
    y = torch.randn(2, 6, 40)
    assert fusion.find_groups(_lowered(lambda y, x: (y + x).exp(), y, x)) == []
    # a value read outside the group becomes a second output, full outputs first
    def centered(x):
        m = x.mean(-1, keepdim=True)
        return m, (x - m).exp()

    (g,) = fusion.find_groups(_lowered(centered, x))
    assert g.program.out_kinds == ("full", "row")


def test_gpt_gets_three_kernels_and_torch_backend_changes_nothing():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import gpt

    import autopar
    from autopar.passes.annotate import CostContext
    from autopar.passes.trace import trace

    model, x = gpt.tiny()
    mesh = autopar.Mesh({"tp": 2}, hardware=PRESET)
    plan = autopar.plan(model, mesh, x)
    gm = L.lower(trace(model, x), plan, CostContext(mesh.axes, mesh.hardware_spec).collectives)
    code = gm.code
    report = fusion.fuse(gm, "torch")
    assert gm.code == code
    kernels = report["kernels"]
    assert len(kernels) >= 3 and len({k["hash"] for k in kernels}) == len(kernels), kernels
    ops = {op for k in kernels for op in k["ops"]}
    assert {"aten.gelu.default", "aten.native_layer_norm.default", "aten.add.Tensor"} <= ops
    assert all(k["name"] == f"fused_{k['hash'][:8]}" and k["groups"] for k in kernels)


def _gpt_on_ranks(rank, world, plan_json):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import gpt

    import autopar
    from models import rel_err

    model, (ids,) = gpt.tiny()
    ref = copy.deepcopy(model)
    pm = autopar.compile(model, autopar.Mesh({"tp": 2}, hardware=PRESET), example_inputs=(ids,),
                         plan=autopar.Plan.from_json(plan_json))
    backend, _ = fusion.choose_backend("cpu")
    fusion.fuse(pm.lowered_graph, backend)  # in place (compile may have fused already)
    fused = sum(1 for n in pm.lowered_graph.graph.nodes if _is_fused(n))
    y, y_ref = pm(ids), ref(ids)
    y.float().pow(2).mean().backward()
    y_ref.float().pow(2).mean().backward()
    ref_params = dict(ref.named_parameters())
    grad = max(rel_err(p.grad.full_tensor(), ref_params[fqn].grad) for fqn, p in pm.named_parameters())
    return {"backend": backend, "fused": fused,
            "out": rel_err(y, y_ref), "grad": grad, "fixups": list(pm.runtime_fixups)}


def test_fused_gpt_on_two_ranks_matches_single_process():
    if not KERNEL:  # unfused, the program is unchanged (test above) and test_numerics checks it on ranks
        pytest.skip("runs in the interpreter pass, where the groups are fused")
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import gpt

    import autopar

    model, x = gpt.tiny()
    plan = autopar.plan(model, autopar.Mesh({"tp": 2}, hardware=PRESET), x)
    reports = run_ranks(_gpt_on_ranks, 2, plan.to_json())
    for rep in reports:
        assert rep["out"] < 1e-4 and rep["grad"] < 1e-4, rep
        assert rep["fixups"] == []
        assert rep["backend"] == "triton-interpreter" and rep["fused"] >= 6, rep


def test_generated_kernels_pass_the_same_checks_under_interpreter(tmp_path):
    if KERNEL:
        pytest.skip("already inside the interpreter run")
    pytest.importorskip("triton", reason="triton is not installed; the kernel path cannot run")
    env = dict(os.environ, TRITON_INTERPRET="1", AUTOPAR_CACHE_DIR=str(tmp_path), AUTOPAR_TEST_KEEP_CACHE="1")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-k", "not interpreter", "-p", "no:cacheprovider"]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "passed" in r.stdout and "skipped" not in r.stdout, r.stdout + r.stderr
    assert len(list((tmp_path / "kernels").glob("*.py"))) >= 7  # the generated sources, by hash
