"""MoE token permute / combine (autopar/codegen/moe_permute.py) against float64 loop references.

Every test but the last runs twice: here (the torch fallback on CPU) and, in a fresh process with
TRITON_INTERPRET=1, on the Triton kernels through the interpreter. The interpreter must be on
before triton is imported, hence the subprocess; there ``_path`` asserts the kernels really ran.
"""

import os
import subprocess
import sys

import pytest
import torch

from autopar.codegen import moe_permute as mp

KERNEL = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter run below sets it


def _path(t):
    assert mp.uses_triton(t) is KERNEL, f"expected the {'triton' if KERNEL else 'torch'} path"
    return t


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _ref_permute_grad(g, rows, T):
    gx = torch.zeros(T, g.shape[1], dtype=torch.float64)
    for i, t in enumerate(rows.tolist()):
        gx[t] += g[i].double()
    return gx


def _ref_combine(y, inv, w):
    out = torch.zeros(inv.shape[0], y.shape[1], dtype=torch.float64)
    for t in range(inv.shape[0]):
        for j in range(inv.shape[1]):
            if inv[t, j] >= 0:
                out[t] += (1.0 if w is None else float(w[t, j].detach())) * y[inv[t, j]].double()
    return out


def _ref_combine_grads(g, y, inv, w):
    gy = torch.zeros(y.shape, dtype=torch.float64)
    gw = torch.zeros(inv.shape, dtype=torch.float64)
    for t in range(inv.shape[0]):
        for j in range(inv.shape[1]):
            n = int(inv[t, j])
            if n >= 0:
                gy[n] = (1.0 if w is None else float(w[t, j].detach())) * g[t].double()
                gw[t, j] = (g[t].double() * y[n].double()).sum()
    return gy, gw


def _routing(T, k, N, drop, seed):
    """inv [T,k]: distinct rows of y (some of the N never referenced), about ``drop`` of them -1."""
    g = _gen(seed)
    inv = torch.randperm(max(N, T * k), generator=g)[: T * k].view(T, k)
    return torch.where((torch.rand(T, k, generator=g) < drop) | (inv >= N), -1, inv)


# (T, N, H): repeats (N > T), tokens never listed (N < T), non-power-of-2 H, empty dispatch.
PERMUTE_CASES = [(7, 15, 40), (5, 12, 130), (20, 6, 40), (1, 4, 17), (9, 0, 40), (0, 0, 40)]


@pytest.mark.parametrize("T,N,H", PERMUTE_CASES)
def test_permute_rows_forward_and_backward(T, N, H):
    g = _gen(T * 100 + N)
    x = _path(torch.randn(T, H, generator=g)).requires_grad_()
    rows = torch.randint(0, max(T, 1), (N,), generator=g)
    out = mp.permute_rows(x, rows)
    assert out.shape == (N, H) and out.dtype == x.dtype
    assert torch.equal(out, x.detach()[rows])  # a copy: exact
    dout = torch.randn(N, H, generator=g)
    out.backward(dout)
    torch.testing.assert_close(x.grad.double(), _ref_permute_grad(dout, rows, T), rtol=1e-6, atol=1e-6)
    ref = torch.zeros(T, H).index_add_(0, rows, dout)
    torch.testing.assert_close(x.grad, ref, rtol=1e-6, atol=1e-6)


# (T, k, N, H, drop): N > T*k leaves rows of y unreferenced; drop = share of -1 entries.
COMBINE_CASES = [(6, 2, 15, 40, 0.25), (5, 3, 15, 130, 0.2), (4, 1, 4, 40, 0.0), (8, 2, 16, 33, 1.0),
                 (0, 2, 7, 40, 0.0), (3, 2, 0, 40, 1.0), (3, 0, 5, 40, 0.0)]


@pytest.mark.parametrize("with_weights", [True, False])
@pytest.mark.parametrize("T,k,N,H,drop", COMBINE_CASES)
def test_combine_forward_and_backward(T, k, N, H, drop, with_weights):
    g = _gen(T * 1000 + k * 100 + N)
    inv = _routing(T, k, N, drop, seed=N + T)
    y = _path(torch.randn(N, H, generator=g)).requires_grad_()
    w = torch.rand(T, k, generator=g).requires_grad_() if with_weights else None
    out = mp.combine(y, inv, w)
    assert out.shape == (T, H) and out.dtype == y.dtype
    torch.testing.assert_close(out.double(), _ref_combine(y.detach(), inv, w), rtol=1e-6, atol=1e-6)
    dout = torch.randn(T, H, generator=g)
    out.backward(dout)
    gy, gw = _ref_combine_grads(dout, y.detach(), inv, w)
    torch.testing.assert_close(y.grad.double(), gy, rtol=1e-6, atol=1e-6)
    if with_weights:
        assert w.grad.shape == (T, k)
        torch.testing.assert_close(w.grad.double(), gw, rtol=1e-5, atol=1e-5)
    # and against autograd through the plain torch formula
    yr = y.detach().clone().requires_grad_()
    wr = w.detach().clone().requires_grad_() if with_weights else None
    coef = (inv >= 0).float() * (wr if with_weights else 1.0)
    ref = (coef[..., None] * yr[inv.clamp(min=0)]).sum(1) if N else torch.zeros(T, H)
    if ref.requires_grad:
        ref.backward(dout)
        torch.testing.assert_close(y.grad, yr.grad, rtol=1e-5, atol=1e-5)
        if with_weights:
            torch.testing.assert_close(w.grad, wr.grad, rtol=1e-5, atol=1e-5)


def test_dropped_entries_never_leak_nan_or_inf():
    inv = torch.tensor([[1, -1], [-1, 3], [2, 4]])
    y = _path(torch.randn(6, 24, generator=_gen(1)))
    y[0], y[5] = float("inf"), float("nan")  # rows 0 and 5 are never referenced
    y.requires_grad_()
    w = torch.tensor([[0.5, float("nan")], [float("inf"), 2.0], [1.0, 3.0]], requires_grad=True)
    out = mp.combine(y, inv, w)
    assert out.isfinite().all()
    out.backward(torch.ones_like(out))
    assert y.grad.isfinite().all() and (y.grad[[0, 5]] == 0).all()
    assert w.grad.isfinite().all() and w.grad[0, 1] == 0 and w.grad[1, 0] == 0
    torch.testing.assert_close(out.double(), _ref_combine(y.detach(), inv, torch.nan_to_num(w.detach())))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    g = _gen(2)
    x = _path(torch.randn(9, 130, generator=g).to(dtype)).requires_grad_()
    rows = torch.randint(0, 9, (20,), generator=g)
    out = mp.permute_rows(x, rows)
    assert out.dtype == dtype and torch.equal(out, x.detach()[rows])
    dout = torch.randn(20, 130, generator=g).to(dtype)
    out.backward(dout)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), _ref_permute_grad(dout, rows, 9), rtol=2e-2, atol=2e-2)

    inv = _routing(7, 2, 20, 0.2, seed=3)
    y = torch.randn(20, 40, generator=g).to(dtype).requires_grad_()
    w = torch.rand(7, 2, generator=g).to(dtype).requires_grad_()
    out = mp.combine(y, inv, w)
    assert out.dtype == dtype
    # fp32 accumulation, one rounding at the end: matches the fp64 sum rounded to dtype
    torch.testing.assert_close(out, _ref_combine(y.detach(), inv, w.detach()).to(dtype), rtol=0, atol=0)
    dout = torch.randn(7, 40, generator=g).to(dtype)
    out.backward(dout)
    gy, gw = _ref_combine_grads(dout, y.detach(), inv, w.detach())
    assert y.grad.dtype == dtype and w.grad.dtype == dtype
    torch.testing.assert_close(y.grad.double(), gy, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w.grad.double(), gw, rtol=2e-2, atol=5e-2)


def test_non_contiguous_inputs_and_expanded_grad():
    g = _gen(4)
    x = _path(torch.randn(40, 11, generator=g).t()).requires_grad_()  # [11, 40], strides (1, 11)
    rows = torch.tensor([3, 0, 3, 10, 7, 3])
    out = mp.permute_rows(x, rows)
    assert torch.equal(out, x.detach()[rows])
    out.sum().backward()  # grad_out is a stride-0 expand of a scalar
    torch.testing.assert_close(x.grad, torch.zeros(11, 40).index_add_(0, rows, torch.ones(6, 40)))
    y = torch.randn(40, 8, generator=g).t().requires_grad_()  # [8, 40]
    inv, w = torch.tensor([[7, 0], [-1, 2], [5, 1]]), torch.rand(6, generator=g)[::2].view(3, 1).expand(3, 2)
    out = mp.combine(y, inv, w)
    torch.testing.assert_close(out.double(), _ref_combine(y.detach(), inv, w))
    out.sum().backward()
    gy, _ = _ref_combine_grads(torch.ones(3, 40), y.detach(), inv, w)
    torch.testing.assert_close(y.grad.double(), gy)


def test_dispatch_then_combine_round_trip():
    """Route each token to k distinct experts, group by expert, combine: out = sum_j w[t,j] x[t]."""
    T, k, E, H = 12, 3, 5, 40
    g = _gen(5)
    x = _path(torch.randn(T, H, generator=g)).requires_grad_()
    experts = torch.rand(T, E, generator=g).argsort(1)[:, :k]  # [T,k], distinct per token
    order = torch.sort(experts.reshape(-1), stable=True).indices  # assignments grouped by expert
    rows = order // k  # token of each dispatched row
    inv = torch.empty(T * k, dtype=torch.long)
    inv[order] = torch.arange(T * k)
    inv = inv.view(T, k)
    w = torch.softmax(torch.randn(T, k, generator=g), 1).requires_grad_()
    dispatched = mp.permute_rows(x, rows)
    assert torch.equal(dispatched, x.detach()[rows])
    assert (experts.reshape(-1)[order].diff() >= 0).all()
    out = mp.combine(dispatched, inv, w)
    torch.testing.assert_close(out, x.detach() * w.detach().sum(1, keepdim=True))
    dout = torch.randn(T, H, generator=g)
    out.backward(dout)
    torch.testing.assert_close(x.grad, dout * w.detach().sum(1, keepdim=True))
    torch.testing.assert_close(w.grad, (dout @ x.detach().t()).diagonal()[:, None].expand(T, k))


def test_backward_is_bitwise_deterministic():
    g = _gen(6)
    x = _path(torch.randn(5, 130, generator=g))
    rows = torch.randint(0, 5, (64,), generator=g)  # ~13 repeats per token
    dout = torch.randn(64, 130, generator=g)
    grads = []
    for _ in range(2):
        xr = x.clone().requires_grad_()
        mp.permute_rows(xr, rows).backward(dout)
        grads.append(xr.grad)
    assert torch.equal(grads[0], grads[1])


def test_bad_arguments_raise():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError):
        mp.permute_rows(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError):
        mp.permute_rows(x, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError):
        mp.combine(x, torch.tensor([[0, 1]]), torch.ones(2, 2))


def test_gradcheck_float64_torch_path():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert not mp.uses_triton(x)  # float64 always takes the torch path
    torch.autograd.gradcheck(lambda a: mp.permute_rows(a, torch.tensor([1, 3, 1, 0, 1])), (x,))
    w = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    inv = torch.tensor([[0, -1], [3, 1], [-1, 2]])
    torch.autograd.gradcheck(lambda a, b: mp.combine(a, inv, b), (x, w))


def test_triton_kernels_pass_the_same_checks_under_interpreter():
    if KERNEL:
        pytest.skip("already inside the interpreter run")
    pytest.importorskip("triton", reason="triton is not installed; the kernel path cannot run")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-k", "not interpreter", "-p", "no:cacheprovider"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "passed" in r.stdout and "skipped" not in r.stdout, r.stdout + r.stderr
