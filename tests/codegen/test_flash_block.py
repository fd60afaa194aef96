"""Block attention with log-sum-exp (autopar/codegen/flash_block.py) against torch's sdpa.

The tests named ``forward`` run twice: here (torch path on CPU) and, in a fresh process with
TRITON_INTERPRET=1, on the Triton kernel through the interpreter. The interpreter must be on
before triton is imported, hence the subprocess; it asserts that the kernel path really ran.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from autopar.codegen import flash_block as fb

EXPECT = os.environ.get("AUTOPAR_TEST_FLASH_BACKEND")  # set by the interpreter run below
NEG_INF = float("-inf")


def _block(q, k, v, **kw):
    if EXPECT:
        assert fb.backend(q) == EXPECT, f"expected the {EXPECT} path, got {fb.backend(q)}"
    return fb.attention_block(q, k, v, **kw)


def _qkv(b, h, lq, lk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for n in (lq, lk, lk))
    return q, k, v


def _allowed(lq, lk, q_pos0, k_pos0):
    return (torch.arange(lq)[:, None] + q_pos0) >= (torch.arange(lk)[None, :] + k_pos0)


def _ref_lse(q, k, scale, causal, q_pos0=0, k_pos0=0):
    s = scale * q.double() @ k.double().transpose(-1, -2)
    if causal:
        s = s.masked_fill(~_allowed(q.shape[2], k.shape[2], q_pos0, k_pos0), NEG_INF)
    return torch.logsumexp(s, -1).float()


# (B, H, Lq, Lk, D, causal, q_pos0, k_pos0): every row has at least one allowed key.
CASES = [
    (1, 2, 5, 13, 24, False, 0, 0),
    (2, 1, 13, 5, 24, True, 8, 0),
    (1, 2, 13, 24, 5, True, 20, 3),
    (1, 1, 70, 33, 24, True, 40, 8),  # two query tiles
    (1, 1, 70, 150, 24, True, 0, 0),  # causal tile skipping: query tile 0 reads 1 key tile, tile 1 reads 2
]


@pytest.mark.parametrize("b,h,lq,lk,d,causal,q_pos0,k_pos0", CASES)
def test_forward_matches_sdpa_and_logsumexp(b, h, lq, lk, d, causal, q_pos0, k_pos0):
    q, k, v = _qkv(b, h, lq, lk, d)
    scale = d**-0.5
    out, lse = _block(q, k, v, scale=scale, causal=causal, q_pos0=q_pos0, k_pos0=k_pos0)
    mask = _allowed(lq, lk, q_pos0, k_pos0) if causal else None
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == (b, h, lq)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, _ref_lse(q, k, scale, causal, q_pos0, k_pos0), rtol=1e-5, atol=1e-5)


def test_forward_matches_sdpa_is_causal():
    q, k, v = _qkv(1, 2, 19, 19, 12)
    out, _ = _block(q, k, v, scale=0.3, causal=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_forward_non_contiguous_inputs():
    # [B, L, H, D] storage, as a projection followed by a view gives
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(2, 3, 7, 11, 24))
    out, lse = _block(q, k, v, scale=0.2, causal=True, q_pos0=6)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=_allowed(7, 11, 6, 0), scale=0.2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_forward_key_blocks_merged_equal_full_attention(causal):
    q, k, v = _qkv(1, 2, 13, 29, 24, seed=1)
    q_pos0 = 16  # query rows 16..28 against keys 0..28, split into blocks at 0, 7, 20
    full_out, full_lse = _block(q, k, v, scale=0.2, causal=causal, q_pos0=q_pos0)
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:3], NEG_INF)
    for lo, hi in [(0, 7), (7, 20), (20, 29)]:
        o, l = _block(q, k[:, :, lo:hi], v[:, :, lo:hi], scale=0.2, causal=causal, q_pos0=q_pos0, k_pos0=lo)
        out, lse = fb.merge(out, lse, o, l)
    torch.testing.assert_close(out, full_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, full_lse, rtol=1e-5, atol=1e-5)
    mask = _allowed(13, 29, q_pos0, 0) if causal else None
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_forward_fully_masked_rows_give_zero_and_minus_inf():
    q, k, v = _qkv(1, 2, 6, 5, 24)
    # queries at 10..15, keys at 12..16: rows 0, 1 see nothing, row 2 sees key 12 only.
    out, lse = _block(q, k, v, scale=0.5, causal=True, q_pos0=10, k_pos0=12)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[:, :, :2] == 0).all() and (lse[:, :, :2] == NEG_INF).all()
    torch.testing.assert_close(out[:, :, 2], v[:, :, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, _ref_lse(q, k, 0.5, True, 10, 12), rtol=1e-5, atol=1e-5)
    # A block the queries cannot see at all: every row is empty, and merging it changes nothing.
    o_none, l_none = _block(q, k, v, scale=0.5, causal=True, q_pos0=0, k_pos0=100)
    assert (o_none == 0).all() and (l_none == NEG_INF).all()
    merged = fb.merge(out, lse, o_none, l_none)
    torch.testing.assert_close(merged[0], out)
    torch.testing.assert_close(merged[1], lse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_low_precision_inputs(dtype):
    q, k, v = _qkv(1, 2, 13, 21, 24, dtype=dtype)
    out, lse = _block(q, k, v, scale=0.2, causal=True, q_pos0=10)
    mask = _allowed(13, 21, 10, 0)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=0.2)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_merge_handles_minus_inf_on_either_side():
    out_a, out_b = torch.randn(2, 3), torch.randn(2, 3)
    lse_a = torch.tensor([NEG_INF, 0.5])
    lse_b = torch.tensor([NEG_INF, NEG_INF])
    out, lse = fb.merge(out_a, lse_a, out_b, lse_b)
    assert (out[0] == 0).all() and lse[0] == NEG_INF  # both sides empty
    torch.testing.assert_close(out[1], out_a[1])
    torch.testing.assert_close(lse[1], lse_a[1])
    out, lse = fb.merge(out_b, lse_b, out_a, lse_a)  # either order
    torch.testing.assert_close(out[1], out_a[1])


def _ring_backward(q, k, v, dout, scale, causal, q_pos0, cuts):
    """Forward block by block, merge, then sum each block's backward: what ring attention does."""
    out, lse = torch.zeros_like(q), torch.full(q.shape[:3], NEG_INF)
    blocks = list(zip(cuts[:-1], cuts[1:]))
    for lo, hi in blocks:
        o, l = fb.attention_block(q, k[:, :, lo:hi], v[:, :, lo:hi], scale=scale, causal=causal,
                                  q_pos0=q_pos0, k_pos0=lo)
        out, lse = fb.merge(out, lse, o, l)
    dq, dks, dvs = torch.zeros_like(q), [], []
    for lo, hi in blocks:
        g = fb.attention_block_backward(dout, q, k[:, :, lo:hi], v[:, :, lo:hi], out, lse, scale=scale,
                                        causal=causal, q_pos0=q_pos0, k_pos0=lo)
        dq += g[0]
        dks.append(g[1])
        dvs.append(g[2])
    return out, dq, torch.cat(dks, 2), torch.cat(dvs, 2)


@pytest.mark.parametrize("causal,q_pos0", [(False, 0), (True, 0), (True, 11)])
def test_backward_summed_over_blocks_matches_autograd(causal, q_pos0):
    q, k, v = _qkv(2, 2, 13, 24, 5, seed=2)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    scale = 0.4
    out, dq, dk, dv = _ring_backward(q, k, v, dout, scale, causal, q_pos0, [0, 5, 16, 24])
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    mask = _allowed(13, 24, q_pos0, 0) if causal else None
    ref = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, scale=scale)
    ref.backward(dout)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
    for got, want in [(dq, qr.grad), (dk, kr.grad), (dv, vr.grad)]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_backward_rows_without_keys_contribute_nothing():
    q, k, v = _qkv(1, 2, 6, 9, 8, seed=4)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    # queries at 2..7 against keys at 4..12: rows 0, 1 see nothing in any block.
    cuts = [0, 3, 9]
    out, dq, dk, dv = _ring_backward(q, k, v, dout, 0.3, True, -2, cuts)  # q_pos0 - k_pos0 = -2
    assert all(not t.isnan().any() for t in (out, dq, dk, dv))
    assert (dq[:, :, :2] == 0).all()
    _, dq2, dk2, dv2 = _ring_backward(q[:, :, 2:], k, v, dout[:, :, 2:], 0.3, True, 0, cuts)
    torch.testing.assert_close(dq[:, :, 2:], dq2)
    torch.testing.assert_close(dk, dk2)
    torch.testing.assert_close(dv, dv2)


def test_triton_kernel_passes_the_same_checks_under_interpreter():
    if EXPECT:
        pytest.skip("already inside the interpreter run")
    pytest.importorskip("triton", reason="triton is not installed; the kernel path cannot run")
    env = dict(os.environ, TRITON_INTERPRET="1", AUTOPAR_TEST_FLASH_BACKEND="triton")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-k", "forward", "-p", "no:cacheprovider"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "passed" in r.stdout and "skipped" not in r.stdout, r.stdout + r.stderr
