"""Compressed gradient all-reduce: int8, top-k (DGC) and PowerSGD, one stateful compressor per
parameter, each returning an approximation of the SUM of the ranks' gradients.

A plan names each gradient's method (``plan.compression["grads"][fqn]["method"]``) as a string:

==================  =========================================================================
``none``            plain fp32 all-reduce of the buffer
``int8[:B]``        two-shot blockwise int8 (codegen/quantize.py), B elements per scale (64)
``topk[:ρ]``        DGC top-k of density ρ (0.01) with error feedback and momentum correction
``powersgd[:r]``    rank-r PowerSGD with error feedback (4)
==================  =========================================================================

and the choice's other keys set the rest: ``block``, ``error_feedback`` (int8), ``ratio``,
``momentum``, ``warmup`` (topk), ``rank`` (powersgd); unknown keys are left to the solver.
Every rank ends with the same tensor (each sums the same gathered data in the same order).
Collectives are ``torch.distributed._functional_collectives``, so ``CollectiveCounter`` counts
them. ``group=None`` means this process alone: no communication (``compression_error``).

**int8, two-shot.** The flat gradient, zero-padded to W·c elements (c a multiple of B), is
quantized; chunk w (its codes and its scales, packed as one int8 buffer) goes to rank w by one
all-to-all; rank w dequantizes its W received copies and sums them in fp32, quantizes the sum
and all-gathers it; every rank dequantizes the W chunks. Optional error feedback keeps each
quantization's residual: e₁ ← x − Q(x) on the sender, e₂ ← s − Q(s) on the chunk's owner, and
adds them to the next step's x and s.

**top-k, DGC** (Lin et al. 2018, "Deep Gradient Compression"). Momentum correction and error
feedback, per rank, with momentum m:

    u ← m·u + g,    v ← v + u,    I = top-k of |v|,    send (v_I, I),    v_I ← 0,  u_I ← 0

(zeroing u at I is momentum factor masking). The sum of the W sparse tensors is the result. The
momentum is already in it: **run the optimizer without momentum** (plain SGD), with the same lr
as uncompressed SGD with momentum m. m = 0 is plain error-feedback top-k. Values and int32
indices travel as one fp32 buffer of 2k by one all-gather. ``warmup`` > 0 ramps the density
geometrically from dense to ρ over that many steps, ρ_t = ρ^min(1, (t+1)/(warmup+1)) (DGC's
sparsity warm-up); ``wire_bytes`` prices the steady state.

**PowerSGD** (Vogels et al. 2019). A gradient of ≥ 2 dims, viewed as M [n, m] (dim 0 by the
rest), plus its error e:

    M ← g + e,   P ← Σ_ranks M Q,   P̂ ← orth(P),   Q_w ← Mᵀ P̂,   e ← M − P̂ Q_wᵀ,
    Q ← Σ_ranks Q_w,   result = P̂ Qᵀ = P̂ P̂ᵀ Σ M

Q starts from a fixed seed (the same on every rank) and is warm-started from the last step's. A
1-D gradient, or one where r(n + m) ≥ nm, is all-reduced uncompressed.

**Wire bytes**, in ``comm_counter``'s conventions (all-reduce: the buffer; all-gather: the
gathered output; all-to-all: one rank's buffer), with W ranks and N elements:

    none      N · itemsize
    int8      2 · W · (c + 4c/B),             c = ⌈N / (W·B)⌉ · B
    topk      W · 8k,                         k = max(1, ⌈ρN⌉)
    powersgd  4r(n + m)                       (else as none)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import AutoparError
from .quantize import dequantize, dequantize_sum, quantize

METHODS = ("none", "int8", "topk", "powersgd")
_ARG = {"int8": "block", "topk": "ratio", "powersgd": "rank"}  # what "kind:x" sets


@dataclass(frozen=True)
class Method:
    """A parsed compression method; ``str`` gives its short form back (``int8:64``)."""

    kind: str
    block: int = 64  # int8: elements per scale
    error_feedback: bool = False  # int8 (top-k and PowerSGD always feed back)
    ratio: float = 0.01  # topk: density
    momentum: float = 0.9  # topk: DGC momentum correction (0: plain error feedback)
    warmup: int = 0  # topk: steps of the sparsity ramp
    rank: int = 4  # powersgd

    def __str__(self) -> str:
        return self.kind if self.kind == "none" else f"{self.kind}:{getattr(self, _ARG[self.kind])}"


def parse_method(spec) -> Method:
    """``"int8"``, ``"int8:256"``, ``"topk:0.01"``, ``"powersgd:4"``, ``"none"``, or a plan's choice
    ``{"method": ..., **params}``; raises AutoparError saying what is wrong."""
    params = {}
    if isinstance(spec, dict):
        params = {k: v for k, v in spec.items() if k in Method.__dataclass_fields__ and k != "kind"}
        spec = spec.get("method")
    if not isinstance(spec, str):
        raise AutoparError(f"compression method must be a string such as 'int8', 'int8:256', 'topk:0.01' or "
                           f"'powersgd:4', got {spec!r}")
    kind, colon, arg = spec.strip().partition(":")
    if kind not in METHODS:
        raise AutoparError(f"unknown compression method {spec!r}: the kind must be one of {list(METHODS)} "
                           "(e.g. 'int8:64', 'topk:0.01', 'powersgd:4')")
    if colon:
        if kind == "none":
            raise AutoparError(f"compression method {spec!r}: 'none' takes no argument")
        params.setdefault(_ARG[kind], arg)
    try:
        m = Method(kind, **{k: _convert(k, v) for k, v in params.items()})
    except (TypeError, ValueError):
        raise AutoparError(f"compression method {spec!r} with {params}: bad parameter; want block a positive int, "
                           "ratio a number in (0, 1], momentum in [0, 1), warmup an int >= 0, rank a positive int") \
            from None
    bad = [name for name, ok in (("block", m.block >= 1), ("ratio", 0 < m.ratio <= 1), ("rank", m.rank >= 1),
                                 ("momentum", 0 <= m.momentum < 1), ("warmup", m.warmup >= 0)) if not ok]
    if bad:
        raise AutoparError(f"compression method {spec!r}: {', '.join(f'{b}={getattr(m, b)!r}' for b in bad)} "
                           "out of range (block >= 1, 0 < ratio <= 1, rank >= 1, 0 <= momentum < 1, warmup >= 0)")
    return m


def _convert(name: str, value):
    kind = Method.__dataclass_fields__[name].type
    if kind == "bool":
        if not isinstance(value, bool):
            raise TypeError(name)
        return value
    if kind == "int":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError(name)
        return int(value)
    f = float(value)
    if not math.isfinite(f):
        raise ValueError(name)
    return f


# ---- collectives (functional, so that the profiler and CollectiveCounter see them) ----------------

def _world(group) -> int:
    import torch.distributed as dist

    return 1 if group is None else dist.get_world_size(group)


def _wait(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed._functional_collectives as fc

    return t.wait() if isinstance(t, fc.AsyncCollectiveTensor) else fc.wait_tensor(t)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed._functional_collectives as fc

    return x if group is None else _wait(fc.all_reduce(x.contiguous(), "sum", group))


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """[L] -> [W·L], rank order."""
    import torch.distributed._functional_collectives as fc

    return x if group is None else _wait(fc.all_gather_single(x.contiguous(), 0, group))


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """[W·L] -> [W·L]: piece w goes to rank w; piece w of the result came from rank w."""
    import torch.distributed._functional_collectives as fc

    return x if group is None else _wait(fc.all_to_all_single(x.contiguous(), None, None, group))


# ---- the int8 wire format -------------------------------------------------------------------

def pack(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """q int8 [R, c], scales fp32 [R, nb] -> one int8 buffer [R, c + 4·nb] (scales' bytes after q)."""
    return torch.cat([q, scales.float().contiguous().view(torch.int8)], dim=1)


def unpack(buf: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack`: [R, c + 4·nb] -> (q [R, c], scales fp32 [R, nb])."""
    return buf[:, :c], buf[:, c:].contiguous().view(torch.float32)


def pack_float32(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """x -> fp32 [⌈(n + 4·⌈n/B⌉) / 4⌉] holding [int8 codes | fp32 scales] of x flat (zero-padded to
    a multiple of 4 bytes): an int8-quantized tensor that travels as a float tensor."""
    q, s = quantize(x, block)
    nbytes = q.numel() + 4 * s.numel()
    out = torch.zeros(-(-nbytes // 4), dtype=torch.float32, device=x.device)  # not a view (zero-bubble)
    out.view(torch.int8)[:nbytes] = pack(q[None], s[None])[0]
    return out


def unpack_float32(packed: torch.Tensor, n: int, block: int = 64, dtype=torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_float32`: the n dequantized elements, flat, in ``dtype``."""
    nb = -(-n // block)
    q, s = unpack(packed.contiguous().view(torch.int8)[None, : n + 4 * nb], n)
    return dequantize(q[0], s[0], block, dtype)


# ---- compressors ----------------------------------------------------------------------------

class Plain:
    """No compression: one all-reduce of the buffer."""

    def __init__(self, method: Method):
        self.method = method

    def allreduce(self, grad: torch.Tensor, group) -> torch.Tensor:
        return _all_reduce(grad, group)


class Int8(Plain):
    """Two-shot blockwise int8 (module docstring), with optional error feedback."""

    def __init__(self, method: Method):
        super().__init__(method)
        self.e1 = self.e2 = None  # residuals of the first and second quantization

    def allreduce(self, grad: torch.Tensor, group) -> torch.Tensor:
        b, w, n = self.method.block, _world(group), grad.numel()
        c = -(-n // (w * b)) * b
        x = torch.nn.functional.pad(grad.reshape(-1).float(), (0, w * c - n))
        if self.method.error_feedback and self.e1 is not None:
            x += self.e1
        q, s = quantize(x, b)
        if self.method.error_feedback:
            self.e1 = x - dequantize(q, s, b)
        recv = _all_to_all(pack(q.view(w, c), s.view(w, c // b)).reshape(-1), group).view(w, -1)
        total = dequantize_sum(*unpack(recv, c), b)  # my chunk, summed over the ranks
        if self.method.error_feedback and self.e2 is not None:
            total += self.e2
        q, s = quantize(total, b)
        if self.method.error_feedback:
            self.e2 = total - dequantize(q, s, b)
        got = _all_gather(pack(q[None], s[None])[0], group).view(w, -1)
        q, s = unpack(got, c)
        return dequantize(q.reshape(-1), s.reshape(-1), b, grad.dtype)[:n].view(grad.shape)


class TopK(Plain):
    """DGC top-k with error feedback and momentum correction (module docstring)."""

    def __init__(self, method: Method):
        super().__init__(method)
        self.u = self.v = None
        self.step = 0

    def density(self) -> float:
        m = self.method
        return m.ratio ** min(1.0, (self.step + 1) / (m.warmup + 1))

    def allreduce(self, grad: torch.Tensor, group) -> torch.Tensor:
        n = grad.numel()
        g = grad.reshape(-1).float()
        if self.u is None:
            self.u, self.v = torch.zeros_like(g), torch.zeros_like(g)
        self.u.mul_(self.method.momentum).add_(g)
        self.v.add_(self.u)
        k = topk_count(n, self.density())
        self.step += 1
        idx = self.v.abs().topk(k, sorted=False).indices
        vals = self.v[idx]
        self.v[idx] = 0
        self.u[idx] = 0
        got = _all_gather(torch.cat([vals, idx.to(torch.int32).view(torch.float32)]), group).view(-1, 2 * k)
        out = torch.zeros_like(g)
        out.index_add_(0, got[:, k:].contiguous().view(torch.int32).reshape(-1).long(), got[:, :k].reshape(-1))
        return out.to(grad.dtype).view(grad.shape)


class PowerSGD(Plain):
    """Rank-r PowerSGD with error feedback and a warm-started Q (module docstring)."""

    SEED = 0

    def __init__(self, method: Method):
        super().__init__(method)
        self.q = self.e = None

    def allreduce(self, grad: torch.Tensor, group) -> torch.Tensor:
        if not powersgd_applies(grad.shape, self.method.rank):
            return _all_reduce(grad, group)
        m = grad.reshape(grad.shape[0], -1).float()
        r = min(self.method.rank, *m.shape)
        if self.e is not None:
            m = m + self.e
        if self.q is None:  # the same on every rank
            gen = torch.Generator().manual_seed(self.SEED)
            self.q = torch.randn(m.shape[1], r, generator=gen).to(m.device)
        p = torch.linalg.qr(_all_reduce(m @ self.q, group)).Q
        q_local = m.t() @ p
        self.e = m - p @ q_local.t()
        self.q = _all_reduce(q_local, group)
        return (p @ self.q.t()).to(grad.dtype).view(grad.shape)


_COMPRESSORS = {"none": Plain, "int8": Int8, "topk": TopK, "powersgd": PowerSGD}


def make_compressor(spec) -> Plain:
    """A fresh compressor (its own state) for one parameter's gradient."""
    m = parse_method(spec)
    return _COMPRESSORS[m.kind](m)


def topk_count(n: int, density: float) -> int:
    return min(n, max(1, math.ceil(density * n)))


def powersgd_applies(shape, rank: int) -> bool:
    """PowerSGD compresses a ≥ 2-D gradient [n, m] when r(n + m) < nm."""
    if len(shape) < 2:
        return False
    n = shape[0]
    m = math.prod(shape[1:])
    r = min(rank, n, m)
    return r * (n + m) < n * m


def protocol(method, shape, world: int, itemsize: int = 4) -> list[tuple[str, int]]:
    """The collectives (op, bytes in comm_counter's conventions) of one (compressed) all-reduce
    of a local gradient of ``shape`` over ``world`` ranks (formulas in the module docstring)."""
    m = parse_method(method)
    n = math.prod(shape)
    if m.kind == "int8":
        c = -(-n // (world * m.block)) * m.block
        return [("all_to_all", world * (c + 4 * (c // m.block))), ("all_gather", world * (c + 4 * (c // m.block)))]
    if m.kind == "topk":
        return [("all_gather", world * 8 * topk_count(n, m.ratio))]
    if m.kind == "powersgd" and powersgd_applies(shape, m.rank):
        r = min(m.rank, shape[0], n // shape[0])
        return [("all_reduce", 4 * r * shape[0]), ("all_reduce", 4 * r * (n // shape[0]))]
    return [("all_reduce", n * itemsize)]


def wire_bytes(method, shape, world: int, itemsize: int = 4) -> int:
    """Bytes of ``protocol``'s collectives, summed (what CollectiveCounter measures)."""
    return sum(b for _, b in protocol(method, shape, world, itemsize))


def compression_error(method, grad: torch.Tensor) -> float:
    """||C(g) − g|| / ||g|| of one fresh compressor's first step on one rank (no communication,
    no error carried in): the solver's calibration of a method on a sample gradient."""
    out = make_compressor(method).allreduce(grad.detach(), None)
    norm = float(grad.detach().float().norm())
    return float((out.float() - grad.detach().float()).norm()) / norm if norm > 0 else 0.0
