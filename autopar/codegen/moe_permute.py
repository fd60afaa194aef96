"""Token permute and unpermute of mixture-of-experts dispatch, deterministic in both directions.

Dispatch copies each token once per expert it is routed to, grouped by expert; combine sums a
token's expert outputs back, optionally weighted by its router probabilities:

    permute_rows(x, rows):         out[i] = x[rows[i]]                          x [T,H] -> [N,H]
    combine(y, inv, weights=None): out[t] = sum_j w[t,j] * y[inv[t,j]]          y [N,H] -> [T,H]

with inv[t, j] = -1 for a dropped assignment (it contributes nothing). Every op here, forward and
backward, is one gather-sum over CSR segments, out[r] = sum_{p in [ptr[r], ptr[r+1])} w[p] x[idx[p]]:
each program owns one output row, walks its segment in a fixed order with an fp32 accumulator and
writes once. No atomics, so results are bitwise reproducible. The backward of permute_rows (a sum
over the repeats of each token) is made a gather by a stable sort of ``rows`` (segment t lists the
i with rows[i] == t in increasing i); the backward of combine uses that each row of y is referenced
at most once, so its inverse map (row of y -> (t, j)) is a permutation built with ``scatter_``.

Layout follows the Triton tutorials: the kernels, their launchers, then the torch fallback that
runs when Triton cannot (no triton, or a CPU tensor without ``TRITON_INTERPRET=1``). The fallback
uses ``index_select`` / ``index_add_`` / a [T,k,H] gather-sum; ``index_add_`` is deterministic on
CPU (on CUDA it would use atomics, but CUDA without triton is not a configuration we target).
Indices are not range-checked on the kernel path (that would cost a device sync): keep rows in
[0, T), inv in [-1, N) with its non-negative entries unique.
"""

from __future__ import annotations


import torch

from .triton_support import kernel_runs, tl, triton

if triton is not None:

    @triton.jit
    def _segment_gather_kernel(X, IDX, PTR, W, OUT, H, sxr, sxc, sor, soc,
                               HAS_W: tl.constexpr, BLOCK_H: tl.constexpr):
        """out[r] = sum_{p in [PTR[r], PTR[r+1])} W[p] * X[IDX[p]], IDX[p] < 0 skipped; fp32, in order."""
        r = tl.program_id(0).to(tl.int64)  # int64 offsets: no overflow on big tensors
        start, end = tl.load(PTR + r), tl.load(PTR + r + 1)
        offs = tl.arange(0, BLOCK_H).to(tl.int64)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + offs
            ok = cols < H
            acc = tl.zeros([BLOCK_H], tl.float32)
            for p in range(start, end):
                src = tl.load(IDX + p)
                # cols * 0 + src: the interpreter makes (block mask & scalar mask) int64, not bool
                take = ok & (cols * 0 + src >= 0)
                row = tl.load(X + tl.maximum(src, 0) * sxr + cols * sxc, mask=take, other=0.0)
                row = row.to(tl.float32)
                if HAS_W:  # a dropped entry's weight may be anything (even NaN): zero it
                    row = row * tl.where(src >= 0, tl.load(W + p).to(tl.float32), 0.0)
                acc += row
            tl.store(OUT + r * sor + cols * soc, acc.to(OUT.dtype.element_ty), mask=ok)

    @triton.jit
    def _row_dot_kernel(G, Y, IDX, OUT, K, H, sgr, sgc, syr, syc, BLOCK_H: tl.constexpr):
        """OUT[p] = <G[p // K], Y[IDX[p]]> in fp32, 0 where IDX[p] < 0: the combine weights' gradient."""
        p = tl.program_id(0).to(tl.int64)
        src = tl.load(IDX + p)
        g_row = p // K
        offs = tl.arange(0, BLOCK_H).to(tl.int64)
        acc = tl.zeros([BLOCK_H], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + offs
            ok = cols < H
            g = tl.load(G + g_row * sgr + cols * sgc, mask=ok, other=0.0).to(tl.float32)
            take = ok & (cols * 0 + src >= 0)
            y = tl.load(Y + tl.maximum(src, 0) * syr + cols * syc, mask=take, other=0.0)
            acc += g * y.to(tl.float32)
        tl.store(OUT + p, tl.where(src >= 0, tl.sum(acc, 0), 0.0))


def uses_triton(t: torch.Tensor) -> bool:
    """True when the ops run the Triton kernels for ``t``: triton imports, ``t`` is fp16, bf16 or
    fp32, and ``t`` is on CUDA or ``TRITON_INTERPRET=1`` (the interpreter runs CPU tensors)."""
    return kernel_runs(t)


def _block_h(h: int) -> int:
    return min(1024, max(16, triton.next_power_of_2(h)))


def _interp_bf16(t: torch.Tensor) -> bool:
    # The interpreter's fp32 -> bf16 store does not round like torch: run it in fp32, torch rounds.
    return t.dtype == torch.bfloat16 and not t.is_cuda


def _segment_gather(x, idx, ptr, w, rows: int) -> torch.Tensor:
    """Launch :func:`_segment_gather_kernel`: [rows, H] in x's dtype (idx, ptr int64, w or None)."""
    out_dtype = x.dtype
    if _interp_bf16(x):
        x = x.float()
    out = torch.empty((rows, x.shape[1]), dtype=x.dtype, device=x.device)
    if rows and x.shape[1]:
        w = w.contiguous() if w is not None else None
        if w is not None and _interp_bf16(w):
            w = w.float()
        _segment_gather_kernel[(rows,)](
            x, idx.contiguous(), ptr.contiguous(), w if w is not None else idx, out, x.shape[1],
            *x.stride(), *out.stride(), HAS_W=w is not None, BLOCK_H=_block_h(x.shape[1]), num_warps=4)
    elif rows:
        out.zero_()
    return out.to(out_dtype)


def _row_dot(g, y, idx, k: int) -> torch.Tensor:
    """fp32 [len(idx)]: <g[p // k], y[idx[p]]>, 0 where idx[p] < 0."""
    g, y = (t.float() if _interp_bf16(t) else t for t in (g, y))
    out = torch.zeros(idx.numel(), dtype=torch.float32, device=g.device)
    if idx.numel() and g.shape[1]:
        _row_dot_kernel[(idx.numel(),)](g, y, idx.contiguous(), out, k, g.shape[1], *g.stride(), *y.stride(),
                                        BLOCK_H=_block_h(g.shape[1]), num_warps=4)
    return out


def _arange(n: int, like: torch.Tensor, step: int = 1) -> torch.Tensor:
    """CSR pointers of n segments of ``step`` entries each: [0, step, ..., n * step]."""
    return torch.arange(n + 1, dtype=torch.int64, device=like.device) * step


def _acc(t: torch.Tensor) -> torch.Tensor:
    """t in the torch path's accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """_acc(t)[idx] [len(idx), H], zeros where idx < 0 (so inf/NaN never leak in) or t is empty."""
    if t.shape[0] == 0:
        return _acc(t.new_zeros((idx.numel(), t.shape[1])))
    return torch.where((idx >= 0)[:, None], _acc(t.index_select(0, idx.clamp(min=0))), 0.0)


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rows):
        ctx.save_for_backward(rows)
        ctx.num_tokens = x.shape[0]
        if uses_triton(x):
            return _segment_gather(x, rows, _arange(rows.numel(), rows), None, rows.numel())
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, g):
        (rows,), T = ctx.saved_tensors, ctx.num_tokens
        if uses_triton(g):  # segment t = the i with rows[i] == t, increasing i (stable sort)
            sorted_rows, order = torch.sort(rows, stable=True)
            ptr = torch.searchsorted(sorted_rows, torch.arange(T + 1, device=rows.device))
            return _segment_gather(g, order, ptr, None, T), None
        gx = _acc(g.new_zeros((T, g.shape[1])))
        return gx.index_add_(0, rows, _acc(g)).to(g.dtype), None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, inv, weights):
        ctx.save_for_backward(y, inv, weights)
        T, k = inv.shape
        if uses_triton(y):
            w = weights.reshape(-1) if weights is not None else None
            return _segment_gather(y, inv.reshape(-1), _arange(T, inv, k), w, T)
        ok = inv >= 0
        rows = _take(y, inv.reshape(-1)).view(T, k, y.shape[1])
        coef = ok.to(rows.dtype) if weights is None else torch.where(ok, weights.to(rows.dtype), 0.0)
        return (coef[..., None] * rows).sum(1).to(y.dtype)

    @staticmethod
    def backward(ctx, g):
        y, inv, weights = ctx.saved_tensors
        (T, k), N = inv.shape, y.shape[0]
        flat, ok = inv.reshape(-1), inv.reshape(-1) >= 0
        gy = gw = None
        if ctx.needs_input_grad[0]:  # src[n] = t * k + j with inv[t, j] == n, or -1: a permutation
            src = torch.full((N + 1,), -1, dtype=torch.int64, device=inv.device)
            src.scatter_(0, torch.where(ok, flat, N), torch.arange(T * k, device=inv.device))
            src = src[:N]
            has = src >= 0
            g_row = torch.where(has, src // max(k, 1), -1)
            w = None if weights is None else _take(weights.reshape(-1, 1), src)[:, 0]
            if uses_triton(g):
                gy = _segment_gather(g, g_row, _arange(N, inv), w, N).to(y.dtype)
            else:
                rows = _take(g, g_row)  # zeros where has is False, and there w is 0 too
                gy = (rows if w is None else rows * w.to(rows.dtype)[:, None]).to(y.dtype)
        if weights is not None and ctx.needs_input_grad[2]:
            if uses_triton(g):
                gw = _row_dot(g, y, flat, k)
            else:
                rows = _take(y, flat).view(T, k, y.shape[1])
                gw = torch.where(ok.view(T, k), (_acc(g)[:, None, :] * rows).sum(-1), 0.0)
            gw = gw.view(T, k).to(weights.dtype)
        return gy, None, gw


def _index(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    return t.to(torch.int64)


def permute_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Dispatch: x [T,H], rows [N] ints in [0, T) (repeats allowed) -> out [N,H], out[i] = x[rows[i]].

    Differentiable in x: grad_x[t] = sum of grad_out[i] over the i with rows[i] == t, summed in
    increasing i in fp32 (deterministic, no atomics); tokens never listed get zero gradient.
    """
    if x.dim() != 2 or rows.dim() != 1:
        raise ValueError(f"want x [T,H], rows [N]; got x {tuple(x.shape)}, rows {tuple(rows.shape)}")
    return _PermuteRows.apply(x, _index(rows, "rows").to(x.device))


def combine(y: torch.Tensor, inv: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Unpermute: y [N,H], inv [T,k] ints in [-1, N) -> out [T,H], out[t] = sum_j w[t,j] y[inv[t,j]].

    w = weights [T,k] (or 1 when None); entries with inv[t, j] = -1 are dropped (their weight is
    ignored). Non-negative entries of inv must be unique. Sums in fp32 in increasing j, output in
    y's dtype. Differentiable in y (grad_y[inv[t,j]] = w[t,j] grad_out[t]; rows of y never
    referenced get zero) and in weights (grad_w[t,j] = <grad_out[t], y[inv[t,j]]>, 0 if dropped).
    """
    if y.dim() != 2 or inv.dim() != 2 or (weights is not None and weights.shape != inv.shape):
        wshape = None if weights is None else tuple(weights.shape)
        raise ValueError(f"want y [N,H], inv [T,k], weights None or [T,k]; got y {tuple(y.shape)}, "
                         f"inv {tuple(inv.shape)}, weights {wshape}")
    return _Combine.apply(y, _index(inv, "inv").to(y.device), weights)
