"""From a traced graph and its intra-op plan to the arrays the pipeline-stage solver works on.

Layers are the repeated blocks of the model, found in the graph, not by class name: the module
container whose children ``<container>.<k>`` hold the most distinct integer k (``blocks``,
``model.layers``, ...). Work before the first block (embeddings) joins block 0, work after the
last (final norm, head) joins the last block, work between blocks the block before it; a parameter goes with the first op that reads it.

Per layer i, with the intra-op plan's costs and m microbatches (the planner's costs are for the
whole batch; compute and activation traffic split over microbatches, parameter work does not):

    t[i] = (Σ compute of its ops + Σ its collectives + its optimizer work) / m   (the optimizer
           and gradient sync, paid once per step, spread over the m microbatches)
    c[i] = 2 · send_recv(bytes crossing the cut after layer i / m)          (activation + gradient)
    w[i] = Σ memory of its parameters and buffers
    a[i] = Σ activation memory of its ops / m

``plan_pipeline`` solves the intra-op plan on the other axes, builds these arrays and hands them to
``solvers.inter_op.choose_pipeline``. Not yet executed: the runtime has no pipeline schedule.
"""

from __future__ import annotations

import math
import re

import torch

from ..cost_models.comm import collective_time
from ..errors import AutoparError
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


def layer_totals(tg, plan) -> tuple[list, list, list, list, list]:
    """(names, work, cut, w, act) per layer for the whole batch: seconds of its ops, collectives
    and optimizer work; bytes crossing the cut after it; bytes of its state; activation bytes."""
    container, layer = layer_index(tg)
    n = max(layer.values()) + 1
    work, w, act = [0.0] * n, [0.0] * n, [0.0] * n
    for node in plan.nodes:
        i = layer.get(node["name"])
        if i is None:
            continue
        work[i] += node["compute_s"]
        if node["kind"] == "op":
            act[i] += node["memory_bytes"]
        elif node["kind"] in ("param", "buffer"):
            w[i] += node["memory_bytes"]
    for col in plan.collectives:
        i = layer.get(col["node"])
        if i is not None:
            work[i] += col["time_s"]
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
    return [f"{container}.{k}" for k in range(n)], work, cut, w, act


def per_microbatch(totals, link, m: int) -> tuple[list, list, list, list]:
    """(t, c, w, a) of the module docstring for ``m`` microbatches, from :func:`layer_totals`."""
    _, work, cut, w, act = totals
    return ([x / m for x in work], [2.0 * collective_time("send_recv", b / m, 2, link) for b in cut], list(w),
            [x / m for x in act])


def stage_arrays(tg, plan, link, m: int) -> tuple[list, list, list, list, list]:
    """(names, t, c, w, a) per layer for ``m`` microbatches; ``link`` prices the stage-to-stage sends."""
    totals = layer_totals(tg, plan)
    return (totals[0], *per_microbatch(totals, link, m))


def plan_pipeline(model, mesh, example_inputs, pp: int, *, microbatches=(1, 2, 4, 8), schedules=("1f1b", "gpipe"),
                  memory_limit_bytes: float | None = None, mode: str = "train", example_kwargs: dict | None = None,
                  time_limit_s: float = 20.0, **options):
    """Plan ``model`` for ``pp`` pipeline stages over ``mesh`` (the other axes): (intra-op plan,
    StagePlan, layer names).

    The batch must divide into each candidate microbatch count; the others are skipped.
    """
    from ..api import _trainable, plan_traced
    from ..cost_models.comm import axis_links
    from ..solvers.inter_op import choose_pipeline
    from .trace import trace

    options.setdefault("progress", lambda msg: None)
    tg = trace(model, example_inputs, example_kwargs)
    options["progress"](f"traced {tg.model_name}: {sum(1 for _ in tg.gm.graph.nodes)} ATen nodes")
    inner = plan_traced(tg, mesh, mode, time_limit_s=time_limit_s, memory_limit_bytes=None,
                        trainable=_trainable(model), **options)
    hw = mesh.hardware_spec
    # stages are whole nodes' worth of devices apart when pp is the outermost axis and the inner
    # axes fill a node; otherwise neighbours share a node
    link = hw.inter_node if mesh.size >= hw.devices_per_node else axis_links({"pp": pp}, hw)["pp"]
    batch = next((t.shape[0] for t in example_inputs if isinstance(t, torch.Tensor) and t.dim()), None)
    counts = [m for m in microbatches if batch is not None and batch % m == 0]
    if not counts:
        raise AutoparError(f"batch {batch} divides into none of the microbatch counts {tuple(microbatches)}")
    totals = layer_totals(tg, inner)
    names = totals[0]
    if pp > len(names):
        raise AutoparError(f"pp={pp} stages need at least {pp} layers; the model has {len(names)} ({names[0]} ...)")
    limit = memory_limit_bytes if memory_limit_bytes is not None else hw.memory_capacity_bytes
    return inner, choose_pipeline({m: per_microbatch(totals, link, m) for m in counts}, pp, schedules, limit), names
