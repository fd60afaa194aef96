"""The joint forward+backward graph of a training step, reduced to what the cost model needs.

``trace`` gives the forward graph that autopar plans and lowers. For ``mode="train"`` this pass
traces the explicit joint graph (``torch.export`` then AOT autograd's
``aot_export_joint_with_descriptors``, the route in FACTS.md) and measures, for every source op
of the model (a node of the exported graph before decomposition, e.g. ``linear_3``):

``fwd_flops`` and ``bwd_flops``: the work of its forward nodes and of the backward nodes that
autograd made for it (matched by autograd's sequence number). Annotation then charges a
decomposed node ``1 + bwd_flops / fwd_flops`` times its forward time instead of a fixed guess
(when the op's time is not profiled; see cost_models/profile.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..cost_models.compute import op_flops


@dataclass
class SourceCost:
    fwd_flops: float = 0.0
    bwd_flops: float = 0.0

    @property
    def backward_ratio(self) -> float | None:
        return self.bwd_flops / self.fwd_flops if self.fwd_flops > 0 else None


def source_of(node: fx.Node) -> str | None:
    """The exported-graph op a node descends from (through decompositions), by name."""
    chain = node.meta.get("from_node")
    if not chain:
        return None
    src = chain[-1]
    while getattr(src, "from_node", None):
        src = src.from_node[-1]
    return src.name


class _Loss(torch.nn.Module):
    """Any model as a scalar loss: the sum of the means of its floating-point outputs."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        leaves = [t for t in pytree.tree_leaves(self.module(*args, **kwargs))
                  if isinstance(t, torch.Tensor) and t.dtype.is_floating_point]
        return sum(t.float().mean() for t in leaves)


def _shapes(vals) -> list:
    vals = vals if isinstance(vals, (tuple, list)) else (vals,)
    return [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in vals]


def joint_costs(source_module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, SourceCost]:
    """Per source op: forward and backward FLOPs."""
    from torch._functorch.aot_autograd import aot_export_joint_with_descriptors

    loss = _Loss(source_module)
    ep = torch.export.export(loss, args, kwargs, strict=False)
    with contextlib.ExitStack() as stack:
        joint = aot_export_joint_with_descriptors(stack, ep.module(), args, kwargs)
        graph = joint.graph_module.graph
        seq_source: dict[int, str] = {}
        out: dict[str, SourceCost] = {}
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            tag = node.meta.get("partitioner_tag")
            val = node.meta.get("val")
            ins = [a.meta.get("val") for a in node.all_input_nodes]
            flops = op_flops(str(node.target), _shapes(ins), [s for s in _shapes(val) if s is not None])
            if tag == "is_forward":
                src = source_of(node)
                if src is None:
                    continue
                seq_source.setdefault(node.meta.get("seq_nr"), src)
                cost = out.setdefault(src, SourceCost())
                cost.fwd_flops += flops
            elif tag == "is_backward":
                src = seq_source.get(node.meta.get("seq_nr"))
                if src is not None:
                    out.setdefault(src, SourceCost()).bwd_flops += flops
    return out
