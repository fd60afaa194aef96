r"""Ring attention over a ``cp`` mesh axis: exact attention on sequence shards.

Each of the P ranks of the ``cp`` group holds a contiguous block of C = S/P positions of q, k and
v (the layout every other op of the lowered program uses). Attention needs every key for every
query, so the K/V blocks travel round the ring: at step t rank r holds block (r − t) mod P, sends
it on to r + 1 while it computes with it (the send is posted before the block's compute and waited
after it: overlap where the backend runs P2P asynchronously), and merges the block's partial
result into its own by log-sum-exp::

    lse = log(e^lse_a + e^lse_b),   out = e^(lse_a − lse) out_a + e^(lse_b − lse) out_b

**Causal load balance (zig-zag).** With contiguous blocks and a causal mask rank r would attend
r + 1 key blocks and rank 0 only one. So the *queries* are re-laid out before the ring: split into
2P halves, rank r computes halves r and 2P − 1 − r (one early, one late: 2P + 1 key halves each).
K and V need no re-layout: every rank meets every key block anyway. A block whose keys all lie
after the query half's last position is skipped; one whose keys all precede it runs unmasked.
The exchange moves one q half (and, back, one output half) per rank.

**Backward** (exact, recomputing the block probabilities from the saved merged lse, as flash
attention does): dq accumulates at home; K/V rotate as in forward, the next block prefetched
during this one's compute, and dk, dv follow their block one step behind (their send overlaps
the next block's compute), reaching their home rank after P sends. Blocks come from ``flash_block``: a generated Triton kernel on GPU, torch
elsewhere.

GQA: K/V travel with their own (fewer) heads and are expanded per block, their gradients summed
back per group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..passes.strategies import sdpa_arguments
from .flash_block import attention_block, attention_block_backward, merge

def ring_attention(mesh, *args, **kwargs) -> torch.Tensor:
    """The local op the lowered program calls for sdpa with q, k, v sequence-sharded on ``cp``."""
    a = sdpa_arguments(args, kwargs)
    q, k, v = a["query"], a["key"], a["value"]
    if a["attn_mask"] is not None or a["dropout_p"]:
        raise AssertionError("ring attention was planned for an sdpa call with a mask or dropout")
    scale = a["scale"] if a["scale"] is not None else q.shape[-1] ** -0.5
    group = mesh.get_group("cp")
    return _RingAttention.apply(q, k, v, group, bool(a["is_causal"]), float(scale))


class _Ring:
    """Who is where on the ``cp`` group, and the P2P moves between its ranks."""

    def __init__(self, group, seq_local: int, causal: bool):
        self.group = group
        self.p = dist.get_world_size(group)
        self.r = dist.get_rank(group)
        self.ranks = dist.get_process_group_ranks(group)
        self.c = seq_local
        # zig-zag needs two halves per rank; with an odd block the ring still runs, unbalanced
        self.zigzag = causal and self.p > 1 and seq_local % 2 == 0
        half = seq_local // 2
        if self.zigzag:
            self.queries = [(self.r * half, half), ((2 * self.p - 1 - self.r) * half, half)]  # (first position, length)
        else:
            self.queries = [(self.r * seq_local, seq_local)]

    def _exchange(self, parts: list[torch.Tensor], send_to: list[int], recv_from: list[int]) -> list[torch.Tensor]:
        """Send ``parts[i]`` to ``send_to[i]`` and receive one part like it from each ``recv_from[j]``
        (group ranks; a part to or from oneself is kept)."""
        own = [p for p, d in zip(parts, send_to) if d == self.r]
        ops, out = [], []
        for p, d in zip(parts, send_to):
            if d != self.r:
                ops.append(dist.P2POp(dist.isend, p.contiguous(), self.ranks[d], self.group))
        for s in recv_from:
            if s == self.r:
                out.append(own.pop(0))
            else:
                buf = torch.empty_like(parts[0], memory_format=torch.contiguous_format)
                ops.append(dist.P2POp(dist.irecv, buf, self.ranks[s], self.group))
                out.append(buf)
        for w in dist.batch_isend_irecv(ops) if ops else []:
            w.wait()
        return out

    def to_zigzag(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Contiguous block (dim 2) -> this rank's query halves, in ``self.queries`` order."""
        if not self.zigzag:
            return [x]
        return self._exchange(list(x.chunk(2, dim=2)), *self._routes())

    def from_zigzag(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The inverse of ``to_zigzag``."""
        if not self.zigzag:
            return parts[0]
        send_to, recv_from = self._routes()
        return torch.cat(self._exchange(parts, recv_from, send_to), dim=2)

    def _routes(self) -> tuple[list[int], list[int]]:
        """Where this rank's two contiguous halves go under zig-zag, and where its zig-zag halves
        come from: half h of 2P is computed by rank h (h < P) or 2P − 1 − h."""
        p, r = self.p, self.r
        owner = lambda h: h if h < p else 2 * p - 1 - h  # noqa: E731
        return [owner(2 * r), owner(2 * r + 1)], [r // 2, (2 * p - 1 - r) // 2]

    def shift(self, x: torch.Tensor):
        """Start passing ``x`` to the next rank; returns (handles, buffer that receives the previous rank's)."""
        buf = torch.empty_like(x)
        ops = [dist.P2POp(dist.isend, x, self.ranks[(self.r + 1) % self.p], self.group),
               dist.P2POp(dist.irecv, buf, self.ranks[(self.r - 1) % self.p], self.group)]
        return dist.batch_isend_irecv(ops), buf

    def block_mode(self, q0: int, qlen: int, kv: int, causal: bool):
        """How query positions [q0, q0+qlen) meet key block ``kv``: None (skip), False (full), True (masked)."""
        k0 = kv * self.c
        if not causal:
            return False
        if k0 > q0 + qlen - 1:
            return None
        return k0 + self.c - 1 > q0


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _fold(g: torch.Tensor, heads: int) -> torch.Tensor:
    """Sum the gradient of expanded GQA heads back onto their ``heads`` kv heads."""
    b, h, s, d = g.shape
    return g if h == heads else g.view(b, heads, h // heads, s, d).sum(2)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal: bool, scale: float):
        ring = _Ring(group, q.shape[2], causal)
        heads = q.shape[1]
        qs = ring.to_zigzag(q)
        kv = torch.cat([k, v], dim=1).contiguous()
        nk = k.shape[1]
        acc: list = [None] * len(qs)
        for t in range(ring.p):
            pending = ring.shift(kv) if t < ring.p - 1 else None
            block = (ring.r - t) % ring.p
            kb, vb = _expand(kv[:, :nk], heads), _expand(kv[:, nk:], heads)
            for i, ((q0, qlen), qi) in enumerate(zip(ring.queries, qs)):
                mode = ring.block_mode(q0, qlen, block, causal)
                if mode is None:
                    continue
                part = attention_block(qi, kb, vb, scale=scale, causal=mode, q_pos0=q0, k_pos0=block * ring.c)
                acc[i] = part if acc[i] is None else merge(*acc[i], *part)
            if pending is not None:
                for w in pending[0]:
                    w.wait()
                kv = pending[1]
        outs, lses = zip(*acc)
        ctx.save_for_backward(*qs, *outs, *lses, k, v)
        ctx.ring, ctx.causal, ctx.scale, ctx.n = ring, causal, scale, len(qs)
        return ring.from_zigzag(list(outs))

    @staticmethod
    def backward(ctx, dout):
        ring, n, scale, causal = ctx.ring, ctx.n, ctx.scale, ctx.causal
        saved = ctx.saved_tensors
        qs, outs, lses, (k, v) = saved[:n], saved[n:2 * n], saved[2 * n:3 * n], saved[3 * n:]
        heads, nk = qs[0].shape[1], k.shape[1]
        douts = ring.to_zigzag(dout.contiguous())
        dqs = [torch.zeros_like(qi, dtype=torch.float32) for qi in qs]
        # K/V rotate as in forward (the next block prefetched during this one's compute); the
        # gradients of the block held travel one step behind it and are home after P sends.
        kv = torch.cat([k, v], dim=1).contiguous()
        dkv, pending_dkv = None, None
        for t in range(ring.p):
            pending_kv = ring.shift(kv) if t < ring.p - 1 else None
            block = (ring.r - t) % ring.p
            kb, vb = _expand(kv[:, :nk], heads), _expand(kv[:, nk:], heads)
            part = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            for i, (q0, qlen) in enumerate(ring.queries):
                mode = ring.block_mode(q0, qlen, block, causal)
                if mode is None:
                    continue
                dq, dk, dv = attention_block_backward(douts[i], qs[i], kb, vb, outs[i], lses[i], scale=scale,
                                                      causal=mode, q_pos0=q0, k_pos0=block * ring.c)
                dqs[i] += dq.float()
                part[:, :nk] += _fold(dk.float(), nk)
                part[:, nk:] += _fold(dv.float(), nk)
            if pending_dkv is not None:  # this block's gradient so far, from the previous rank
                for w in pending_dkv[0]:
                    w.wait()
                part += pending_dkv[1]
            dkv = part
            if ring.p > 1:
                pending_dkv = ring.shift(dkv)
            if pending_kv is not None:
                for w in pending_kv[0]:
                    w.wait()
                kv = pending_kv[1]
        if pending_dkv is not None:
            for w in pending_dkv[0]:
                w.wait()
            dkv = pending_dkv[1]
        dq = ring.from_zigzag([d.to(qs[0].dtype) for d in dqs])
        return dq, dkv[:, :nk].to(k.dtype), dkv[:, nk:].to(v.dtype), None, None, None
