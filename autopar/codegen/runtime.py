"""Run a lowered program on torch.distributed: the ParallelModule.

Nothing here decides anything: placements come from the plan, collectives from the lowered
graph. The same code runs on gloo (CPU) and NCCL (GPU); only the DeviceMesh differs.
"""

from __future__ import annotations

import weakref

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from ..errors import AutoparError, PlanError
from ..placements import parse
from ..passes.strategies import to_dtensor_placement
from . import lower as L


def _placements(strs) -> tuple:
    return tuple(to_dtensor_placement(parse(s)) for s in strs)


def _same(actual, planned) -> bool:
    from torch.distributed.tensor import Partial

    for a, p in zip(actual, planned):
        if isinstance(a, Partial) and isinstance(p, Partial):
            if a.reduce_op != p.reduce_op:
                return False
        elif a != p:
            return False
    return True


class Executor(fx.Interpreter):
    """Interprets a lowered graph, giving the marker nodes their meaning on ``mesh``."""

    def __init__(self, gm: fx.GraphModule, mesh, fixups: list):
        super().__init__(gm, garbage_collect_values=True)
        self.mesh = mesh
        self.fixups = fixups
        # storage of a gathered value's local tensor -> (weakref to it, its shard, its traced meta)
        self._gathered: dict[int, tuple] = {}

    def run(self, *args, **kwargs):
        # A gathered value that an op saves for backward is kept as its shard and gathered again
        # when backward needs it (Megatron-SP's choice: saving the gathered copy would cost the
        # memory sequence parallelism saves). Every rank's backward unpacks in the same order.
        with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
            return super().run(*args, **kwargs)

    def _pack(self, t):
        from torch.distributed.tensor import DTensor

        if not isinstance(t, DTensor):
            return t
        local = t.to_local()
        entry = self._gathered.get(local.untyped_storage().data_ptr())
        y = entry[0]() if entry is not None else None
        if y is None:
            return t
        base = y.to_local()
        view = None if t is y else (t.placements, t.shape, t.stride(), local.size(), local.stride(),
                                    local.storage_offset() - base.storage_offset())
        return (_Regather, entry[1], self.mesh, y.placements, entry[2], view)

    def _remember_gather(self, x, y) -> None:
        if torch.is_grad_enabled() and x.to_local().numel() < y.to_local().numel():
            key = y.to_local().untyped_storage().data_ptr()
            self._gathered[key] = (weakref.ref(y), x.detach(), self.current_meta)
            weakref.finalize(y, self._gathered.pop, key, None)

    def call_function(self, target, args, kwargs):
        from torch.distributed.tensor import DTensor, Partial, Replicate

        if target is L.redistribute:
            x, pls = args
            y = _dense(_ContiguousGrad.apply(x).redistribute(self.mesh, _placements(pls)), self.current_meta)
            self._remember_gather(x, y)
            return y
        if target is L.from_full:
            x, pls = args
            if isinstance(x, DTensor):
                return x.redistribute(self.mesh, _placements(pls))
            if x.device.type != self.mesh.device_type:  # e.g. CPU inputs for a CUDA mesh
                x = x.to(self.mesh.device_type)
            rep = DTensor.from_local(x, self.mesh, [Replicate()] * self.mesh.ndim, run_check=False)
            return rep.redistribute(self.mesh, _placements(pls))
        if target is L.to_full:
            (x,) = args
            if isinstance(x, DTensor):
                if any(not isinstance(p, Replicate) for p in x.placements):
                    x = x.redistribute(self.mesh, [Replicate()] * self.mesh.ndim)
                return x.to_local()
            return x
        if target is L.check:
            x, pls, name = args
            if isinstance(x, DTensor) and pls and pls[0] is not None:
                want = _placements(pls[0])
                if not _same(x.placements, want):
                    self.fixups.append(f"{name}: DTensor produced {x.placements}, plan says {want}")
                    x = x.redistribute(self.mesh, want)
            return x
        if target is L.local_call:
            op, pls, op_args, op_kwargs = args
            # An input replicated on an axis where the output is sharded is read differently by each
            # rank there (K/V of kv-replicated attention): its gradient is their sum, a Partial.
            sharded = [pls[0] is not None and parse(p).kind in "SP" for p in (pls[0] or ())]

            def local(t):
                grad = [Partial() if isinstance(p, Replicate) and s else p for p, s in zip(t.placements, sharded)]
                return t.to_local(grad_placements=grad if sharded else None)

            local_args, local_kwargs = pytree.tree_map_only(DTensor, local, (op_args, op_kwargs))
            if op == L.RING_ATTENTION:  # collectives inside, on the mesh's cp group
                from .ring import ring_attention

                out = ring_attention(self.mesh, *local_args, **local_kwargs)
            elif isinstance(op, tuple) and op[0] == L.MOE:
                from .moe import run_moe

                out = run_moe(self.mesh, op[1], op[2], op_args, local_args)
            elif isinstance(op, tuple) and op[0] == L.KV_REPLICATED:
                out = _sdpa_kv_replicated(self.mesh, op[1], op[2], op_args[0].shape[1], op_args[1].shape[1],
                                          *local_args, **local_kwargs)
            elif isinstance(op, tuple) and op[0] == L.FUSED:  # a generated kernel (codegen/fusion.py)
                from .fusion import run_fused

                out = run_fused(op[1], self.mesh, local_args)
            else:
                out = op(*local_args, **local_kwargs)
            metas = self.current_meta if isinstance(self.current_meta, (tuple, list)) else (self.current_meta,)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            wrapped = [o if not isinstance(o, torch.Tensor) or p is None else
                       DTensor.from_local(_like(o, m), self.mesh, _placements(p), run_check=False)
                       for o, p, m in zip(outs, pls, metas)]
            return type(out)(wrapped) if isinstance(out, (tuple, list)) else wrapped[0]
        return super().call_function(target, args, kwargs)

    def run_node(self, n):
        self.current_meta = n.meta.get("val")
        if LABEL_OPS and n.op == "call_function":  # autopar validate: time each op class
            with torch.profiler.record_function(f"autopar::{node_class(n)}"):
                return super().run_node(n)
        return super().run_node(n)


LABEL_OPS = False  # set by autopar validate: label each node's work in torch.profiler traces


def node_class(n: fx.Node) -> str:
    """Cost class of a lowered node: comm for redistributions, view for checks, else its op's class."""
    from ..cost_models.profile import op_class

    if n.target in (L.redistribute, L.from_full, L.to_full):
        return "comm"
    if n.target is L.check:
        return "view"
    return op_class(str(n.args[0] if n.target is L.local_call else n.target))


class _Regather:
    """Tag of a saved value packed as its shard (``Executor._pack``)."""


def _unpack(packed):
    """Gather a value kept as its shard again (and take the view of it that was saved)."""
    if not (isinstance(packed, tuple) and packed and packed[0] is _Regather):
        return packed
    from torch.distributed.tensor import DTensor

    _, shard, mesh, placements, meta, view = packed
    y = _dense(shard.redistribute(mesh, placements), meta)
    if view is None:
        return y
    pls, shape, stride, size, local_stride, offset = view
    base = y.to_local()
    local = base.as_strided(size, local_stride, base.storage_offset() + offset)
    return DTensor.from_local(local, mesh, pls, run_check=False, shape=shape, stride=stride)


def _head_offset(mesh, placements, heads: int) -> int:
    """First global head of this rank's shard of dim 1 under ``placements`` (nested shards split
    in mesh order, as DTensor lays them out)."""
    offset, chunk = 0, heads
    for name, p in zip(mesh.mesh_dim_names, placements):
        if parse(p).kind == "S" and parse(p).dim == 1:
            chunk //= mesh.size(mesh.mesh_dim_names.index(name))
            offset += mesh.get_local_rank(name) * chunk
    return offset


def _sdpa_kv_replicated(mesh, q_pl, k_pl, hq: int, hk: int, q, k, v, *args, **kwargs):
    """GQA attention whose query heads are sharded further than its kv heads: this rank's query
    heads [q0, q0 + n) use kv heads [q0 // g, (q0 + n − 1) // g], g = hq // hk."""
    g = hq // hk
    q0, k0 = _head_offset(mesh, q_pl, hq), _head_offset(mesh, k_pl, hk)
    lo, hi = q0 // g - k0, (q0 + q.shape[1] - 1) // g - k0 + 1
    return torch.ops.aten.scaled_dot_product_attention.default(q, k[:, lo:hi], v[:, lo:hi], *args, **kwargs)


class _ContiguousGrad(torch.autograd.Function):
    """Identity forward; makes the gradient contiguous on its way back.

    A redistribution's backward can hand back a non-contiguous shard (gloo's all-to-all
    fallback chunks a gathered tensor), which DTensor's view rules, computed from global
    strides, do not expect."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _dense(x, meta=None):
    """A redistributed DTensor whose shard is laid out densely in the traced value's dim order.

    Later views were traced on that layout (an sdpa output is [B, S, H, D] in memory even though
    its shape is [B, H, S, D]); DTensor decides view-or-copy on its own global strides."""
    from torch.distributed.tensor import DTensor

    order = _dim_order(meta) if isinstance(meta, torch.Tensor) and meta.dim() == x.dim() else list(range(x.dim()))
    local = x.to_local()
    if local.permute(order).is_contiguous():
        return x
    local = local.permute(order).contiguous().permute([order.index(d) for d in range(len(order))])
    return DTensor.from_local(local, x.device_mesh, x.placements, run_check=False, shape=x.shape, stride=x.stride())


def _dim_order(t: torch.Tensor) -> list[int]:
    return sorted(range(t.dim()), key=lambda d: -t.stride()[d])


def _like(local: torch.Tensor, meta) -> torch.Tensor:
    """Lay ``local`` out in memory in the same dim order as the traced value ``meta``.

    Later ops in the graph (a ``view`` after a ``permute``) rely on the strides the traced op
    produced; a kernel run on shards may choose another layout.
    """
    if not isinstance(meta, torch.Tensor) or meta.dim() != local.dim() or meta.dim() < 2:
        return local
    order = sorted(range(meta.dim()), key=lambda d: -meta.stride()[d])
    if sorted(range(local.dim()), key=lambda d: -local.stride()[d]) == order:
        return local
    inverse = [order.index(d) for d in range(len(order))]
    return local.permute(order).contiguous().permute(inverse)


def summed_axis(param, grad) -> int | None:
    """The one mesh axis on which ``grad`` differs from ``param``'s placements, by ``P(sum)`` -> ``R``
    (data parallelism's sync: an all-reduce on that axis's group), or None."""
    from torch.distributed.tensor import Partial, Replicate

    differ = [i for i, (a, p) in enumerate(zip(grad.placements, param.placements)) if a != p]
    if len(differ) != 1:
        return None
    a, p = grad.placements[differ[0]], param.placements[differ[0]]
    return differ[0] if isinstance(p, Replicate) and isinstance(a, Partial) and a.reduce_op == "sum" else None


def sync_gradients(param, compressor=None) -> None:
    """After backward, bring a parameter's gradient to the parameter's placement.

    A gradient computed from data-sharded activations is ``P(sum)`` on the data axis; this is
    where data parallelism's all-reduce (or ZeRO's reduce-scatter) happens. With a
    ``compressor`` (codegen/compress.py, the plan's ``compression["grads"]`` choice), a gradient
    that differs from the parameter only by ``P(sum)`` -> ``R`` on one mesh axis is all-reduced
    compressed on that axis's group, local shard by local shard; any other sync is uncompressed.
    """
    from torch.distributed.tensor import DTensor

    g = param.grad
    if g is None or tuple(g.placements) == tuple(param.placements):
        return
    axis = summed_axis(param, g)
    if compressor is None or axis is None:
        param.grad = g.redistribute(param.device_mesh, param.placements)
        return
    mesh = param.device_mesh
    local = compressor.allreduce(g.to_local().contiguous(), mesh.get_group(axis))
    param.grad = DTensor.from_local(local, mesh, param.placements, run_check=False, shape=param.shape,
                                    stride=param.stride())


def user_inputs(tg, args, kwargs, batch_factor: int = 1) -> list:
    """The user's inputs, flat, checked against the traced ones (dim 0 ``batch_factor`` times the
    traced size: a pipeline traces one microbatch)."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    if spec != tg.in_spec:
        got, want = (repr(pytree.tree_unflatten(["x"] * s.num_leaves, s)).replace("'x'", "x") for s in (spec, tg.in_spec))
        raise AutoparError(f"inputs do not have the structure the model was compiled with: got (args, kwargs) {got}, "
                           f"expected {want}; call autopar.compile again with matching example_inputs")
    wanted = [(n.name, n.meta.get("val")) for n in tg.gm.graph.nodes if n.op == "placeholder"
              and n.name not in tg.params and n.name not in tg.buffers and n.name not in tg.constants]
    for x, (name, want) in zip(flat, wanted):
        if isinstance(want, torch.Tensor) and isinstance(x, torch.Tensor):
            shape = (want.shape[0] * batch_factor, *want.shape[1:]) if want.dim() else tuple(want.shape)
            if tuple(x.shape) != tuple(shape) or x.dtype != want.dtype:
                raise AutoparError(
                    f"input {name!r} has shape {tuple(x.shape)} and dtype {x.dtype}, but the model was compiled for "
                    f"{tuple(shape)} {want.dtype}; call autopar.compile again with example inputs of this shape and "
                    "dtype")
    return flat


def install_parameters(module: nn.Module, model: nn.Module, plan, mesh, axes=None, keep=None, hook=True) -> None:
    """Replace ``module``'s parameters (adopted from ``model``) by DTensors placed as the plan says.

    FQNs are kept, tied parameters stay one object. ``keep`` (FQNs) limits this rank to those
    parameters (a pipeline stage's); the others are dropped. ``hook`` syncs gradients (dp's
    all-reduce) as each one is accumulated, compressed as ``plan.compression["grads"][fqn]`` says, or
    in ``plan.comm_schedule``'s asynchronous buckets (codegen/buckets.py) where it has one.
    """
    import functools

    from torch.distributed.tensor import distribute_tensor

    from .buckets import GradBuckets
    from .compress import make_compressor, parse_method

    axes = list(plan.mesh) if axes is None else axes
    replaced: dict[int, nn.Parameter] = {}
    order = expert_orders(plan)
    grads = (plan.compression or {}).get("grads") or {}
    names: dict[int, list[str]] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(fqn)
    hooked = []  # (names, parameter, compressor)
    for fqn, p in list(model.named_parameters(remove_duplicate=False)):
        owner, _, leaf = fqn.rpartition(".")
        target = module.get_submodule(owner) if owner else module
        if keep is not None and fqn not in keep:
            if leaf in target._parameters:
                target._parameters[leaf] = None
            continue
        if id(p) not in replaced:
            pls = plan.param_placements.get(fqn)
            if pls is None:
                raise PlanError(f"the plan has no placement for parameter {fqn!r}", f"$.param_placements[{fqn!r}]")
            data = p.detach()[order[fqn]] if fqn in order else p.detach()  # experts in the plan's placement
            dt = distribute_tensor(data, mesh, _placements([pls[a] for a in axes]), src_data_rank=None)
            newp = nn.Parameter(dt, requires_grad=p.requires_grad)
            if hook and p.requires_grad:  # a frozen parameter has no gradient to sync
                choice = next((grads[f] for f in names[id(p)] if f in grads), None)  # any name of a tied one
                compressor = make_compressor(choice) if choice and parse_method(choice).kind != "none" else None
                hooked.append((names[id(p)], newp, compressor))
            replaced[id(p)] = newp
        if owner == "" and leaf not in module._parameters:
            module.register_parameter(leaf, replaced[id(p)])
        else:
            setattr(target, leaf, replaced[id(p)])
    schedule = getattr(plan, "comm_schedule", None)  # bucketed async data-parallel syncs (codegen/buckets.py)
    buckets = GradBuckets(schedule, {f: p for fs, p, c in hooked if c is None for f in fs}, mesh,
                          axes, sync_gradients) if schedule else None
    for _, p, compressor in hooked:
        p.register_post_accumulate_grad_hook(buckets.hook if buckets is not None and buckets.owns(p) else
                                             functools.partial(sync_gradients, compressor=compressor))
    if buckets is not None and isinstance(getattr(module, "_autopar", None), dict):
        module._autopar["grad_buckets"] = buckets


def expert_orders(plan) -> dict[str, list[int]]:
    """Expert tensor FQN -> the order its rows are stored in (an MoE layer's placement, passes
    through routing.place_experts): row r holds expert order[r]."""
    return {fqn: n["moe"]["placement"] for n in plan.nodes if n.get("moe") and n["moe"].get("placement")
            for fqn in n["moe"]["expert_params"]}


def _root(model: nn.Module) -> dict:
    """The children and own parameters of ``model``'s root."""
    return {n: v for n, v in {**model._modules, **model._parameters}.items() if v is not None}


class CompiledModule(nn.Module):
    """What every compiled module shares: the user's model's children (so that
    ``named_parameters()`` keeps the FQNs), the plan, the mesh, the lowered program, the runtime's
    fix-ups and checkpoints. Its state lives outside nn.Module's attribute machinery."""

    def __init__(self, model: nn.Module, plan, traced, lowered: fx.GraphModule, device_mesh):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_autopar", {
            "plan": plan, "traced": traced, "lowered": lowered, "mesh": device_mesh, "fixups": [],
            "root_cls": type(model).__name__, "model": weakref.ref(model),
            "model_root": {n: weakref.ref(v) for n, v in _root(model).items()}})

    def _remember_state(self) -> None:
        """Note the parameters and buffers the program was built with (see :meth:`_check_unchanged`)."""
        named = [*self.named_parameters(remove_duplicate=False), *self.named_buffers(remove_duplicate=False)]
        self._autopar["built"] = {n: (t, t.shape, t.dtype) for n, t in named}

    def _check_unchanged(self, now: dict) -> None:
        """Refuse to run on a model changed since compile (``now``: FQN -> parameter or buffer): one of
        this module's replaced, added, removed, reshaped or cast, or a child or root parameter of the
        model given to compile replaced (this module shares its children). Values set in place are fine."""
        st, was = self._autopar, self._autopar["built"]
        changed = [f"{n} {'added' if n in now else 'removed'}" for n in sorted(now.keys() ^ was.keys())]
        for n, (t, shape, dtype) in was.items():
            if n in now and (now[n].shape != shape or now[n].dtype != dtype):
                changed.append(f"{n} is {tuple(now[n].shape)} {now[n].dtype}, compiled as {tuple(shape)} {dtype}")
            elif n in now and now[n] is not t:
                changed.append(f"{n} replaced")
        model, root = st["model"](), st["model_root"]
        if model is not None:
            have = _root(model)
            changed += [f"{n} of the model given to compile replaced" for n in sorted(have.keys() | root.keys())
                        if n not in have or n not in root or root[n]() is not have[n]]
        if changed:
            raise AutoparError(
                f"the model was changed after autopar.compile: {'; '.join(changed[:4])}{' ...' * (len(changed) > 4)}. "
                "The compiled program still expects what it was compiled with: compile the changed model again, or "
                "change values in place (pm.load_checkpoint(path), or p.copy_ of a DTensor placed like p)")

    @property
    def plan(self):
        return self._autopar["plan"]

    @property
    def device_mesh(self):
        """The torch DeviceMesh the module runs on."""
        return self._autopar["mesh"]

    @property
    def lowered_graph(self) -> fx.GraphModule:
        """The rank-local program, with every collective an explicit node."""
        return self._autopar["lowered"]

    @property
    def runtime_fixups(self) -> list[str]:
        """Places where DTensor produced a placement other than the plan's (should stay empty)."""
        return self._autopar["fixups"]

    def save_checkpoint(self, path, optimizer=None) -> None:
        """Save parameters, buffers and ``optimizer``'s state with torch.distributed.checkpoint,
        every rank writing its own shards (a pipeline's ranks their stages'), atomically: an
        earlier checkpoint at ``path`` is replaced only once this one is complete
        (codegen/checkpoint.py). Every rank calls it."""
        from .checkpoint import save_checkpoint

        save_checkpoint(self, path, optimizer)

    def load_checkpoint(self, path, optimizer=None) -> None:
        """Load a checkpoint saved under any plan and mesh (or ``autopar.save_checkpoint`` of a
        plain model), resharded to this module's placements; refuses an unfinished one."""
        from .checkpoint import load_checkpoint

        load_checkpoint(self, path, optimizer)


class ParallelModule(CompiledModule):
    """The user's model, run as the plan says. Parameters keep their FQNs and are DTensors."""

    def __init__(self, model: nn.Module, plan, traced, lowered: fx.GraphModule, device_mesh):
        super().__init__(model, plan, traced, lowered, device_mesh)
        install_parameters(self, model, plan, device_mesh)
        for fqn, b in model.named_buffers():
            if "." not in fqn:
                self.register_buffer(fqn, b)
        self._remember_state()

    def forward(self, *args, **kwargs):
        st = self._autopar
        tg = st["traced"]
        user = iter(user_inputs(tg, args, kwargs))
        params = dict(self.named_parameters(remove_duplicate=False))
        buffers = dict(self.named_buffers(remove_duplicate=False))
        self._check_unchanged({**params, **buffers})
        feed = tg.feed(params, buffers, user)
        out = list(Executor(st["lowered"], st["mesh"], st["fixups"]).run(*feed))
        n_mut = len(tg.mutated_buffers)
        with torch.no_grad():  # BatchNorm running statistics and other buffer updates
            for fqn, new in zip(tg.mutated_buffers, out[:n_mut]):
                buffers[fqn].copy_(new.detach())
        return pytree.tree_unflatten(out[n_mut:], tg.out_spec)

    def train_step(self, *args, target=None, loss_fn, **kwargs):
        """Forward and backward of one step: ``loss_fn(self(*args, **kwargs), target).backward()``;
        returns the loss, detached. On a mesh with 'pp' the same call runs the pipeline schedule, so
        a training loop written with it runs on any mesh."""
        loss = loss_fn(self(*args, **kwargs), target)
        loss.backward()
        return loss.detach()
