"""From a traced graph and its intra-op plan to the arrays the pipeline-stage solver works on.

Layers are the repeated blocks of the model, found in the graph, not by class name: the module
container whose children ``<container>.<k>`` hold the most distinct integer k (``blocks``,
``model.layers``, ...). Work before the first block (embeddings) joins block 0, work after the
last (final norm, head) joins the last block; a parameter goes with the first op that reads it.

Per layer i, with the intra-op plan's costs and m microbatches (the planner's costs are for the
whole batch; compute and activation traffic split over microbatches, parameter work does not):

    t[i] = (Σ compute of its ops + Σ its forward/backward collectives) / m  +  its optimizer work
           and gradient sync spread over the m microbatches (paid once per step)
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
    seen_block = False
    for node in tg.gm.graph.nodes:
        if node.op != "call_function":
            continue
        hit = next((int(m.group(1)) for p in stacks[node.name] for m in [pattern.match(p)] if m), None)
        if hit is not None:
            layer[node.name] = order.index(hit)
            seen_block = True
        else:
            layer[node.name] = 0 if not seen_block else len(order) - 1
    for node in tg.gm.graph.nodes:  # parameters and buffers: with their first reader
        if node.op == "placeholder":
            users = [u for u in node.users if u.name in layer]
            if users:
                layer[node.name] = min(layer[u.name] for u in users)
    return container, layer


def stage_arrays(tg, plan, link, m: int) -> tuple[list, list, list, list, list]:
    """(names, t, c, w, a) per layer for ``m`` microbatches; ``link`` prices the stage-to-stage sends."""
    container, layer = layer_index(tg)
    n = max(layer.values()) + 1
    per_mb, per_step, w, a = [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n
    for node in plan.nodes:
        i = layer.get(node["name"])
        if i is None:
            continue
        if node["kind"] == "op":
            per_mb[i] += node["compute_s"]
            a[i] += node["memory_bytes"] / m
        elif node["kind"] in ("param", "buffer"):
            per_step[i] += node["compute_s"]
            w[i] += node["memory_bytes"]
    for col in plan.collectives:
        i = layer.get(col["node"])
        if i is not None:
            (per_step if col["phase"] == "grad_sync" else per_mb)[i] += col["time_s"]
    t = [per_mb[i] / m + per_step[i] / m for i in range(n)]
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
        nbytes = math.prod(shape) * val.element_size() / m
        for k in range(src, last):  # the tensor is sent across every cut between producer and last reader
            cut[k] += nbytes
    c = [2.0 * collective_time("send_recv", b, 2, link) for b in cut]
    return [f"{container}.{k}" for k in range(n)], t, c, w, a


def plan_pipeline(model, mesh, example_inputs, pp: int, *, microbatches=(1, 2, 4, 8), schedules=("1f1b", "gpipe"),
                  memory_limit_bytes: float | None = None, **options):
    """Plan ``model`` for ``pp`` pipeline stages over ``mesh`` (the other axes): (intra-op plan,
    StagePlan, layer names).

    The batch must divide into each candidate microbatch count; the others are skipped.
    """
    from ..api import plan as intra_plan
    from ..cost_models.comm import axis_links
    from ..solvers.inter_op import choose_pipeline
    from .trace import trace

    inner = intra_plan(model, mesh, example_inputs, **options)
    tg = trace(model, example_inputs)
    hw = mesh.hardware_spec
    # stages are whole nodes' worth of devices apart when pp is the outermost axis and the inner
    # axes fill a node; otherwise neighbours share a node
    link = hw.inter_node if mesh.size >= hw.devices_per_node else axis_links({"pp": pp}, hw)["pp"]
    batch = next(t.shape[0] for t in example_inputs if isinstance(t, torch.Tensor))
    arrays = {m: stage_arrays(tg, inner, link, m) for m in microbatches if batch % m == 0}
    if not arrays:
        raise AutoparError(f"batch {batch} divides into none of the microbatch counts {tuple(microbatches)}")
    names = arrays[min(arrays)][0]
    if pp > len(names):
        raise AutoparError(f"pp={pp} stages need at least {pp} layers; the model has {len(names)} ({names[0]} ...)")
    limit = memory_limit_bytes if memory_limit_bytes is not None else hw.memory_capacity_bytes
    return inner, choose_pipeline({m: a[1:] for m, a in arrays.items()}, pp, schedules, limit), names
