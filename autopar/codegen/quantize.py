"""Blockwise int8 absmax quantization (bitsandbytes-style), for compressed communication.

A flat tensor x of n elements is cut into blocks of ``block`` consecutive elements (the last one
may be short); block j keeps one fp32 scale and n_j int8 codes:

    s_j = max_{i in j} |x_i| / 127,     q_i = clamp(floor(x_i / s_j + 1/2), -127, 127),
    dequantize:  x̂_i = q_i · s_j,      |x̂_i − x_i| <= s_j / 2,

computed in fp32 whatever x's dtype, as x_i · (127 / max|x|) so that the block's absmax maps to
exactly ±127. A block of zeros has s_j = 0 and q = 0 (it dequantizes to zeros, never NaN).
``dequantize_sum`` dequantizes W quantized copies of the same n elements (W ranks' chunks) and
sums them in fp32, in increasing row order: sum_w q[w, i] · s[w, j].

Layout follows the Triton tutorials: the kernels, their launchers, then the torch fallback that
runs when Triton cannot (no triton, fp64, or a CPU tensor without ``TRITON_INTERPRET=1``). Each
kernel program owns ``_rows(BLOCK_P2)`` blocks, as a [rows, BLOCK_P2] tile (BLOCK_P2 = ``block``
rounded up to a power of two, masked), so any block size works. Both paths compute the same fp32
formula.
"""

from __future__ import annotations

import torch

from .triton_support import kernel_runs, tl, triton

ROWS = 16  # blocks per kernel program, at most: a tile holds <= 2048 elements (more spilled on an H100)


def _rows(p2: int) -> int:
    return max(1, min(ROWS, 2048 // p2))

if triton is not None:

    @triton.jit
    def _quantize_kernel(X, Q, S, n, block, ROWS: tl.constexpr, BLOCK_P2: tl.constexpr):
        """Blocks [pid·ROWS, (pid+1)·ROWS): S[j] = absmax / 127, Q = floor(x · 127 / absmax + 1/2)."""
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
        cols = tl.arange(0, BLOCK_P2).to(tl.int64)
        idx = rows[:, None] * block + cols[None, :]
        ok = (cols[None, :] < block) & (idx < n)
        x = tl.load(X + idx, mask=ok, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        inv = tl.where(amax > 0, 127.0 / tl.where(amax > 0, amax, 1.0), 0.0)
        q = tl.floor(x * inv[:, None] + 0.5)
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(Q + idx, q.to(tl.int8), mask=ok)
        nb = (n + block - 1) // block
        tl.store(S + rows, amax / 127.0, mask=rows < nb)

    @triton.jit
    def _dequantize_sum_kernel(Q, S, OUT, n, block, W, sqw, ssw, ROWS: tl.constexpr, BLOCK_P2: tl.constexpr):
        """OUT[i] = sum_{w < W} Q[w, i] · S[w, i // block], in fp32, w in increasing order."""
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
        cols = tl.arange(0, BLOCK_P2).to(tl.int64)
        idx = rows[:, None] * block + cols[None, :]
        ok = (cols[None, :] < block) & (idx < n)
        nb = (n + block - 1) // block
        acc = tl.zeros([ROWS, BLOCK_P2], tl.float32)
        for w in range(0, W):
            q = tl.load(Q + w * sqw + idx, mask=ok, other=0).to(tl.float32)
            s = tl.load(S + w * ssw + rows, mask=rows < nb, other=0.0)
            acc += q * s[:, None]
        tl.store(OUT + idx, acc.to(OUT.dtype.element_ty), mask=ok)


def num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def _check_block(block: int) -> None:
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")


def quantize(x: torch.Tensor, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any float dtype, any shape, read flat) -> (q int8 [n], scales fp32 [ceil(n / block)])."""
    _check_block(block)
    if not x.dtype.is_floating_point:
        raise TypeError(f"quantize wants a floating-point tensor, got {x.dtype}")
    flat = x.reshape(-1)
    n = flat.numel()
    nb = num_blocks(n, block)
    if kernel_runs(flat) and n:
        flat = flat.contiguous()
        q = torch.empty(n, dtype=torch.int8, device=x.device)
        s = torch.empty(nb, dtype=torch.float32, device=x.device)
        p2 = triton.next_power_of_2(block)
        _quantize_kernel[(num_blocks(nb, _rows(p2)),)](flat, q, s, n, block, ROWS=_rows(p2), BLOCK_P2=p2)
        return q, s
    return _quantize_torch(flat, block)


def dequantize(q: torch.Tensor, scales: torch.Tensor, block: int = 64,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q int8 [n], scales fp32 [ceil(n / block)]) -> x̂ [n] in ``out_dtype``."""
    return dequantize_sum(q[None], scales[None], block, out_dtype)


def dequantize_sum(q: torch.Tensor, scales: torch.Tensor, block: int = 64,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W quantized copies (q int8 [W, n], scales fp32 [W, ceil(n / block)]) -> their sum [n], fp32
    accumulation, rows added in increasing order, rounded once to ``out_dtype``."""
    _check_block(block)
    if q.dim() != 2 or scales.dim() != 2 or q.shape[0] != scales.shape[0] or \
            scales.shape[1] != num_blocks(q.shape[1], block):
        raise ValueError(f"want q [W, n] and scales [W, ceil(n / {block})]; got q {tuple(q.shape)}, "
                         f"scales {tuple(scales.shape)}")
    w, n = q.shape
    scales = scales.float()
    if kernel_runs(scales) and n and w:
        q, scales = q.contiguous(), scales.contiguous()
        # fp32 out: the interpreter's bf16 store does not round like torch (moe_permute.py)
        out = torch.empty(n, dtype=torch.float32, device=q.device)
        nb = scales.shape[1]
        p2 = triton.next_power_of_2(block)
        _dequantize_sum_kernel[(num_blocks(nb, _rows(p2)),)](q, scales, out, n, block, w, q.stride(0), scales.stride(0),
                                                            ROWS=_rows(p2), BLOCK_P2=p2)
        return out.to(out_dtype)
    return _dequantize_sum_torch(q, scales, block).to(out_dtype)


# ---- torch fallback (and the tests' reference) ------------------------------------------------

def _blocks(flat: torch.Tensor, block: int) -> torch.Tensor:
    """[..., n] -> [..., nb, block], the tail zero-padded."""
    n = flat.shape[-1]
    pad = num_blocks(n, block) * block - n
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(*flat.shape[:-1], -1, block)


def _quantize_torch(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = flat.numel()
    x = _blocks(flat.float(), block)
    amax = x.abs().amax(-1) if n else x.new_zeros(0)
    inv = torch.where(amax > 0, 127.0 / torch.where(amax > 0, amax, 1.0), 0.0)
    q = torch.floor(x * inv[:, None] + 0.5).clamp_(-127, 127).to(torch.int8)
    return q.reshape(-1)[:n], amax / 127.0


def _dequantize_sum_torch(q: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    w, n = q.shape
    x = _blocks(q.float(), block) * scales[:, :, None]
    out = x[0].clone() if w else x.new_zeros(x.shape[1:])
    for r in range(1, w):  # increasing row order, like the kernel
        out += x[r]
    return out.reshape(-1)[:n]
