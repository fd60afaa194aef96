"""Mixture-of-experts dispatch and combine: what an ``autopar.moe`` node runs on each rank.

For local tokens x [T, H] with routing idx, w [T, k], every assignment a = (t, j) goes to expert
e = idx[t, j]. With experts sharded over an expert-parallel group of n ranks, expert e lives on
rank dest(e) as its local slot(e). One forward is:

1. order the T·k assignments by (dest, slot), stably, and gather their token rows and weights
   (``permute_rows``);
2. all-to-all the per-destination counts, then the rows, weights and slots;
3. on the owner, sort the received rows by slot and run the expert body (passes/moe.py) on them,
   with this rank's slice of the expert weights; unsort;
4. all-to-all the result rows back, and sum each token's k rows (``combine``).

Autograd runs the same all-to-alls with the splits swapped. Nothing is dropped by default
(dropless: the result equals the single-device layer exactly, up to summation order). With a
capacity factor c, each rank sends at most ⌈c·T·k/E⌉ assignments to each expert, first come first
kept, and a dropped assignment contributes zero; the plan records it.

Without a group (every expert local, or only the local experts' share: ``route`` marks the rest
-1), steps 2 and 4 are skipped. That is the data-parallel and the partial-sum layouts.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .moe_permute import combine, permute_rows


TRAFFIC: list | None = None  # when a list: (layer, rows sent off-rank, bytes per row) per dispatch


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 with uneven splits; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        grad = g.new_empty((sum(in_splits), *g.shape[1:]))
        dist.all_to_all_single(grad, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad, None, None, None


def all_to_all(x, out_splits: list[int], in_splits: list[int], group):
    return _AllToAll.apply(x, out_splits, in_splits, group)


def exchange_counts(send: torch.Tensor, group) -> torch.Tensor:
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def moe_forward(layer, x, idx, w, experts, route=None, group=None, capacity_factor: float | None = None):
    """The layer on local tokens. ``route`` = (dest [E], slot [E]) long tensors: the rank in
    ``group`` (or 0 without a group) that owns each expert, -1 where another rank handles it, and
    its index among the local experts; None means every expert is local, in order."""
    T, k = idx.shape
    E_loc = experts[0].shape[0]
    e = idx.reshape(-1).long()
    if route is None:
        dest, slot = torch.zeros_like(e), e
    else:
        dest, slot = route[0].to(e.device)[e], route[1].to(e.device)[e]
    keep = dest >= 0
    if capacity_factor is not None:  # each expert takes at most `cap` of this rank's assignments
        cap = max(1, math.ceil(capacity_factor * T * k / layer.experts))
        onehot = torch.nn.functional.one_hot(e, layer.experts)
        rank_in_expert = ((onehot.cumsum(0) - 1) * onehot).sum(1)
        keep = keep & (rank_in_expert < cap)
    n_groups = 1 if group is None else dist.get_world_size(group)
    key = torch.where(keep, dest * E_loc + slot, torch.full_like(e, n_groups * E_loc))
    order = torch.argsort(key, stable=True)[: int(keep.sum())]
    rows = permute_rows(x, order // k)
    wts = w.reshape(-1)[order]
    slots = slot[order]
    if group is None:
        counts = torch.bincount(slots, minlength=E_loc)
        y = layer.run_body(rows, wts, slots, counts, experts)
    else:
        send = torch.bincount(dest[order], minlength=n_groups)
        recv = exchange_counts(send, group)
        s, r = send.tolist(), recv.tolist()
        if TRAFFIC is not None:  # rows this rank's dispatch sends to other ranks (benchmarks/moe_alltoall.py)
            TRAFFIC.append((layer.name, sum(s) - s[dist.get_rank(group)], rows.shape[1] * rows.element_size()))
        rows_in = all_to_all(rows, r, s, group)
        wts_in = all_to_all(wts.unsqueeze(1), r, s, group).squeeze(1)
        slots_in = all_to_all(slots.unsqueeze(1), r, s, group).squeeze(1)
        by_slot = torch.argsort(slots_in, stable=True)
        counts = torch.bincount(slots_in, minlength=E_loc)
        y_sorted = layer.run_body(rows_in[by_slot], wts_in[by_slot], slots_in[by_slot], counts, experts)
        y_in = y_sorted[torch.argsort(by_slot)]
        y = all_to_all(y_in, s, r, group)
    inv = torch.full((T * k,), -1, dtype=torch.long, device=x.device)
    inv[order] = torch.arange(order.numel(), device=x.device)
    return combine(y.to(x.dtype), inv.view(T, k))


def expert_route(E: int, perm, axis_sizes: list[int], coords: list[int], a2a: int | None):
    """(dest, slot) of every expert for one rank.

    ``perm`` lists the experts in storage order (the plan's placement; identity without one), so
    storage row r holds expert perm[r]. The expert dim is sharded over ``axis_sizes`` (the axes
    whose expert placement is S(0), in mesh order: block b = row-major over their coordinates, as
    nested sharding lays it out); this rank has ``coords`` on them. ``a2a`` indexes the axis whose
    ranks exchange tokens; on every other sharded axis, only experts with this rank's coordinate
    are handled here (the others' share of the output comes from the partial sum).
    """
    n_blocks = math.prod(axis_sizes) if axis_sizes else 1
    e_loc = E // n_blocks
    pos = torch.empty(E, dtype=torch.long)
    pos[torch.as_tensor(list(perm), dtype=torch.long)] = torch.arange(E)
    block, slot = pos // e_loc, pos % e_loc
    dest = torch.zeros(E, dtype=torch.long)
    mine = torch.ones(E, dtype=torch.bool)
    stride = n_blocks
    for i, n in enumerate(axis_sizes):
        stride //= n
        c = (block // stride) % n
        if i == a2a:
            dest = c
        else:
            mine &= c == coords[i]
    return torch.where(mine, dest, torch.full_like(dest, -1)), slot


def run_moe(mesh, layer, entry: dict, dtensor_args, local_args):
    """One ``autopar.moe`` node on this rank of ``mesh`` (a torch DeviceMesh), its inputs placed
    as the plan says (``dtensor_args``) and taken local (``local_args``)."""
    x, idx, w, *experts = local_args
    names = list(mesh.mesh_dim_names)
    tok_pl, exp_pl = dtensor_args[0].placements, dtensor_args[3].placements
    sharded = [i for i, p in enumerate(exp_pl) if p.is_shard()]
    a2a = [i for i in sharded if tok_pl[i].is_shard()]
    if not sharded:
        return moe_forward(layer, x, idx, w, experts, capacity_factor=entry.get("capacity_factor"))
    coords = mesh.get_coordinate()
    perm = entry.get("placement") or range(layer.experts)
    route = expert_route(layer.experts, perm, [mesh.size(i) for i in sharded], [coords[i] for i in sharded],
                         sharded.index(a2a[0]) if a2a else None)
    group = mesh.get_group(names[a2a[0]]) if a2a else None
    return moe_forward(layer, x, idx, w, experts, route=route, group=group,
                       capacity_factor=entry.get("capacity_factor"))
