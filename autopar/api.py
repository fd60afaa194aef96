"""The public entry points: ``autopar.plan`` (offline) and ``autopar.compile`` (run)."""

from __future__ import annotations

import math
import os
import time

import torch
import torch.nn as nn

from .errors import AutoparError, MeshError, PlanError
from .mesh import Mesh
from .progress import phase

MODES = ("train", "infer")


def _check(model, mesh, mode, optimizer="adamw"):
    from .cost_models.memory import check_optimizer

    check_optimizer(optimizer)
    if not isinstance(model, nn.Module):
        raise AutoparError(f"autopar needs an nn.Module, got {type(model).__name__}")
    if not isinstance(mesh, Mesh):
        raise MeshError(f"mesh must be an autopar.Mesh, e.g. autopar.Mesh({{'dp': 2, 'tp': 2}}); got {type(mesh).__name__}")
    if mode not in MODES:
        raise AutoparError(f"mode must be one of {MODES}, got {mode!r}")


def plan(model: nn.Module, mesh: Mesh, example_inputs, *, mode: str = "train", example_kwargs: dict | None = None,
         time_limit_s: float = 20.0, memory_limit_bytes: float | None = None, progress=None, op_profile="auto",
         pins: dict | None = None, optimizer: str = "adamw", pipeline: dict | None = None,
         context_parallel: str = "auto", sequence_parallel: bool | None = None, capacity_factor: float | None = None,
         routing=None, expert_parallel: bool | None = None, traced=None, compression=None,
         fusion_preview: bool = True, comm_schedule: str = "auto"):
    """Plan ``model`` on ``mesh`` without running anything; works on the ``meta`` device.

    ``pins`` fixes placements the solver must keep: ``{"blocks.*.fc1.weight": "S(0)"}`` (fnmatch
    patterns over parameter FQNs and graph node names; one placement per mesh axis, or a dict
    ``{axis: placement}`` that leaves the other axes free).
    ``op_profile``: ``"auto"`` costs ops with this device's measured times (``autopar profile
    --hardware local``) when the hardware preset is ``local``; a path uses that profile file;
    ``None`` uses the roofline only. ``optimizer`` ("adamw", "adamw8bit", "sgd", "sgd-momentum")
    sets the optimizer state the memory model counts. A ``pp`` axis splits the model's repeated
    blocks into pipeline stages (``plan.pipeline``): the solver chooses the schedule, microbatch
    count, stages per rank and split, unless ``pipeline`` fixes some of them (``{"schedule":
    "interleaved-1f1b", "virtual_stages": 2, "microbatches": 192, "bounds": "equal"}``; see
    ``passes.pipeline.plan_pipeline``'s ``stages``). A ``cp`` axis shards the inputs' sequence
    dim; ``context_parallel`` ("auto", "ring", "ulysses") says how attention runs on it: the
    solver's choice per layer, ring attention everywhere, or Ulysses (head-sharded) everywhere.
    ``sequence_parallel=True`` forces Megatron sequence parallelism on ``tp``: activations that
    carry the sequence dim are never replicated on tp (layernorms and residuals run
    sequence-sharded; all-reduces become reduce-scatter + all-gather pairs). ``None`` leaves it
    to the solver, which takes it where it pays (memory or time); ``False`` forbids it.
    MoE layers (found on the graph, passes/moe.py) may shard their experts over an ``ep`` (or
    ``tp``) axis and move tokens to them by all-to-all. Their dispatch is dropless unless
    ``capacity_factor`` caps the assignments each rank sends each expert (the rest are dropped,
    and the plan says so); ``routing`` (``autopar.profile_routing(...)`` or its saved file) makes
    the plan place experts on devices by their measured load and inter-layer traffic.
    ``expert_parallel=False`` forbids the all-to-all (the pure DP x TP x PP plan), ``True`` demands it.
    ``traced``: ``passes.trace.trace(model, example_inputs, example_kwargs)``, when planning one
    model on several meshes (it is traced once); ``fusion_preview=False`` leaves ``plan.fusion``
    empty (a mesh search previews the kernels of the mesh it picks only: ``preview_fusion``).
    ``compression`` compresses data-parallel gradient all-reduces (autopar/compression.py):
    ``"auto"`` lets the solver choose each gradient's method (none, int8, top-k, PowerSGD) to
    minimise the communication the backward pass cannot hide, within a relative L2 error budget
    of the whole gradient (default 0.1); a method (``"int8"``, ``"topk:0.01"``, ``"powersgd:4"``)
    applies it everywhere; a dict sets ``grads`` ("auto" or a method), ``error_budget``,
    ``calibration`` (``autopar.calibrate_compression(...)`` or its file; without it a runnable
    model is calibrated on ``example_inputs`` and a meta one on Gaussian gradients), ``methods``
    (the menu) and ``pipeline`` ("int8": stage-to-stage sends quantized in both directions).
    ``comm_schedule="auto"`` (training, no ``pp`` axis) schedules the backward's gradient
    all-reduces: buckets, their order and start times, chosen to hide them behind the backward
    (``plan.comm_schedule``, passes/comm_schedule.py); ``"off"`` leaves it None.
    Returns an
    ``autopar.Plan``. Raises ``TraceError`` if the model cannot be traced and ``InfeasibleError``
    if no layout fits the device memory.
    """
    _check(model, mesh, mode, optimizer)
    say = progress or (lambda msg: None)
    if any(p.is_meta for p in model.parameters()):  # a meta model: only the inputs' shapes matter, on meta too
        import torch.utils._pytree as pytree

        example_inputs, example_kwargs = pytree.tree_map_only(
            torch.Tensor, lambda t: t.to("meta"), (tuple(example_inputs), example_kwargs))
    if "pp" in mesh.axes:
        return _plan_pipelined(model, mesh, example_inputs, mode=mode, example_kwargs=example_kwargs,
                               time_limit_s=time_limit_s, memory_limit_bytes=memory_limit_bytes, progress=say,
                               op_profile=op_profile, pins=pins, optimizer=optimizer, stages=pipeline,
                               context_parallel=context_parallel, sequence_parallel=sequence_parallel,
                               capacity_factor=capacity_factor, routing=routing, expert_parallel=expert_parallel,
                               traced=traced, compression=compression,
                               comm_schedule="off")  # the stages' gradient syncs are not scheduled yet
    if pipeline is not None:
        raise AutoparError(f"pipeline={pipeline!r} fixes pipeline stages, but the mesh {dict(mesh.axes)} has no 'pp' axis")
    from .passes.replicate import trace_deep

    t0 = time.perf_counter()
    with phase(say, "tracing"):
        tg = traced if traced is not None else trace_deep(model, example_inputs, example_kwargs, say)
    if traced is None:
        say(f"traced {tg.model_name}: {sum(1 for _ in tg.gm.graph.nodes)} ATen nodes in {time.perf_counter() - t0:.1f} s")
    plan = plan_traced(tg, mesh, mode, time_limit_s=time_limit_s, memory_limit_bytes=memory_limit_bytes,
                       progress=say, trainable=_trainable(model), op_profile=op_profile, pins=pins, optimizer=optimizer,
                       context_parallel=context_parallel, sequence_parallel=sequence_parallel,
                       capacity_factor=capacity_factor, routing=routing, expert_parallel=expert_parallel,
                       compression=compression, model=model, comm_schedule=comm_schedule)
    if fusion_preview:
        plan.fusion = preview_fusion(tg, plan, mesh)
    return plan


def _plan_pipelined(model, mesh: Mesh, example_inputs, *, memory_limit_bytes, progress, compression=None, **options):
    """A mesh with "pp": the intra-op plan on the other axes, then the stages (passes/pipeline.py)."""
    import dataclasses

    from .passes.pipeline import plan_pipeline

    pp = mesh.axes["pp"]
    inner = {a: n for a, n in mesh.axes.items() if a != "pp"} or {"tp": 1}
    plan, stages, names = plan_pipeline(model, Mesh(inner, hardware=mesh.hardware), example_inputs, pp,
                                        memory_limit_bytes=memory_limit_bytes, progress=progress, **options)
    v = stages.virtual_stages
    progress(f"pipeline: {pp} ranks{f' x {v} stages' if v > 1 else ''}, {stages.schedule}, {stages.microbatches} "
             f"microbatches, predicted step {stages.step_time:.4g} s, bubble {stages.bubble:.1%} (analytic "
             f"{'(p-1)/(m*v)' if v > 1 else '(p-1)/m'} = {stages.analytic_bubble:.1%})")
    doc = {**stages.to_json(), "layers": names}
    plan = dataclasses.replace(
        plan, mesh=dict(mesh.axes), step_time_s=stages.step_time, peak_memory_bytes=int(max(stages.rank_memory)),
        # the intra-op plan's parts are summed over all stages for the whole batch; the step is the pipeline's
        time_breakdown={"pipeline_step_s": stages.step_time, **{f"all_stages_{k}": v for k, v in plan.time_breakdown.items()}},
        pipeline=doc)
    if compression is not None:
        from .compression import choose_compression
        from .passes.replicate import trace_deep

        tg = options.get("traced") or trace_deep(model, example_inputs, options.get("example_kwargs"))
        plan = dataclasses.replace(plan, time_breakdown=dict(plan.time_breakdown))
        choose_compression(plan, tg, mesh.hardware_spec, compression, model=model, progress=progress)
    return plan


def _trainable(model: nn.Module) -> set[str]:
    """FQNs of trainable parameters, every name of a tied parameter included."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


def explain_infeasible(tg, axes: dict | None, hw, limit: float, *, mode: str = "train", trainable=None,
                       optimizer: str = "adamw", **facts) -> str | None:
    """Why no layout of ``tg`` on mesh ``axes`` (None: any mesh of ``facts["devices"]`` devices)
    can fit ``limit`` bytes per device, in z3's words (solvers/feasibility.py), or None. The state
    is counted as the memory model counts it (a lower bound of it: each tensor's optimizer state
    taken whole): tied parameters once, gradient and state for trained ones, MoE experts apart."""
    from .cost_models.memory import state_bytes
    from .solvers.feasibility import Request, explain

    experts = {p for layer in tg.moe for p in layer.params}
    trainable = set(tg.params.values()) if trainable is None else trainable
    state = [0.0, 0.0]  # S_d, S_e
    for node in tg.gm.graph.nodes:
        val = node.meta.get("val")
        if (node.op == "placeholder" and node.name in tg.params and node.name not in tg.aliases and val is not None
                and any(u.op == "call_function" for u in node.users)):  # an unused one is on no pipeline stage
            trained = mode == "train" and tg.params[node.name] in trainable and val.dtype.is_floating_point
            n = val.numel()  # the whole tensor's state: no more than its shards' together
            state[node.name in experts] += (1 + trained) * n * val.element_size() + trained * state_bytes(n, optimizer)
    return explain(Request(limit, mesh=axes, hardware=hw.name, dense_state=state[0], expert_state=state[1],
                           state=f"parameters, gradients and {optimizer} state" if mode == "train" else "parameters", **facts))


def _op_profile(spec, hw):
    from .cost_models.profile import load_profile

    if spec == "auto":
        return load_profile() if hw.name == "local" else None
    if spec is not None and not isinstance(spec, (str, os.PathLike)):
        raise AutoparError(f"op_profile must be 'auto', None or the path of a profile file, got {spec!r}")
    return None if spec is None else load_profile(spec)


def plan_traced(tg, mesh: Mesh, mode: str, *, time_limit_s: float, memory_limit_bytes, progress, trainable=None,
                op_profile="auto", pins=None, optimizer="adamw", context_parallel="auto", sequence_parallel=None,
                capacity_factor=None, routing=None, expert_parallel=None, compression=None, model=None,
                comm_schedule="auto"):
    from .passes.annotate import annotate
    from .passes.build_plan import build_plan
    from .solvers.intra_op import solve

    hw = mesh.hardware_spec
    joint, warnings = None, []
    if mesh.reordered:
        warnings.append(f"mesh axes given as {', '.join(mesh.given_order)} are laid out outer to inner as "
                        f"{', '.join(mesh.names)}, so that the inner axes stay on the fastest links")
    if mode == "train":
        t0 = time.perf_counter()
        try:
            from .passes.joint import joint_costs

            if getattr(tg, "joint", None) is None:  # one trace serves every mesh planned for it
                with phase(progress, "tracing forward+backward"):
                    tg.joint = joint_costs(tg.source.module(), *tg.example)
                progress(f"traced the joint forward+backward graph in {time.perf_counter() - t0:.1f} s")
            joint = tg.joint
        except Exception as exc:  # the forward plan stands; only the backward estimate is coarser
            warnings.append(f"the joint forward+backward graph could not be traced ({type(exc).__name__}: "
                            f"{str(exc)[:160]}); backward costs use 2x forward")
    t0 = time.perf_counter()
    prof = _op_profile(op_profile, hw)
    if prof is not None:
        progress(f"costing ops with the profile {prof.path} ({len(prof.ops)} measured op calls)")
    limit = memory_limit_bytes if memory_limit_bytes is not None else hw.memory_capacity_bytes
    with phase(progress, "costing strategies"):
        an = annotate(tg, mesh.axes, hw, mode, trainable=trainable, joint=joint, profile=prof, pins=pins,
                      optimizer=optimizer, context_parallel=context_parallel, sequence_parallel=sequence_parallel,
                      expert_parallel=expert_parallel, memory_limit=limit if math.isfinite(limit) else None)
    an.warnings.extend(warnings)
    n_strats = sum(len(s) for s in an.strategies)
    progress(f"annotated {len(an.nodes)} decision nodes, {n_strats} strategies, {len(an.edges)} edges "
             f"in {time.perf_counter() - t0:.1f} s")
    for w in an.warnings:
        progress(f"warning: {w}")
    # identical layers take identical strategies: one representative each is solved (exact over
    # such tied choices, inter-layer edges included; solvers.intra_op.fold_copies)
    copies = an.repeated_layers() if os.environ.get("AUTOPAR_NO_DEDUP") != "1" else None
    with phase(progress, "solving", total=time_limit_s, clock=True):
        sol = solve(an.problem(limit), time_limit_s=time_limit_s, progress=progress, copies=copies)
    progress(f"solved ({sol.status}) in {sol.solve_time_s:.1f} s: predicted {sol.objective * 1e3:.3f} ms per step")
    plan = build_plan(an, sol, mesh.hardware)
    fixed = an.ctx.overhead("step_s") if mode == "train" else 0.0
    if fixed:  # the runtime's fixed cost per step (profiled): the same for every layout
        plan.time_breakdown["runtime_s"] = fixed
        plan.step_time_s += fixed
    from .routing import place_experts, set_dispatch

    set_dispatch(plan, capacity_factor)
    if routing is not None:
        place_experts(plan, routing, mesh.axes, progress, time_limit_s=min(8.0, time_limit_s))
    if compression is not None and mode == "train":
        from .compression import choose_compression

        choose_compression(plan, tg, hw, compression, model=model, progress=progress)
    if comm_schedule not in ("auto", "off"):
        raise AutoparError(f"comm_schedule must be 'auto' or 'off', got {comm_schedule!r}")
    if comm_schedule == "auto" and mode == "train":
        from .passes.comm_schedule import schedule_comm

        schedule_comm(plan, hw, tg=tg, memory_limit_bytes=memory_limit_bytes, progress=progress,
                      time_limit_s=min(5.0, time_limit_s))
    if context_parallel != "auto":
        plan.solver["context_parallel"] = context_parallel
    if sequence_parallel is not None:
        plan.solver["sequence_parallel"] = bool(sequence_parallel)
    if pins:
        import json

        plan.solver["pins"] = json.dumps(pins, sort_keys=True)  # the user fixed these; explain says so
    return plan


def preview_fusion(tg, plan, mesh: Mesh) -> dict:
    """The fused kernels the per-rank program will have (codegen/fusion.py), for a plan made
    offline: Triton on a GPU preset; on this machine's own preset, what compile would choose."""
    from .codegen.fusion import choose_backend, fuse
    from .codegen.lower import lower
    from .passes.annotate import CostContext

    graph = lower(tg, plan, CostContext(mesh.axes, mesh.hardware_spec).collectives, module=False)
    report = fuse(graph, "torch")  # finds the groups; replaces nothing
    if mesh.hardware_spec.name == "local":
        report["backend"], report["reason"] = choose_backend("cpu")
    else:
        report["backend"], report["reason"] = "triton", f"planned for {mesh.hardware_spec.name} GPUs; compile decides on the machine"
    return report


def compile(model: nn.Module, mesh: Mesh, example_inputs, *, mode: str = "train", example_kwargs: dict | None = None,
            plan=None, time_limit_s: float = 20.0, memory_limit_bytes: float | None = None, progress=None,
            op_profile="auto", pins: dict | None = None, optimizer: str = "adamw", pipeline: dict | None = None,
            context_parallel: str = "auto", sequence_parallel: bool | None = None, capacity_factor: float | None = None,
            routing=None, expert_parallel: bool | None = None, compression=None, fusion: bool = True,
            comm_schedule: str = "auto"):
    """Plan (or take ``plan``) and build the ParallelModule. Call on every rank.

    Every rank must reach the same plan; the plan hashes are compared across ranks and a
    mismatch raises ``PlanError`` naming the ranks. Dim 0 of every tensor input (the batch) must
    split evenly over ``dp`` (and the microbatches): autopar pads no batch, it refuses one. With a
    ``pp`` axis the result is a ``PipelinedModule`` (``codegen/pipeline.py``): train it with
    ``pm.train_step(*inputs, target=, loss_fn=)``; ``pipeline`` fixes stage choices as in
    :func:`plan`; so does ``compression``. ``fusion`` fuses pointwise and row-reduction chains into
    generated Triton kernels where Triton runs (CUDA, or ``TRITON_INTERPRET=1``); elsewhere the
    unfused torch ops run, and ``module.plan.fusion`` records which and why. ``comm_schedule`` as in
    :func:`plan`.

    Needs a running process group (``autopar run script.py --nproc N``, or torchrun, then
    ``torch.distributed.init_process_group()``); without one it raises ``MeshError`` (use :func:`plan`
    to plan offline). Collectives fail after ``$AUTOPAR_TIMEOUT`` seconds (``autopar run --timeout``,
    default 300) instead of hanging on a rank that died or hangs; without it, the timeout given to
    ``init_process_group(timeout=...)`` applies (torch's default: 30 min), so pass one.
    """
    _check(model, mesh, mode, optimizer)
    import torch.utils._pytree as pytree

    from .codegen.lower import lower
    from .codegen.pipeline import check_microbatches
    from .codegen.runtime import ParallelModule
    from .passes.annotate import CostContext
    from .passes.trace import trace
    from .plan import check_graph_hash

    device_mesh = mesh.device_mesh()  # raises MeshError if the world size does not match
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise AutoparError(
            f"parameters {meta[:3]}{'...' if len(meta) > 3 else ''} are on the meta device; autopar.compile runs the "
            "model, so materialize it first (or use autopar.plan to plan without running)")
    if "pp" in mesh.axes:
        return _compile_pipelined(model, mesh, device_mesh, example_inputs, example_kwargs, plan, mode=mode,
                                  time_limit_s=time_limit_s, memory_limit_bytes=memory_limit_bytes, progress=progress,
                                  op_profile=op_profile, pins=pins, optimizer=optimizer, pipeline=pipeline,
                                  context_parallel=context_parallel, sequence_parallel=sequence_parallel,
                                  capacity_factor=capacity_factor, routing=routing, expert_parallel=expert_parallel,
                                  compression=compression)
    if pipeline is not None:
        raise AutoparError(f"pipeline={pipeline!r} fixes pipeline stages, but the mesh {dict(mesh.axes)} has no 'pp' axis")
    check_microbatches(pytree.tree_leaves((example_inputs, example_kwargs)), 1, mesh.axes.get("dp", 1))
    tg = trace(model, example_inputs, example_kwargs)
    if plan is None:
        plan = plan_traced(tg, mesh, mode, time_limit_s=time_limit_s, memory_limit_bytes=memory_limit_bytes,
                           progress=progress or (lambda m: None),
                           trainable=_trainable(model), op_profile=op_profile, pins=pins, optimizer=optimizer,
                           context_parallel=context_parallel, sequence_parallel=sequence_parallel,
                           capacity_factor=capacity_factor, routing=routing, expert_parallel=expert_parallel,
                           compression=compression, model=model, comm_schedule=comm_schedule)
    else:
        check_graph_hash(plan, tg.graph_hash)
        if dict(plan.mesh) != dict(mesh.axes):
            raise PlanError(f"the plan is for mesh {plan.mesh}, not {mesh.axes}", "$.mesh")
    _check_same_plan_everywhere(plan)
    ctx = CostContext(mesh.axes, mesh.hardware_spec)
    lowered = lower(tg, plan, ctx.collectives)
    from .codegen.fusion import choose_backend, fuse

    backend, reason = choose_backend(device_mesh.device_type) if fusion else ("torch", "fusion=False")
    import dataclasses

    plan = dataclasses.replace(plan, fusion={**fuse(lowered, backend), "backend": backend, "reason": reason})
    return ParallelModule(model, plan, tg, lowered, device_mesh)


def _compile_pipelined(model, mesh: Mesh, device_mesh, example_inputs, example_kwargs, plan, **options):
    """A mesh with "pp": plan (or check) the pipeline, trace one microbatch, lower it with the
    plan's layout on the other axes and cut it into stages (codegen/pipeline.py)."""
    import dataclasses

    import torch
    import torch.utils._pytree as pytree

    from .codegen.lower import lower
    from .codegen.pipeline import PipelinedModule, check_microbatches, split_stages
    from .passes.annotate import CostContext
    from .passes.pipeline import layer_index
    from .passes.trace import trace
    from .plan import check_graph_hash

    if plan is None:
        plan = globals()["plan"](model, mesh, example_inputs, example_kwargs=example_kwargs, **options)
    else:
        check_graph_hash(plan, trace(model, example_inputs, example_kwargs).graph_hash)
        if dict(plan.mesh) != dict(mesh.axes):
            raise PlanError(f"the plan is for mesh {plan.mesh}, not {mesh.axes}", "$.mesh")
        if not plan.pipeline:
            raise PlanError("the plan has a 'pp' axis but no pipeline stages; plan it again with autopar.plan", "$.pipeline")
    _check_same_plan_everywhere(plan)
    m = int(plan.pipeline["microbatches"])
    inner = {a: n for a, n in plan.mesh.items() if a != "pp"} or {"tp": 1}
    check_microbatches(pytree.tree_leaves((example_inputs, example_kwargs)), m, inner.get("dp", 1))
    micro = pytree.tree_map_only(torch.Tensor, lambda t: t[: t.shape[0] // m] if t.dim() else t,
                                 (tuple(example_inputs), example_kwargs))
    tg = trace(model, *micro)  # the stages run one microbatch at a time
    try:
        lowered = lower(tg, dataclasses.replace(plan, mesh=inner), CostContext(inner, mesh.hardware_spec).collectives)
    except KeyError as exc:
        raise PlanError(f"the plan has no layout for node {exc}: one microbatch traces to another graph than the whole "
                        "batch did; plan with other microbatch counts", "$.nodes") from None
    _, layer = layer_index(tg)
    stage_of_layer = {i: k for k, (a, b) in enumerate(plan.pipeline["bounds"]) for i in range(a, b)}
    n_stages = len(plan.pipeline["bounds"])

    def stage_of(origin):
        return n_stages - 1 if origin == "output" else stage_of_layer.get(layer.get(origin, 0), 0)

    programs = split_stages(lowered, tg, stage_of, n_stages)
    return PipelinedModule(model, plan, tg, lowered, device_mesh, programs)


def _check_same_plan_everywhere(plan) -> None:
    import re

    import torch.distributed as dist

    from .mesh import collective_timeout

    if dist.get_backend() == "gloo":  # all ranks must get here: gloo's monitored barrier names those that don't
        timeout = collective_timeout()
        try:
            dist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
        except RuntimeError as exc:
            late = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(exc))
            if late is None:  # on the other ranks: rank 0 failed, and says why
                raise
            raise AutoparError(
                f"timed out after {timeout.total_seconds():g} s waiting for rank(s) {late.group(1)} of "
                f"{dist.get_world_size()} to reach autopar.compile's plan check: they failed, hang, or run other code "
                "(the timeout is `autopar run --timeout` or $AUTOPAR_TIMEOUT)") from None
    mine = plan.hash()
    hashes = [None] * dist.get_world_size()
    dist.all_gather_object(hashes, mine)
    if len(set(hashes)) != 1:
        groups: dict[str, list[int]] = {}
        for r, h in enumerate(hashes):
            groups.setdefault(h, []).append(r)
        parts = "; ".join(f"rank{'s' * (len(rs) > 1)} {', '.join(map(str, rs))} {'have' if len(rs) > 1 else 'has'} "
                          f"plan hash {h[:12]}" for h, rs in sorted(groups.items(), key=lambda g: -len(g[1])))
        raise PlanError(
            f"ranks reached different plans: {parts}. The model, example inputs, options or autopar versions differ "
            "between ranks (or a solver hit its wall-clock safety limit: plan.solver['wall_limit_hit']). Plan once "
            "and pass plan=autopar.Plan.load(...) on every rank")
