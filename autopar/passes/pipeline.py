"""From a traced graph and its intra-op plan to the arrays the pipeline-stage solver works on.

Layers are the repeated blocks of the model, found in the graph, not by class name: the module
container whose children ``<container>.<k>`` hold the most distinct integer k (``blocks``,
``model.layers``, ...). Work before the first block (embeddings) joins block 0, work after the
last (final norm, head) joins the last block, work between blocks the block before it; a parameter goes with the first op that reads it.

Per layer i, with the intra-op plan's costs and m microbatches (the planner's costs are for the
whole batch; compute and activation traffic split over microbatches, parameter work does not):

    t[i]  = (Σ compute of its ops + Σ its collectives + its optimizer work) / m   (the optimizer
            and gradient sync, paid once per step, spread over the m microbatches)
    tf[i] = (Σ compute of its ops / 3 + Σ its forward collectives) / m    (its forward part)
    tw[i] = Σ compute of its ops / 3 / m                     (its weight-gradient part, for zb-h1)
    c[i]  = 2 · send_recv(bytes crossing the cut after layer i / m)         (activation + gradient)
    w[i]  = Σ memory of its parameters and buffers
    a[i]  = Σ activation memory of its ops / m

The plan keeps one training cost per op (forward × (1 + backward/forward), with the ratio from the
joint graph), not its parts, so forward, input gradient and weight gradient are taken as a third
each; the plan's collectives do carry their phase. In inference t = tf and tw = 0.

``plan_pipeline`` solves the intra-op plan on the other axes, builds these arrays and hands them to
``solvers.inter_op.choose_pipeline``, which also owns the memory limit (see ``plan_pipeline``).
"""

from __future__ import annotations

import math
import re

import torch

from ..cost_models.comm import collective_time
from ..errors import AutoparError, InfeasibleError
from ..placements import local_shape, parse


def layer_index(tg) -> tuple[str, dict[str, int]]:
    """(container, {fx node name: layer}) for every node of ``tg.gm`` that does work or holds state."""
    counts: dict[str, set[int]] = {}
    stacks = {}
    for node in tg.gm.graph.nodes:
        paths = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
        stacks[node.name] = paths
        for p in paths:
            m = re.match(r"^(.*?)\.(\d+)(?:\.|$)", p)
            if m:
                counts.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not counts:
        raise AutoparError("pipeline stages need repeated blocks (a module list such as blocks.0, blocks.1, ...), "
                           "and the model has none; plan it without a 'pp' axis")
    container = max(counts, key=lambda k: (len(counts[k]), -len(k)))
    order = sorted(counts[container])
    pattern = re.compile(rf"^{re.escape(container)}\.(\d+)(?:\.|$)")
    layer: dict[str, int] = {}
    last = 0  # work between blocks goes with the block before it, work after the last with the last
    for node in tg.gm.graph.nodes:
        if node.op != "call_function":
            continue
        hit = next((int(m.group(1)) for p in stacks[node.name] for m in [pattern.match(p)] if m), None)
        if hit is not None:
            last = max(last, order.index(hit))
        layer[node.name] = last if hit is None else order.index(hit)
    for node in tg.gm.graph.nodes:  # parameters and buffers: with their first reader
        if node.op == "placeholder":
            users = [u for u in node.users if u.name in layer]
            if users:
                layer[node.name] = min(layer[u.name] for u in users)
    return container, layer


def layer_totals(tg, plan) -> tuple[list, list, list, list, list, list, list]:
    """(names, work, cut, w, act, fwd, wgrad) per layer for the whole batch: seconds of its ops,
    collectives and optimizer work; bytes crossing the cut after it; bytes of its state; activation
    bytes; seconds of its forward; seconds of its weight gradient (module docstring)."""
    container, layer = layer_index(tg)
    n = max(layer.values()) + 1
    work, w, act, fwd, wgrad = [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n
    train = plan.mode == "train"
    for node in plan.nodes:
        i = layer.get(node["name"])
        if i is None:
            continue
        work[i] += node["compute_s"]
        if node["kind"] == "op":
            act[i] += node["memory_bytes"]
            fwd[i] += node["compute_s"] / 3 if train else node["compute_s"]
            wgrad[i] += node["compute_s"] / 3 if train else 0.0
        elif node["kind"] in ("param", "buffer"):
            w[i] += node["memory_bytes"]
    for col in plan.collectives:
        i = layer.get(col["node"])
        if i is not None:
            work[i] += col["time_s"]
            if col.get("phase") == "fwd" or not train:
                fwd[i] += col["time_s"]
    placement = {nd["name"]: nd.get("placements") for nd in plan.nodes}
    axes = list(plan.mesh)
    sizes = tuple(plan.mesh.values())
    cut = [0.0] * max(n - 1, 0)
    for node in tg.gm.graph.nodes:
        src = layer.get(node.name)
        val = node.meta.get("val")
        if src is None or not isinstance(val, torch.Tensor):
            continue
        last = max((layer.get(u.name, src) for u in node.users), default=src)
        pl = placement.get(node.name)
        shape = tuple(val.shape)
        if isinstance(pl, dict):
            shape = local_shape(shape, tuple(parse(pl[ax]) for ax in axes), sizes)
        for k in range(src, last):  # the tensor is sent across every cut between producer and last reader
            cut[k] += math.prod(shape) * val.element_size()
    return [f"{container}.{k}" for k in range(n)], work, cut, w, act, fwd, wgrad


def per_microbatch(totals, link, m: int) -> tuple[list, list, list, list, list, list]:
    """(t, c, w, a, tf, tw) of the module docstring for ``m`` microbatches, from :func:`layer_totals`."""
    _, work, cut, w, act, fwd, wgrad = totals
    return ([x / m for x in work], [2.0 * collective_time("send_recv", b / m, 2, link) for b in cut], list(w),
            [x / m for x in act], [x / m for x in fwd], [x / m for x in wgrad])


def stage_arrays(tg, plan, link, m: int) -> tuple[list, ...]:
    """(names, t, c, w, a, tf, tw) per layer for ``m`` microbatches; ``link`` prices the stage-to-stage sends."""
    totals = layer_totals(tg, plan)
    return (totals[0], *per_microbatch(totals, link, m))


def local_batch(plan, example_inputs) -> int | None:
    """dim 0 of the first batched input per data-parallel rank: the global batch over the ``dp``
    axis and any other axis the plan shards that input's dim 0 on. The runtime cuts the global
    batch into m microbatches and each over dp, so m must divide this (an input the plan keeps
    replicated, such as token ids that the embedding's output then shards, is still split over dp)."""
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    k = next((n for n, t in enumerate(tensors) if t.dim()), None)
    if k is None:
        return None
    pl = plan.input_placements[k] if k < len(plan.input_placements) else None
    pl = pl if isinstance(pl, dict) else {}
    split = math.prod(size for ax, size in plan.mesh.items()
                      if ax == "dp" or (ax in pl and parse(pl[ax]) == parse("S(0)")))
    return tensors[k].shape[0] // split


FIXABLE = ("schedule", "microbatches", "virtual_stages", "bounds")


def plan_pipeline(model, mesh, example_inputs, pp: int, *, microbatches=None, schedules=None,
                  memory_limit_bytes: float | None = None, mode: str = "train", example_kwargs: dict | None = None,
                  time_limit_s: float = 20.0, stages: dict | None = None, traced=None, **options):
    """Plan ``model`` for ``pp`` pipeline stages over ``mesh`` (the other axes): (intra-op plan,
    StagePlan, layer names).

    Memory: each device holds one stage, about 1/pp of the model, so the whole-model intra-op solve
    is not held to the device memory M (that demanded the whole model fit one device). It is solved
    without a memory limit, for the fastest layout of every layer, and ``choose_pipeline`` alone
    keeps each rank's state and in-flight activations within M, raising InfeasibleError (with the
    least peak memory any split reaches, and what to change) when no split fits. A per-stage share
    as the intra-op limit was tried and dropped: the intra-op solve counts the whole batch's
    activations, of which a stage holds only f/m in flight, so a share of p·M rejects layouts that
    fit, and p·M + (1 − p/m)·A (W + (p/m)·A ≤ p·M, rewritten for its W + A) credits a cut in
    activations m/p times over; on GPT-3 175B (pp 1, 2, 4 on 1024 H100s) that second solve cost up
    to three minutes of CP-SAT and fit nothing the first did not. The cost: a layout that fits only
    with sharded optimizer state is not found without ``pins``.

    ``microbatches``: the counts to try (default: every divisor of :func:`local_batch`, the batch
    per data-parallel rank); those that do not divide it are skipped. ``schedules``: those to try
    (default all of ``solvers.inter_op.SCHEDULES``). ``stages`` fixes any of ``schedule``,
    ``microbatches``, ``virtual_stages`` and ``bounds`` (p·v [start, end) ranges, or ``"equal"``
    for equal layer counts; with ``bounds``, ``schedule`` and ``microbatches`` are needed too): the
    solver chooses the rest, or only prices the given split (``"equal"`` without
    ``virtual_stages`` tries each v of ``VIRTUAL_STAGES`` that splits the layers equally).
    ``traced``: ``passes.trace.trace(model, example_inputs, example_kwargs)`` if the caller has it
    already (planning one model on several meshes traces it once).
    """
    import time

    from ..api import _trainable, explain_infeasible, plan_traced
    from ..cost_models.comm import axis_links
    from ..solvers.inter_op import SCHEDULES, VIRTUAL_STAGES, choose_pipeline
    from .replicate import trace_deep

    if stages is not None and not isinstance(stages, dict):
        raise AutoparError(f"pipeline= takes a dict such as {{'schedule': '1f1b', 'microbatches': 8}}, got {stages!r}")
    fixed = dict(stages or {})
    bad = sorted(set(fixed) - set(FIXABLE))
    if bad:
        raise AutoparError(f"pipeline= fixes only {FIXABLE}; got {bad}")
    if "schedule" in fixed and fixed["schedule"] not in SCHEDULES:
        raise AutoparError(f"pipeline schedule {fixed['schedule']!r} is unknown; choose one of {SCHEDULES}")
    for key in ("microbatches", "virtual_stages"):
        if key in fixed and (not isinstance(fixed[key], int) or isinstance(fixed[key], bool) or fixed[key] < 1):
            raise AutoparError(f"pipeline {key} must be a positive int, got {fixed[key]!r}")
    if "bounds" in fixed and not {"schedule", "microbatches"} <= set(fixed):
        raise AutoparError("pipeline= with 'bounds' also needs 'schedule' and 'microbatches': the split is priced, "
                           "not searched")
    schedules = (fixed["schedule"],) if "schedule" in fixed else tuple(schedules or SCHEDULES)
    virtual = (int(fixed["virtual_stages"]),) if "virtual_stages" in fixed else VIRTUAL_STAGES
    if "microbatches" in fixed:
        microbatches = (int(fixed["microbatches"]),)
    say = options.setdefault("progress", lambda msg: None)
    t0 = time.perf_counter()
    tg = traced if traced is not None else trace_deep(model, example_inputs, example_kwargs, say)
    if traced is None:
        say(f"traced {tg.model_name}: {sum(1 for _ in tg.gm.graph.nodes)} ATen nodes in {time.perf_counter() - t0:.1f} s")
    hw = mesh.hardware_spec
    limit = memory_limit_bytes if memory_limit_bytes is not None else hw.memory_capacity_bytes
    # stages are whole nodes' worth of devices apart when pp is the outermost axis and the inner
    # axes fill a node; otherwise neighbours share a node
    link = hw.inter_node if mesh.size >= hw.devices_per_node else axis_links({"pp": pp}, hw)["pp"]

    container, layer = layer_index(tg)  # before the intra-op solve: a model without enough blocks fails fast
    n_layers = max(layer.values()) + 1
    if pp > n_layers:
        raise AutoparError(f"pp={pp} stages need at least {pp} layers; the model has {n_layers} ({container}.0 ...)")
    why = explain_infeasible(tg, {"pp": pp, **mesh.axes}, hw, limit, mode=mode, trainable=_trainable(model),
                             optimizer=options.get("optimizer", "adamw"))
    if why:  # the model state alone overflows every split: said before the intra-op solve
        raise InfeasibleError(why)
    inner = plan_traced(tg, mesh, mode, time_limit_s=time_limit_s, memory_limit_bytes=float("inf"),
                        trainable=_trainable(model), **options)
    batch = local_batch(inner, example_inputs)
    counts = [m for m in (microbatches or range(1, (batch or 0) + 1)) if batch and batch % m == 0]
    if not counts:
        wanted = f"the microbatch counts {tuple(microbatches)}" if microbatches else "any microbatch count"
        raise AutoparError(f"the batch per data-parallel rank is {batch} (the example batch over dp and any axis that "
                           f"shards it), which divides into none of {wanted}; use a batch that is a multiple of dp")
    totals = layer_totals(tg, inner)
    names = totals[0]
    t1 = time.perf_counter()
    if "bounds" in fixed:
        result = _price_fixed(fixed, totals, link, pp, counts[0], schedules[0], limit)
    else:
        try:
            result = choose_pipeline({m: per_microbatch(totals, link, m) for m in counts}, pp, schedules, limit, virtual)
        except ValueError as e:  # the solver's arrays-level check, said as the user gave it
            raise AutoparError(f"pipeline={fixed!r}: {e}") from None
    say(f"stages solved in {time.perf_counter() - t1:.1f} s over microbatch counts {counts}")
    return inner, result, names


def _price_fixed(fixed: dict, totals, link, pp: int, m: int, schedule: str, limit: float):
    """The StagePlan of the split ``fixed["bounds"]`` ("equal": equal layer counts, the best v that
    gives them unless ``fixed["virtual_stages"]`` says)."""
    from ..solvers.inter_op import VIRTUAL_STAGES, evaluate_stages

    t, c, w, a, tf, tw = per_microbatch(totals, link, m)
    L, bounds = len(totals[0]), fixed["bounds"]
    if bounds != "equal":
        if not isinstance(bounds, list) or not bounds or len(bounds) % pp:
            raise AutoparError(f"pipeline bounds must be 'equal' or a list of [start, end) layer ranges, pp={pp} or a "
                               f"multiple of it (v stages per rank); got {bounds!r}")
        vs = [len(bounds) // pp]
    elif "virtual_stages" in fixed or schedule != "interleaved-1f1b":
        vs = [int(fixed.get("virtual_stages", 1))]
    else:
        vs = [v for v in VIRTUAL_STAGES if L % (pp * v) == 0]
    if not vs or (bounds == "equal" and any(L % (pp * v) for v in vs)):
        raise AutoparError(f"{L} layers do not split equally into {pp} x {vs or list(VIRTUAL_STAGES)} stages")
    priced, why = [], []
    for v in vs:
        split = [(k * L // (pp * v), (k + 1) * L // (pp * v)) for k in range(pp * v)] if bounds == "equal" else bounds
        try:
            priced.append(evaluate_stages(t, c, w, a, pp, m, schedule, split, limit, tf=tf, tw=tw, virtual_stages=v))
        except InfeasibleError as e:
            why.append(e)
        except ValueError as e:  # the solver's arrays-level check, said as the user gave it
            raise AutoparError(f"pipeline={fixed!r}: {e}") from None
    if not priced:
        raise why[0]
    return min(priced, key=lambda plan: plan.step_time)
