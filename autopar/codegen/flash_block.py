"""Attention over one key/value block, with its log-sum-exp: the building block of ring attention.

Ring attention splits the keys into blocks, computes each query block against one key/value block
at a time, and merges the partial results by their log-sum-exp. For one block, with
s_ij = scale * q_i . k_j over the allowed keys j (causal: q_pos0 + i >= k_pos0 + j),

    lse_i = log sum_j exp(s_ij),    out_i = sum_j exp(s_ij - lse_i) v_j,

and a row with no allowed key has out_i = 0, lse_i = -inf (never NaN), so merging it is a no-op.

Layout follows the Triton tutorials: the kernel, then its launcher, then the torch fallback that
runs when Triton cannot (no triton, or a CPU tensor without ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math

import torch

from .triton_support import interpreted, kernel_runs, tl, triton

if triton is not None:

    @triton.jit
    def _attention_block_kernel(
        Q, K, V, O, LSE,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
        H, Lq, Lk, D, qk_scale, q_pos0, k_pos0,
        CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per (query tile, batch*head): online softmax over key tiles, in base 2.

        Running max m, running sum l and accumulator acc are fp32; ``qk_scale`` = scale * log2(e).
        UPCAST does the dots in fp32 (the interpreter's bf16 tl.dot returns garbage).
        """
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)  # int64: no overflow on big tensors
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < D
        q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < Lq) & d_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = Lk
        if CAUSAL:  # key tiles wholly after this query tile's last position contribute nothing
            hi = tl.minimum(Lk, tl.maximum(0, q_pos0 + (pid_m + 1) * BLOCK_M - k_pos0))
        for start_n in range(0, hi, BLOCK_N):
            n = start_n + offs_n
            kv_ok = (n[:, None] < Lk) & d_ok
            k = tl.load(K + b * skb + h * skh + n[:, None] * skn + offs_d[None, :] * skd, mask=kv_ok, other=0.0)
            v = tl.load(V + b * svb + h * svh + n[:, None] * svn + offs_d[None, :] * svd, mask=kv_ok, other=0.0)
            if UPCAST:
                k, v = k.to(tl.float32), v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            ok = n[None, :] < Lk
            if CAUSAL:
                ok = ok & (q_pos0 + offs_m[:, None] >= k_pos0 + n[None, :])
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked so far: avoid -inf - -inf
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        m_ok = offs_m < Lq
        o_ptrs = O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok)
        tl.store(LSE + (b * H + h) * Lq + offs_m, lse, mask=m_ok)


def backend(q: torch.Tensor) -> str:
    """Return "triton" when :func:`attention_block` will run the kernel for ``q``, else "torch".

    The kernel runs when triton imports and either ``q`` is on CUDA or ``TRITON_INTERPRET=1``
    (the interpreter then runs it on CPU tensors), for fp16, bf16 and fp32 inputs.
    """
    return "triton" if kernel_runs(q) else "torch"


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"want q [B,H,Lq,D], k = v [B,H,Lk,D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in B, H or D "
                         "(expand GQA heads before calling)")


def _allowed(lq: int, lk: int, q_pos0: int, k_pos0: int, device) -> torch.Tensor:
    """[Lq, Lk] bool: query q_pos0 + i may see key k_pos0 + j iff q_pos0 + i >= k_pos0 + j."""
    qi = torch.arange(lq, device=device) + q_pos0
    kj = torch.arange(lk, device=device) + k_pos0
    return qi[:, None] >= kj[None, :]


def _scores(q, k, scale: float, causal: bool, q_pos0: int, k_pos0: int) -> torch.Tensor:
    """fp32 scale * q k^T with disallowed entries set to -inf."""
    s = scale * (q.float() @ k.float().transpose(-1, -2))
    if causal:
        s = s.masked_fill(~_allowed(q.shape[2], k.shape[2], q_pos0, k_pos0, q.device), float("-inf"))
    return s


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (no allowed key) replaced by 0, so exp(s - lse) is 0 on such rows, not NaN."""
    return torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)


def _attention_block_triton(q, k, v, scale: float, causal: bool, q_pos0: int, k_pos0: int):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(D))  # tl.dot wants every block dim >= 16
    ieee = q.dtype == torch.float32  # fp32 "ieee" dots: 32-row query tiles, 8 warps (2.4-28x faster on an H100)
    block_m = min(32 if ieee else 64, max(16, triton.next_power_of_2(Lq)))
    block_n = min(64 if block_d <= 128 else 32, max(16, triton.next_power_of_2(Lk)))
    grid = (triton.cdiv(Lq, block_m), B * H)
    upcast = q.dtype == torch.bfloat16 and interpreted()
    _attention_block_kernel[grid](
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, Lq, Lk, D, scale * math.log2(math.e), q_pos0, k_pos0,
        CAUSAL=causal, PRECISION="ieee" if q.dtype == torch.float32 or upcast else None, UPCAST=upcast,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=8 if ieee else 4, num_stages=2 if ieee else 3,
    )
    return out, lse


def attention_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
                    q_pos0: int = 0, k_pos0: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B,H,Lq,D] over one key/value block k, v [B,H,Lk,D] -> (out, lse).

    lse_i = log sum_j exp(scale q_i.k_j) over allowed j (fp32, [B,H,Lq]); out_i = softmax-weighted
    sum of v_j, in q's dtype. Causal allows key j for query i iff q_pos0 + i >= k_pos0 + j; a row
    with no allowed key gives out 0 and lse -inf. Runs the Triton kernel when :func:`backend` says
    so, else fp32 torch math.
    """
    _check(q, k, v)
    if backend(q) == "triton":
        return _attention_block_triton(q, k, v, scale, causal, q_pos0, k_pos0)
    s = _scores(q, k, scale, causal, q_pos0, k_pos0)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.exp(s - _finite(lse)[..., None]) @ v.float()
    return out.to(q.dtype), lse


def attention_block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, *, scale: float, causal: bool,
                             q_pos0: int = 0, k_pos0: int = 0
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's share of the attention gradients, given the FINAL (merged) out and lse.

    P = exp(scale q k^T - lse) (masked to 0), dv = P^T dout, dP = dout v^T,
    delta = rowsum(dout * out), dS = P * (dP - delta), dq = scale dS k, dk = scale dS^T q.
    Summing dq over all key blocks gives the full dq; dk, dv are exact for this block. Rows with
    lse = -inf contribute zero. fp32 math; results in the dtypes of q, k, v.
    """
    _check(q, k, v)
    s = _scores(q, k, scale, causal, q_pos0, k_pos0)
    p = torch.exp(s - _finite(lse.float())[..., None])
    p = torch.where(lse[..., None] == float("-inf"), torch.zeros_like(p), p)
    do = dout.float()
    dv = p.transpose(-1, -2) @ do
    dp = do @ v.float().transpose(-1, -2)
    delta = (do * out.float()).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = scale * (ds @ k.float())
    dk = scale * (ds.transpose(-1, -2) @ q.float())
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial results of the same query rows over disjoint key sets.

    lse = logaddexp(lse_a, lse_b), out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b, in fp32.
    A side with lse -inf has weight 0; both -inf gives out 0 and lse -inf.
    """
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    ref = _finite(lse)
    wa = torch.exp(lse_a.float() - ref)[..., None]
    wb = torch.exp(lse_b.float() - ref)[..., None]
    return (wa * out_a.float() + wb * out_b.float()).to(out_a.dtype), lse
