"""Bucketed, asynchronous data-parallel gradient sync, issued and waited as a solved schedule says.

``plan.comm_schedule["buckets"]`` lists buckets in issue order, each on one mesh axis, its parameters
in gradient-ready order. During backward, a gradient that differs from its parameter only by
``P(sum)`` -> ``R`` on the bucket's axis (data parallelism's sync) is copied, as it is accumulated,
into its slot of the bucket's flat buffer (one per dtype, kept from step to step, as DDP's); once
every gradient of a bucket is in and every earlier bucket is issued, the buffer is all-reduced
asynchronously (functional collectives: gloo works on its own thread, NCCL on its own stream) while
autograd goes on computing. The waits come as late as possible, at the end of backward (a callback
queued on the autograd engine, as DDP does), in issue order; each ``.grad`` then becomes a view of
its slot, a DTensor in the parameter's placements. Any other gradient sync (another placement
change, a compressed gradient, a parameter in no bucket) keeps the per-parameter path
(``runtime.sync_gradients``).

Every rank issues the same collectives: slots are fixed at install time (frozen and compressed
parameters have none), eligibility depends on placements only (the same on every rank), and a
bucket still short of gradients at the end of backward (a parameter that got none) is issued then,
the missing slots zero. Every backward syncs: accumulating over several backwards adds synced
gradients, as the per-parameter path does (there is no ``no_sync``); a gradient kept past
``zero_grad()`` keeps its buffer (the bucket gets a fresh one), so ``zero_grad(set_to_none=True)``,
the default, is the fast path.
"""

from __future__ import annotations

import torch


class GradBuckets:
    """The runtime side of ``plan.comm_schedule``; ``hook`` is each member's post-accumulate-grad
    hook. ``synchronous = True`` waits on each bucket as it is issued (same buffers, no overlap)."""

    def __init__(self, schedule: dict, params: dict, mesh, axes: list[str], fallback):
        self.mesh, self.axes, self.fallback, self.synchronous = mesh, axes, fallback, False
        self.buckets: list[tuple[str, list]] = []  # (axis, parameters in ready order)
        self.slot: dict[int, tuple] = {}  # id(param) -> (bucket, dtype, offset, local shape)
        for b in schedule["buckets"]:
            sizes: dict = {}
            ps = list(dict.fromkeys(params[f] for f in b["params"] if f in params and id(params[f]) not in self.slot))
            for p in ps:
                local = p.to_local()
                self.slot[id(p)] = (len(self.buckets), local.dtype, sizes.get(local.dtype, 0), local.shape)
                sizes[local.dtype] = sizes.get(local.dtype, 0) + local.numel()
            self.buckets.append((b["axis"], ps, sizes))
        self.task, self.buffers = None, {}  # (bucket, dtype) -> flat buffer, kept from step to step

    def owns(self, param) -> bool:
        return id(param) in self.slot

    def hook(self, param) -> None:
        from .runtime import summed_axis

        task = torch._C._current_graph_task_id()
        if task != self.task:  # the first gradient of this backward
            self._start(task)
        i, dtype, offset, shape = self.slot[id(param)]
        k, g = self.axes.index(self.buckets[i][0]), param.grad
        if summed_axis(param, g) == k and g.dtype == dtype:
            self.buffers[i, dtype][offset:offset + shape.numel()].view(shape).copy_(g.to_local())
            param.grad = None  # the bucket holds it now
            self.ready[i][id(param)] = True
        else:
            self.fallback(param)
            self.ready[i][id(param)] = False
        while self.next < len(self.buckets) and len(self.ready[self.next]) == len(self.buckets[self.next][1]):
            self._issue()

    def _start(self, task) -> None:
        """New per-step state; a bucket whose buffer still backs a gradient (kept past
        ``zero_grad``, accumulating) gets a fresh one, so that this step's sync leaves it alone."""
        self.task, self.ready, self.works, self.next = task, [{} for _ in self.buckets], [], 0
        torch.autograd.Variable._execution_engine.queue_callback(self.finish)
        held = {p.grad.to_local().untyped_storage().data_ptr() for _, ps, _ in self.buckets for p in ps
                if p.grad is not None}
        device = next(p for _, ps, _ in self.buckets for p in ps).device
        for i, (_, _, sizes) in enumerate(self.buckets):
            for dtype, numel in sizes.items():
                buf = self.buffers.get((i, dtype))
                if buf is None or buf.untyped_storage().data_ptr() in held:
                    self.buffers[i, dtype] = torch.zeros(numel, dtype=dtype, device=device)

    def _issue(self) -> None:
        """All-reduce the next bucket's buffers (one per dtype), those of its gradients that came."""
        i, ready = self.next, self.ready[self.next]
        axis, ps, sizes = self.buckets[i]
        self.next += 1
        if not any(ready.values()):
            return
        for p in ps:  # a gradient that did not come (or synced another way): zeros, the same on every rank
            if not ready.get(id(p)):
                _, dtype, offset, shape = self.slot[id(p)]
                self.buffers[i, dtype][offset:offset + shape.numel()].zero_()
        group = self.mesh.get_group(self.axes.index(axis)).group_name
        for dtype in sizes:
            torch.ops._c10d_functional.all_reduce_(self.buffers[i, dtype], "sum", group)
            if self.synchronous:
                torch.ops._c10d_functional.wait_tensor(self.buffers[i, dtype])
        self.works.append(i)

    def finish(self) -> None:
        """End of backward: issue what is left, then wait in issue order and hand out the grads."""
        from torch.distributed.tensor import DTensor

        while self.next < len(self.buckets):
            self._issue()
        for i in self.works:
            _, ps, sizes = self.buckets[i]
            for dtype in sizes:
                torch.ops._c10d_functional.wait_tensor(self.buffers[i, dtype])
            for p in ps:
                if self.ready[i].get(id(p)):
                    _, dtype, offset, shape = self.slot[id(p)]
                    local = self.buffers[i, dtype][offset:offset + shape.numel()].view(shape)
                    p.grad = DTensor.from_local(local, self.mesh, p.placements, run_check=False, shape=p.shape,
                                                stride=p.stride())
        self.works, self.task = [], None
