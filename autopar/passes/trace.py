"""Trace a model to an ATen graph with shapes and dtypes as FakeTensor meta.

``trace`` runs ``torch.export`` and then decomposes to core ATen, keeping
``scaled_dot_product_attention`` whole (autopar has its own attention rule, and the math
decomposition would replace one shardable op with a dozen masks and matmuls).

The forward graph is what autopar plans and lowers for both modes: in ``mode="train"`` the
backward pass is the autograd transpose of each forward op, and its costs (compute, the
transposed collectives, gradient synchronisation) are charged to the forward op that causes
them (see ``passes/annotate.py``). ``trace_joint`` builds the explicit joint forward+backward
graph for inspection and for counting backward work.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import sys
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import TraceError

META = "autopar."  # namespace of the keys autopar puts in node.meta


@dataclass
class TracedGraph:
    """The forward ATen graph and how its placeholders map to the model."""

    gm: fx.GraphModule
    in_spec: pytree.TreeSpec  # of (args, kwargs)
    out_spec: pytree.TreeSpec
    params: dict[str, str]  # placeholder name -> parameter FQN
    buffers: dict[str, str]  # placeholder name -> buffer FQN
    constants: dict[str, torch.Tensor]  # placeholder name -> lifted constant tensor
    user_inputs: list[str]  # placeholder names, in flattened input order
    graph_hash: str
    model_name: str
    warnings: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # tied-parameter placeholder -> the one the graph uses
    source: object = None  # the ExportedProgram before decomposition (for the joint graph)
    example: tuple = ((), {})  # (args, kwargs) the model was traced with
    # the graph's leading outputs that are new values of buffers (BatchNorm running stats), by FQN
    mutated_buffers: list[str] = field(default_factory=list)
    joint: dict | None = None  # per-op backward costs from the joint graph (passes/joint.py), once computed
    moe: list = field(default_factory=list)  # the fused mixture-of-experts layers (passes/moe.py)

    def feed(self, params: dict, buffers: dict, user) -> list:
        """The graph's placeholder values: parameters and buffers by FQN, lifted constants, and
        the user's flattened inputs (an iterator) in order."""
        out = []
        for n in self.gm.graph.nodes:
            if n.op != "placeholder":
                continue
            if n.name in self.params:
                out.append(params[self.params[n.name]])
            elif n.name in self.buffers:
                out.append(buffers[self.buffers[n.name]])
            elif n.name in self.constants:
                out.append(self.constants[n.name])
            else:
                out.append(next(user))
        return out


_HINTS = [
    (r"data.dependent|GuardOnDataDependent|could not guard on data-dependent",
     "the model branches on a tensor's value; use torch.where or torch.cond instead of Python `if` on tensors"),
    (r"\.item\(\)|_local_scalar_dense",
     "the model calls .item() or converts a tensor to a Python number; keep the value as a tensor"),
    (r"Unsupported|unsupported",
     "the model uses a Python construct torch.export cannot capture; move it out of forward() or rewrite it with torch ops"),
    (r"mutat|in-place|inplace",
     "the model mutates an input or global state inside forward(); make forward() functional"),
]


def _explain_export_failure(model: torch.nn.Module, exc: BaseException) -> TraceError:
    text = f"{type(exc).__name__}: {exc}"
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    user_frames = [ln.strip() for ln in text.splitlines()
                   if ln.strip().startswith("File \"") and "/torch/" not in ln and "/transformers/" not in ln]
    where = f" at {user_frames[-1]}" if user_frames else ""
    hint = next((h for pat, h in _HINTS if re.search(pat, text)), "simplify forward() until torch.export.export(model, example_inputs) succeeds")
    return TraceError(
        f"torch.export could not trace {type(model).__name__}{where}: {first[:500]}\n"
        f"hint: {hint}"
    )


def _addmm_as_mm_plus_bias(bias, mat1, mat2, beta=1, alpha=1):
    """addmm = bias + mat1 @ mat2, split in two ops so that a row-parallel matmul (partial
    output) can be reduced before the bias is added once, as Megatron does."""
    out = torch.ops.aten.mm.default(mat1, mat2)
    if alpha != 1:
        out = torch.ops.aten.mul.Tensor(out, alpha)
    if beta != 1:
        bias = torch.ops.aten.mul.Tensor(bias, beta)
    return torch.ops.aten.add.Tensor(out, bias)


def _decomposition_table():
    return dict(_decompositions())


@functools.lru_cache(maxsize=1)
def _decompositions():
    from torch._decomp import core_aten_decompositions

    table = core_aten_decompositions()
    for op in list(table):
        if "scaled_dot_product" in str(op):
            del table[op]
    table[torch.ops.aten.addmm.default] = _addmm_as_mm_plus_bias
    return table


@contextlib.contextmanager
def _causal_masks_as_flags(kwargs: dict):
    """Let HuggingFace models pass ``is_causal=True`` to sdpa while exported, as they do eagerly.

    While exporting, transformers builds an explicit [B, 1, S, S] causal mask, for two reasons
    that do not hold for autopar's graph, which is specialised to the example inputs: the graph
    might later be fed a padding mask, and position ids (a traced tensor) might describe packed
    sequences. When the caller passes neither ``attention_mask`` nor ``position_ids``, transformers
    makes the positions itself as one ``arange`` per row, so nothing is packed or padded. An
    explicit mask would cost S² memory per sequence and hide the causal structure that ring
    attention skips and balances. With either input given, the mask is built as transformers wants.
    """
    mu = sys.modules.get("transformers.masking_utils")
    names = ("is_torchdynamo_exporting", "find_packed_sequence_indices")
    if mu is None or not all(hasattr(mu, n) for n in names) or {"attention_mask", "position_ids"} & set(kwargs):
        yield
        return
    saved = {n: getattr(mu, n) for n in names}
    mu.is_torchdynamo_exporting = lambda: False
    mu.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(mu, n, f)


def _check_inputs(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TraceError(
            f"example_inputs must be a tuple of the model's positional inputs, got {type(example_inputs).__name__}; "
            "wrap a single tensor as (x,)"
        )
    return tuple(example_inputs)


def trace(model: torch.nn.Module, example_inputs, example_kwargs: dict | None = None) -> TracedGraph:
    """Export ``model`` on ``example_inputs`` and decompose it to core ATen (sdpa kept whole)."""
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"autopar needs an nn.Module, got {type(model).__name__}")
    args = _check_inputs(example_inputs)
    kwargs = dict(example_kwargs or {})
    try:
        source, ep = export(model, args, kwargs)
    except Exception as exc:  # torch raises many unrelated types here
        raise _explain_export_failure(model, exc) from exc
    return traced_graph(model, source, ep, args, kwargs)


def export(model: torch.nn.Module, args: tuple, kwargs: dict):
    """(the exported program, the same decomposed to core ATen); torch's exceptions pass through."""
    with _causal_masks_as_flags(kwargs):
        source = torch.export.export(model, args, kwargs, strict=False)
    return source, source.run_decompositions(_decomposition_table())


def traced_graph(model, source, ep, args: tuple, kwargs: dict, gm: fx.GraphModule | None = None,
                 params: dict | None = None, buffers: dict | None = None) -> TracedGraph:
    """The TracedGraph of a decomposed export ``ep`` (or of ``gm`` built from it, with its own
    placeholder maps: passes/replicate.py)."""
    sig = ep.graph_signature
    params = dict(sig.inputs_to_parameters) if params is None else params
    buffers = dict(sig.inputs_to_buffers) if buffers is None else buffers
    constants = {name: ep.constants[key] for name, key in sig.inputs_to_lifted_tensor_constants.items()}
    user_inputs = list(sig.user_inputs)
    gm = ep.graph_module if gm is None else gm
    aliases = _tie_aliases(model, gm, params)
    _merge_duplicate_views(gm)
    warnings = []
    from .moe import fuse_moe

    moe = fuse_moe(gm, params, warnings)
    non_tensor_inputs = [n.name for n in gm.graph.nodes
                         if n.op == "placeholder" and n.name in user_inputs and not isinstance(n.meta.get("val"), torch.Tensor)]
    if any(spec.kind.name not in ("BUFFER_MUTATION", "USER_OUTPUT") for spec in sig.output_specs):
        kinds = sorted({spec.kind.name for spec in sig.output_specs})
        raise TraceError(f"the model mutates its inputs or parameters in forward() ({kinds}); make forward() functional")
    if non_tensor_inputs:
        raise TraceError(f"inputs {non_tensor_inputs} are not tensors; pass Python values as constants, not inputs")
    return TracedGraph(
        gm=gm,
        in_spec=ep.call_spec.in_spec,
        out_spec=ep.call_spec.out_spec,
        params=params,
        buffers=buffers,
        constants=constants,
        user_inputs=user_inputs,
        aliases=aliases,
        source=source,
        example=(args, kwargs),
        mutated_buffers=[spec.target for spec in sig.output_specs if spec.kind.name == "BUFFER_MUTATION"],
        graph_hash=graph_hash(gm, params, buffers),
        model_name=type(model).__name__,
        warnings=warnings,
        moe=moe,
    )


def _tie_aliases(model, gm: fx.GraphModule, params: dict[str, str]) -> dict[str, str]:
    """Make every use of a tied parameter (one tensor under several FQNs, like GPT-2's wte and
    lm_head) go through one placeholder, so that it gets one placement. Returns alias -> canonical."""
    by_id: dict[int, list[str]] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(fqn)
    placeholder_of = {fqn: name for name, fqn in params.items()}
    aliases = {}
    for fqns in by_id.values():
        names = [placeholder_of[f] for f in fqns if f in placeholder_of]
        if len(names) < 2:
            continue
        nodes = {n.name: n for n in gm.graph.nodes if n.op == "placeholder" and n.name in names}
        canonical = next((n for n in names if nodes[n].users), names[0])
        for other in names:
            if other != canonical:
                nodes[other].replace_all_uses_with(nodes[canonical])
                aliases[other] = canonical
    if aliases:
        gm.recompile()
    return aliases


_PURE_VIEWS = {"aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.permute.default",
               "aten.transpose.int", "aten.t.default", "aten.expand.default", "aten.unsqueeze.default",
               "aten.squeeze.dim", "aten.alias.default"}


def _merge_duplicate_views(gm: fx.GraphModule) -> None:
    """Common-subexpression elimination for view ops: ``x.view(s)`` taken once per consumer (the
    input of q, k and v projections) becomes one node, so the gradients its consumers send back
    meet in one place, as they do in autograd."""
    seen: dict[tuple, fx.Node] = {}
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or str(node.target) not in _PURE_VIEWS:
            continue
        key = (node.target, repr(node.args), repr(sorted(node.kwargs.items())))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            gm.graph.erase_node(node)
            changed = True
        else:
            seen[key] = node
    if changed:
        gm.recompile()


def tensor_meta(node: fx.Node):
    """The FakeTensor(s) a node produces: a Tensor, a tuple of Tensors/None, or None."""
    return node.meta.get("val")


def graph_hash(gm: fx.GraphModule, params: dict[str, str], buffers: dict[str, str]) -> str:
    """A hash of the graph's structure: ops, shapes, dtypes, wiring and parameter names.

    It is independent of process, memory addresses and parameter values, so every rank (and
    every later run on the same model and input shapes) computes the same hash.
    """
    h = hashlib.sha256()
    index = {}
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i

        def enc(a):
            if isinstance(a, fx.Node):
                return f"%{index[a]}"
            if isinstance(a, (list, tuple)):
                return "[" + ",".join(enc(x) for x in a) + "]"
            if isinstance(a, dict):
                return "{" + ",".join(f"{k}:{enc(v)}" for k, v in sorted(a.items())) + "}"
            if isinstance(a, torch.device):  # a plan made on one device (meta, a CPU) applies on another
                return "device"
            if isinstance(a, torch.dtype | torch.memory_format | torch.layout):
                return str(a)
            return repr(a)

        val = tensor_meta(node)
        vals = val if isinstance(val, (tuple, list)) else (val,)
        shapes = ";".join(f"{tuple(v.shape)}:{v.dtype}" if isinstance(v, torch.Tensor) else "-" for v in vals)
        name = params.get(node.name) or buffers.get(node.name) or ""
        if node.op == "placeholder" and not node.users:
            name += "(unused)"
        h.update(f"{node.op}|{node.target if node.op != 'placeholder' else name}|{enc(node.args)}|{enc(node.kwargs)}|{shapes}\n".encode())
    return h.hexdigest()[:16]
