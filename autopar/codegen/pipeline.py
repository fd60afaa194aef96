"""Pipeline stages: cut the lowered program into one program per stage, and run them with
``torch.distributed.pipelining``'s schedules.

The cut (``split_stages``) is pure graph work. Every lowered node gets a stage:

* nodes that do not depend on the user's inputs (parameters, buffers, constants and what is
  computed from them alone: a weight's transpose, a causal mask, rotary tables) are *free*: each
  stage that needs one computes its own copy, so nothing but activations crosses a cut;
* every other node goes with the layer of the traced node it was made for (a redistribution with
  its consumer), and never before its inputs: stage(n) = max(stage of its layer, stages of its
  inputs). Multi-output ops stay with their ``getitem``\\ s.

A value produced in stage k and read in stage j > k is sent along every cut between them (the
schedules only talk to neighbours). Each rank sends its own shard: a DTensor leaves a stage as
its local tensor in its planned placements (partial sums reduced first, so that gradients come
back replicated rather than partial) and enters the next as a DTensor again, so the pp axis
composes with whatever the plan does on dp and tp.

A parameter read by several stages (tied embeddings: GPT-2's ``lm_head`` is ``wte``) lives on
each rank that holds one of those stages; after the schedule its gradient is summed over those
ranks, so every copy takes the same optimizer step.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from ..errors import AutoparError, PlanError
from ..mesh import collective_timeout
from . import lower as L
from .runtime import CompiledModule, Executor, _like, _placements, sync_gradients

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1")


@dataclass
class StageProgram:
    index: int
    nodes: list  # lowered nodes this stage runs, in graph order (its free nodes included)
    inputs: list  # values it receives (stage 0: the user's input placeholders)
    outputs: list  # values it sends on; the last stage: the model's outputs (nodes or constants)
    state: list  # placeholders of parameters, buffers and constants it reads


def split_stages(lowered: fx.GraphModule, tg, stage_of_origin, n_stages: int) -> list[StageProgram]:
    """Cut ``lowered`` into ``n_stages`` programs (see the module docstring).

    ``stage_of_origin(name)`` is the stage of the traced node ``name`` (its layer's stage)."""
    graph = lowered.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    is_state = lambda n: n.name in tg.params or n.name in tg.buffers or n.name in tg.constants  # noqa: E731
    free: set = set()
    stage: dict = {}
    output = None
    for n in graph.nodes:
        ins = n.all_input_nodes
        if n.op == "placeholder":
            if is_state(n):
                free.add(n)
            else:
                stage[n] = 0
        elif n.op == "output":
            output = n
        elif all(i in free for i in ins):
            free.add(n)
        elif n.target is operator.getitem:
            stage[n] = stage[n.args[0]]
        else:
            s = stage_of_origin(n.meta.get(L.META_ORIGIN))
            stage[n] = max([s] + [stage[i] for i in ins if i not in free])
    last_use = {}
    for n, s in stage.items():
        users = [u for u in n.users if u.op != "output"]
        last_use[n] = max([stage[u] for u in users] + ([n_stages - 1] if output in n.users else []), default=s)
    crossing = [[n for n in stage if stage[n] <= k < last_use[n]] for k in range(n_stages - 1)]
    programs = []
    for k in range(n_stages):
        own = [n for n in stage if stage[n] == k and n.op != "placeholder"]
        need: set = set()
        seeds = own + ([output] if k == n_stages - 1 else [])  # an output may depend on state alone
        todo = [i for n in seeds for i in n.all_input_nodes if i in free]
        while todo:
            i = todo.pop()
            if i not in need:
                need.add(i)
                todo.extend(j for j in i.all_input_nodes if j in free)
        state = sorted((n for n in need if n.op == "placeholder"), key=order.get)
        nodes = sorted([n for n in need if n.op != "placeholder"] + own, key=order.get)
        inputs = [n for n in graph.nodes if n.op == "placeholder" and not is_state(n)] if k == 0 else crossing[k - 1]
        outputs = crossing[k] if k < n_stages - 1 else pytree.tree_leaves(output.args[0])
        programs.append(StageProgram(k, nodes, sorted(inputs, key=order.get), sorted(outputs, key=order.get)
                                     if k < n_stages - 1 else outputs, state))
    return programs


def _wire_placements(node) -> tuple | None:
    """The placements a value crosses a cut in: its planned ones with partial sums reduced."""
    pls = node.meta.get(L.META_PLACED)
    return None if pls is None else tuple("R" if p.startswith("P") else p for p in pls)


class _SendInt8(torch.autograd.Function):
    """Sender side of an int8 pipeline send: x -> [int8 codes | fp32 scales] packed in an fp32
    tensor (codegen/compress.py ``pack_float32``); backward unpacks the packed gradient it gets."""

    @staticmethod
    def forward(ctx, x, block):
        from .compress import pack_float32

        ctx.shape, ctx.dtype, ctx.block = x.shape, x.dtype, block
        return pack_float32(x.detach(), block)

    @staticmethod
    def backward(ctx, packed):
        from .compress import unpack_float32

        return unpack_float32(packed, ctx.shape.numel(), ctx.block, ctx.dtype).view(ctx.shape), None


class _RecvInt8(torch.autograd.Function):
    """Receiver side: unpacks in forward; backward packs the gradient the same way."""

    @staticmethod
    def forward(ctx, packed, shape, dtype, block):
        from .compress import unpack_float32

        ctx.block = block
        return unpack_float32(packed.detach(), shape.numel(), block, dtype).view(shape)

    @staticmethod
    def backward(ctx, g):
        from .compress import pack_float32

        return pack_float32(g.contiguous(), ctx.block), None, None, None


class StageModule(nn.Module):
    """One stage's program as an ``nn.Module`` over plain tensors (what the pipelining stages send).

    ``wire`` (a parsed ``int8`` method, from ``plan.compression["pipeline"]``) int8-quantizes the
    floating-point values sent between stages, activations forward and their gradients backward:
    a sent value travels packed in one fp32 tensor of a size fixed by its (static) shape."""

    def __init__(self, program: StageProgram, lowered, mesh, state: dict, fixups: list, wire=None,
                 n_stages: int | None = None):
        super().__init__()
        self.program, self.lowered, self.mesh, self.fixups = program, lowered, mesh, fixups
        self.wire, self.last = wire, n_stages is None or program.index == n_stages - 1
        self._wire_shapes: dict = {}  # received value -> this rank's shape of it
        self._state = state  # placeholder name -> parameter / buffer / constant
        params = [state[n.name] for n in program.state if isinstance(state[n.name], nn.Parameter)]
        self.params = nn.ParameterList(list({id(p): p for p in params}.values()))
        self.tensor_outputs = [o for o in program.outputs if isinstance(o, fx.Node)]

    def forward(self, *xs):
        from torch.distributed.tensor import DTensor

        exe = Executor(self.lowered, self.mesh, self.fixups)
        env = exe.env
        for n in self.program.state:
            env[n] = self._state[n.name]
        for n, x in zip(self.program.inputs, xs):
            pls = _wire_placements(n)
            if self._packed(n) and self.program.index > 0:
                x = _RecvInt8.apply(x, self._local_shape(n, pls), n.meta["val"].dtype, self.wire.block)
            if pls is not None and not isinstance(x, DTensor):
                meta = n.meta["val"]
                x = DTensor.from_local(_like(x, meta), self.mesh, _placements(pls), run_check=False,
                                       shape=meta.shape, stride=meta.stride())
            env[n] = x
        for n in self.program.nodes:
            env[n] = exe.run_node(n)
        outs = []
        for n in self.tensor_outputs:
            x = env[n]
            pls = _wire_placements(n)
            if isinstance(x, DTensor):
                want = _placements(pls) if pls is not None else tuple(_placements(["R"] * self.mesh.ndim))
                if tuple(x.placements) != want:
                    x = x.redistribute(self.mesh, want)
                x = x.to_local()
            if isinstance(x, torch.Tensor) and self._packed(n) and not self.last:
                x = _SendInt8.apply(x.contiguous(), self.wire.block)  # a fresh tensor, not a view
            elif isinstance(x, torch.Tensor):  # zero-bubble schedules detach stage outputs in place: no views
                x = x.contiguous()
                x = x.clone() if x._is_view() else x
            outs.append(x)
        return tuple(outs) if len(outs) != 1 else outs[0]

    def _packed(self, n) -> bool:
        """Whether value ``n`` crosses a cut int8-packed (floating point, with int8 sends on)."""
        meta = n.meta.get("val")
        return self.wire is not None and isinstance(meta, torch.Tensor) and meta.is_floating_point()

    def _local_shape(self, n, pls) -> torch.Size:
        """This rank's shape of the value ``n`` that crosses a cut in placements ``pls``."""
        meta = n.meta["val"]
        if pls is None or all(p == "R" for p in pls):
            return meta.shape
        if n.name not in self._wire_shapes:  # static per microbatch: ask DTensor once
            from torch.distributed.tensor import empty

            self._wire_shapes[n.name] = empty(tuple(meta.shape), dtype=meta.dtype, device_mesh=self.mesh,
                                              placements=_placements(pls)).to_local().shape
        return self._wire_shapes[n.name]


def schedule_class(name: str):
    from torch.distributed.pipelining import (Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                              ScheduleInterleavedZeroBubble)

    classes = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B,
               "zb-h1": ScheduleInterleavedZeroBubble}
    if name not in classes:
        raise PlanError(f"unknown pipeline schedule {name!r}; choose one of {SCHEDULES}", "$.pipeline.schedule")
    return classes[name]


def local_stages(pp_rank: int, pp: int, n_stages: int) -> list[int]:
    """The stages pp rank ``pp_rank`` runs: r, r + p, r + 2p, ... (the looped layout)."""
    if n_stages % pp:
        raise PlanError(f"{n_stages} pipeline stages do not divide over pp={pp} ranks", "$.pipeline.bounds")
    return list(range(pp_rank, n_stages, pp))


def check_microbatches(flat_inputs, m: int, dp: int) -> None:
    """Every tensor input (dim 0: the batch) splits into ``m`` microbatches (1: no pipeline), each
    over ``dp`` ranks. autopar pads no batch (padded rows would change a mean loss), so it refuses."""
    for i, x in enumerate(flat_inputs):
        if not isinstance(x, torch.Tensor) or (x.dim() == 0 and m == 1):
            continue
        if x.dim() == 0 or x.shape[0] % m:
            raise AutoparError(
                f"input {i} has shape {tuple(x.shape)}: the pipeline splits every input on dim 0 into {m} microbatches, "
                f"so dim 0 must be a multiple of {m}; change the batch size or plan with other microbatch counts")
        if (x.shape[0] // m) % dp:
            rows = f"a microbatch of {x.shape[0] // m} rows" if m > 1 else f"a batch of {x.shape[0]}"
            raise AutoparError(
                f"input {i} has shape {tuple(x.shape)}: {rows} does not split over dp={dp}, and autopar pads no "
                f"batch; make dim 0 a multiple of {m * dp} (pad it and mask the padding out of the loss) or use a "
                "mesh without dp")


class _NoPipelineBackward(torch.autograd.Function):
    """Outputs of a pipelined forward: backward cannot flow into a finished schedule."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        raise AutoparError("a module with a 'pp' axis trains through pm.train_step(*inputs, target=..., loss_fn=...), "
                           "which runs forward and backward inside the pipeline schedule; pm(x) only runs forward")


def sum_shared_grads(groups: list, m: int, params) -> None:
    """After a schedule: every gradient brought to its parameter's placement (dp's all-reduce) and
    divided by the microbatch count (each microbatch's loss is a mean); then the gradients of
    parameters read by several stages summed over the ranks that hold them."""
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            sync_gradients(p)  # first, so that every holder's shard is in the parameter's placement
            p.grad.div_(m)
    with torch.no_grad():
        for p, group in groups:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            local = p.grad.to_local()
            buf = local.contiguous()  # a gradient may arrive strided (zero-bubble's weight pass)
            dist.all_reduce(buf, group=group)
            if buf is not local:
                local.copy_(buf)


class PipelinedModule(CompiledModule):
    """The user's model on a mesh with a ``pp`` axis: this rank's stages, run by a schedule.

    * ``pm.train_step(*inputs, target=t, loss_fn=f)`` splits the batch (every input and the
      target, on dim 0) into the plan's microbatches, runs the plan's schedule (forward, loss
      ``f(outputs, t)`` per microbatch on the last stage, backward), leaves the gradients of the
      whole batch in this rank's parameters and returns the mean loss on every rank. ``f`` must
      average over its microbatch (as ``F.cross_entropy`` does), so that the mean over equal
      microbatches is the whole batch's loss.
    * ``pm(*inputs)`` runs the forward schedule and returns the full outputs on every rank; they
      cannot be backpropagated (use ``train_step``).
    * ``named_parameters()`` holds this rank's stages' parameters only, with their FQNs.
    """

    def __init__(self, model: nn.Module, plan, traced, lowered, device_mesh, programs: list[StageProgram]):
        super().__init__(model, plan, traced, lowered, device_mesh)
        import torch.distributed as dist
        from torch.distributed.pipelining import PipelineStage

        from .runtime import install_parameters

        pipe = plan.pipeline
        p = plan.mesh["pp"]
        names = device_mesh.mesh_dim_names
        inner_names = tuple(a for a in names if a != "pp")
        inner = device_mesh[inner_names] if len(inner_names) > 1 else device_mesh[inner_names[0]]
        pp_rank = device_mesh.get_local_rank("pp")
        pp_group = device_mesh.get_group("pp")
        n_stages = len(programs)
        mine = local_stages(pp_rank, p, n_stages)
        fqn_of = traced.params
        holders: dict[str, list[int]] = {}  # parameter placeholder -> pp ranks whose stages read it
        for prog in programs:
            for n in prog.state:
                if n.name in fqn_of and prog.index % p not in holders.setdefault(n.name, []):
                    holders[n.name].append(prog.index % p)
        names_of: dict[int, list[str]] = {}  # a parameter's every FQN (tied ones have several)
        by_fqn = dict(model.named_parameters(remove_duplicate=False))
        for fqn, q in by_fqn.items():
            names_of.setdefault(id(q), []).append(fqn)
        keep = {f for k in mine for n in programs[k].state if n.name in fqn_of
                for f in names_of[id(by_fqn[fqn_of[n.name]])]}
        install_parameters(self, model, plan, inner, axes=list(inner_names), keep=keep, hook=False)
        params = dict(self.named_parameters(remove_duplicate=False))
        buffers = dict(model.named_buffers(remove_duplicate=False))
        state = {}
        for prog in programs:
            for n in prog.state:
                if n.name in fqn_of:
                    if fqn_of[n.name] in params:
                        state[n.name] = params[fqn_of[n.name]]
                elif n.name in traced.buffers:
                    state[n.name] = buffers[traced.buffers[n.name]]
                else:
                    state[n.name] = traced.constants[n.name]
        # gradients of parameters read on several pp ranks are summed over those ranks; every
        # rank creates every group, in the same order, as torch.distributed requires
        columns = device_mesh.mesh.reshape(device_mesh.mesh.shape[0], -1)
        me = dist.get_rank()
        shared = []
        for name in sorted(holders):
            ranks = sorted(holders[name])
            if len(ranks) < 2:
                continue
            group = pp_group if len(ranks) == p else None
            if group is None:
                for c in range(columns.shape[1]):
                    g = dist.new_group([int(columns[r, c]) for r in ranks], timeout=collective_timeout())
                    if me in [int(columns[r, c]) for r in ranks]:
                        group = g
            if name in state and pp_rank in ranks:
                shared.append((state[name], group))
        fixups = self._autopar["fixups"]
        device = torch.device(device_mesh.device_type, torch.cuda.current_device()) if device_mesh.device_type == "cuda" \
            else torch.device("cpu")
        wire = (plan.compression or {}).get("pipeline")
        if wire is not None:
            from .compress import parse_method

            wire = parse_method(wire)
            wire = None if wire.kind == "none" else wire
            if wire is not None and wire.kind != "int8":
                raise PlanError(f"pipeline sends compress with 'int8' (or 'int8:B'), not {str(wire)!r}",
                                "$.compression.pipeline")
        modules = {k: StageModule(programs[k], lowered, inner, state, fixups, wire, n_stages) for k in mine}
        stages = [PipelineStage(modules[k], k, n_stages, device, group=pp_group) for k in mine]
        self._autopar.update(
            stages=stages, modules=modules, shared=shared, schedules={}, pp_group=pp_group,
            last_rank=(n_stages - 1) % p, microbatches=int(pipe["microbatches"]), schedule=pipe["schedule"],
            programs=programs)
        self._remember_state()

    @property
    def stage_programs(self) -> list[StageProgram]:
        """This rank's stages' programs (``lowered_graph`` is the whole model's)."""
        return [self._autopar["programs"][k] for k in self._autopar["modules"]]

    def _schedule(self, loss_fn):
        st = self._autopar
        key = id(loss_fn)
        if key not in st["schedules"]:
            cls = schedule_class(st["schedule"])
            single = st["schedule"] in ("gpipe", "1f1b")
            if single and len(st["stages"]) != 1:
                raise PlanError(f"schedule {st['schedule']!r} runs one stage per rank, but this plan puts "
                                f"{len(st['stages'])} on each; use 'interleaved-1f1b' or 'zb-h1'", "$.pipeline.schedule")
            wrapped = None
            if loss_fn is not None:

                def wrapped(out, target):
                    return loss_fn(self._outputs(out if isinstance(out, tuple) else (out,)), target)

            st["schedules"][key] = cls(st["stages"][0] if single else st["stages"], st["microbatches"],
                                       loss_fn=wrapped, scale_grads=False)
        return st["schedules"][key]

    def _inputs(self, args, kwargs) -> list:
        from .runtime import user_inputs

        st = self._autopar
        self._check_unchanged({**dict(self.named_parameters(remove_duplicate=False)),
                               **dict(self.named_buffers(remove_duplicate=False))})
        flat = user_inputs(st["traced"], args, kwargs, batch_factor=st["microbatches"])
        if st["traced"].mutated_buffers:
            raise AutoparError(f"buffers {st['traced'].mutated_buffers[:3]} are updated in forward (BatchNorm "
                               "statistics?); a pipelined module cannot keep them in step, plan without 'pp'")
        return flat

    def train_step(self, *args, target=None, loss_fn, **kwargs):
        import torch.distributed as dist

        st = self._autopar
        flat = self._inputs(args, kwargs)
        if not callable(loss_fn):
            raise AutoparError(f"loss_fn must be a callable loss_fn(outputs, target), got {loss_fn!r}")
        if target is not None:
            check_microbatches([target], st["microbatches"], 1)
        losses: list = []
        self._schedule(loss_fn).step(*flat, target=target, losses=losses, return_outputs=False)
        m = st["microbatches"]
        sum_shared_grads(st["shared"], m, list({id(q): q for q in self.parameters()}.values()))
        loss = torch.stack([x.detach().float() for x in losses]).mean() if losses else torch.zeros(())
        loss = loss.to(st["stages"][0].device)
        dist.broadcast(loss, group=st["pp_group"], group_src=st["last_rank"])
        return loss

    def forward(self, *args, **kwargs):
        import torch.distributed as dist

        st = self._autopar
        flat = self._inputs(args, kwargs)
        with torch.no_grad():
            out = self._schedule(None).eval(*flat)
        pp_rank = st["mesh"].get_local_rank("pp")
        metas = [None]
        if pp_rank == st["last_rank"]:
            tensors = list(out) if isinstance(out, (tuple, list)) else [out]
            metas = [[(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in tensors]]
        dist.broadcast_object_list(metas, group=st["pp_group"], group_src=st["last_rank"])
        if pp_rank != st["last_rank"]:
            tensors = [torch.empty(s, dtype=getattr(torch, d), device=st["stages"][0].device) for s, d in metas[0]]
        for t in tensors:
            dist.broadcast(t, group=st["pp_group"], group_src=st["last_rank"])
        if torch.is_grad_enabled():
            tensors = [_NoPipelineBackward.apply(t.requires_grad_()) if t.is_floating_point() else t for t in tensors]
        return self._outputs(tensors)

    def _outputs(self, tensors):
        """The model's outputs, structured as it returns them, from the last stage's tensors."""
        st = self._autopar
        it = iter(tensors)
        flat = [next(it) if isinstance(o, fx.Node) else o for o in st["programs"][-1].outputs]
        return pytree.tree_unflatten(flat, st["traced"].out_spec)
