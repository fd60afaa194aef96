"""Trace a deep model from two shallow cuts of it, for planning.

Exporting and decomposing Llama-3-8B's 32 blocks costs ~10 s here, nearly all of it re-deriving
one block 32 times, and the joint graph as much again. When the model's blocks are identical
modules, ``trace_deep`` exports the model cut to its first 2 and first 3 blocks and builds the
graph of all L blocks from the 2-block one, by copying its last block (``t``) L-2 times:

- copy j of a node of block t is named as torch would name it: every op name's counter (``mm_7``)
  advances by a fixed step per block, read off blocks t-1 and t; nodes after the blocks shift by
  (L-2) steps;
- block t's parameters and buffers get copies ``<container>.j.*`` (placeholders in module order);
- an input from block t is taken from copy j, one from block t-1 from copy j-1, one from before the
  blocks (rotary tables, masks) as it is; nodes after the blocks read the last copy;
- module stacks are rewritten to ``<container>.j``; the rest of the meta (shapes, the source op
  the joint graph's costs are keyed by) is the template's.

It is checked before it is used: the 2-block graph extended to 3 blocks must equal the 3-block
export node for node (names, ops, arguments, shapes and dtypes, module paths, parameter and buffer
names). Otherwise, or when the blocks are not identical modules (their classes, ``repr``,
parameter shapes and plain attributes, except an attribute counting the block's index), or a
config lists per-layer types that differ, the model is exported whole. ``AUTOPAR_FULL_TRACE=1``
always exports it whole. tests/test_replicate.py checks the extension against whole exports.
"""

from __future__ import annotations

import contextlib
import os
import re
import time

import torch
import torch.fx as fx

MIN_BLOCKS = 6  # below this a whole export is cheap enough


def trace_deep(model: torch.nn.Module, example_inputs, example_kwargs: dict | None = None, progress=None):
    """``passes.trace.trace`` of ``model``, from two shallow exports when its blocks allow it."""
    from .trace import _check_inputs, trace

    say = progress or (lambda msg: None)
    found = None if os.environ.get("AUTOPAR_FULL_TRACE") == "1" else uniform_blocks(model)
    if found is None:
        return trace(model, example_inputs, example_kwargs)
    container, blocks = found
    args, kwargs = _check_inputs(example_inputs), dict(example_kwargs or {})
    t0 = time.perf_counter()
    try:
        tg = _extended(model, container, len(blocks), args, kwargs)
    except Exception as exc:  # torch raises many types; the whole export says what is wrong, if anything
        tg, why = None, f"{type(exc).__name__}: {str(exc)[:120]}"
    else:
        why = "" if tg is not None else "the 2-block graph extended to 3 blocks differs from the 3-block export"
    if tg is None:
        say(f"exporting all {len(blocks)} blocks of {container} ({why})")
        return trace(model, example_inputs, example_kwargs)
    say(f"traced {len(blocks)} blocks of {container} from 2- and 3-block exports in {time.perf_counter() - t0:.1f} s")
    return tg


def _extended(model, container: str, n_blocks: int, args, kwargs):
    from .trace import export, traced_graph

    cuts = {}
    for k in (2, 3):
        with _cut(model, container, k):
            source, ep = export(model, args, kwargs)
        cuts[k] = (source, ep)
    (source, ep2), (_, ep3) = cuts[2], cuts[3]
    maps2 = dict(ep2.graph_signature.inputs_to_parameters), dict(ep2.graph_signature.inputs_to_buffers)
    check = extend(ep2.graph_module, *maps2, container, 3)
    maps3 = dict(ep3.graph_signature.inputs_to_parameters), dict(ep3.graph_signature.inputs_to_buffers)
    if check is None or _describe(*check) != _describe(ep3.graph_module.graph, *maps3):
        return None
    full = extend(ep2.graph_module, *maps2, container, n_blocks)
    if full is None:
        return None
    graph, params, buffers = full
    return traced_graph(model, source, ep2, args, kwargs, gm=fx.GraphModule(ep2.graph_module, graph), params=params,
                        buffers=buffers)


def uniform_blocks(model: torch.nn.Module) -> tuple[str, list] | None:
    """(FQN, blocks) of the model's longest ModuleList/Sequential of at least MIN_BLOCKS identical
    blocks, or None."""
    best = None
    for name, mod in model.named_modules():
        if name and isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)) and len(mod) >= MIN_BLOCKS:
            if best is None or len(mod) > len(best[1]):
                best = (name, list(mod))
    if best is None:
        return None
    blocks = best[1]
    sigs = [_signature(b) for b in blocks]
    if any(s[0] != sigs[0][0] for s in sigs):
        return None
    attrs = [s[1] for s in sigs]
    for key in set().union(*attrs):
        values = [a.get(key) for a in attrs]
        counts_index = all(isinstance(v, int) and v - values[0] == i for i, v in enumerate(values))
        if len(set(map(repr, values))) > 1 and not counts_index:
            return None
    params = [id(p) for b in blocks for p in b.parameters()]
    if len(params) != len(set(params)):  # blocks sharing weights
        return None
    layer_types = getattr(getattr(model, "config", None), "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(set(map(str, layer_types))) > 1:
        return None
    return best


def _signature(block: torch.nn.Module) -> tuple:
    """(the block's structure, its plain attributes by module path)."""
    tensors = tuple((n, tuple(t.shape), str(t.dtype), t.requires_grad)
                    for n, t in [*block.named_parameters(), *block.named_buffers()])
    attrs = {}
    for path, m in block.named_modules():
        for k, v in vars(m).items():
            if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str, tuple))):
                attrs[f"{path}.{k}"] = v
    return (type(block).__qualname__, repr(block), tensors), attrs


@contextlib.contextmanager
def _cut(model: torch.nn.Module, container: str, k: int):
    """The model with only the first ``k`` blocks of ``container``."""
    parent_name, _, attr = container.rpartition(".")
    parent = model.get_submodule(parent_name)
    full = getattr(parent, attr)
    short = torch.nn.Sequential(*list(full)[:k]) if isinstance(full, torch.nn.Sequential) \
        else torch.nn.ModuleList(list(full)[:k])
    setattr(parent, attr, short)
    try:
        yield
    finally:
        setattr(parent, attr, full)


_NAME = re.compile(r"^(.*?)_(\d+)$")


def _split(name: str) -> tuple[str, int]:
    m = _NAME.match(name)
    return (m.group(1), int(m.group(2))) if m else (name, 0)


def _name(base: str, count: int) -> str:
    return f"{base}_{count}" if count else base


def extend(gm: fx.GraphModule, params: dict, buffers: dict, container: str, n: int):
    """(graph, params, buffers) of ``gm``'s model with ``n`` blocks in ``container``
    (module docstring), or None when the graph is not laid out as a chain of blocks."""
    block_re = re.compile(rf"^{re.escape(container)}\.(\d+)(?:\.|$)")
    owner = {**params, **buffers}

    def block_of(node) -> int | None:
        if node.op == "placeholder":
            m = block_re.match(owner.get(node.name, ""))
            return int(m.group(1)) if m else None
        hits = {int(m.group(1)) for p, _ in (node.meta.get("nn_module_stack") or {}).values()
                for m in [block_re.match(p)] if m}
        return hits.pop() if len(hits) == 1 else (None if not hits else -1)

    nodes = list(gm.graph.nodes)
    where = {node: block_of(node) for node in nodes}
    if -1 in where.values():
        return None
    k = 1 + max((b for b in where.values() if b is not None), default=-1)
    t = k - 1
    if k < 2 or n < k:
        return None
    body = [x for x in nodes if x.op == "call_function"]
    seq = [where[x] for x in body]
    first = seq.index(0) if 0 in seq else None
    last = max(i for i, b in enumerate(seq) if b is not None) if first is not None else None
    if first is None or any(b is None for b in seq[first:last + 1]) or seq[first:last + 1] != sorted(seq[first:last + 1]):
        return None  # ops between blocks, or blocks out of order
    of = {b: [x for x in body if where[x] == b] for b in range(k)}
    prev, cur = of[t - 1], of[t]
    if len(prev) != len(cur) or any(a.target != b.target for a, b in zip(prev, cur)):
        return None
    step: dict[str, int] = {}
    for a, b in zip(prev, cur):
        (base, ca), (base_b, cb) = _split(a.name), _split(b.name)
        if base != base_b or step.setdefault(base, cb - ca) != cb - ca:
            return None
    prev_pos = {x: i for i, x in enumerate(prev)}
    if any(x.op == "placeholder" and x.name not in owner and x.users and all(where.get(u) is not None for u in x.users)
           for x in nodes):
        return None  # a lifted constant of a block: each block would have its own

    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    copy: dict[tuple[int, fx.Node], fx.Node] = {}  # (block j > t, node of block t) -> its copy
    new_params = {k_: v for k_, v in params.items()}
    new_buffers = {k_: v for k_, v in buffers.items()}
    mangled = container.replace(".", "_")

    def in_block(j: int, node: fx.Node) -> fx.Node:
        """Block j's counterpart of ``node`` of block t."""
        return env[node] if j == t else copy[(j, node)]

    def resolve(a: fx.Node, j: int) -> fx.Node:
        """The input of copy j that the template's input ``a`` stands for."""
        b = where.get(a)
        if b is None:
            return env[a]
        if b == t:
            return in_block(j, a)
        if b == t - 1 and a in prev_pos:
            return in_block(j - 1, cur[prev_pos[a]])
        raise _NotAChain

    def retarget(meta: dict, j: int) -> dict:
        meta = dict(meta)
        stack = meta.get("nn_module_stack")
        if stack:
            pat = re.compile(rf"{re.escape(container)}\.{t}(?=\.|$)")
            sub = f"{container}.{j}"
            meta["nn_module_stack"] = {pat.sub(sub, key): (pat.sub(sub, path), cls) for key, (path, cls) in stack.items()}
        return meta

    def emit_placeholder_copies(run: list[fx.Node]):
        for j in range(t + 1, n):
            for x in run:
                name = x.name.replace(f"{mangled}_{t}_", f"{mangled}_{j}_", 1)
                fqn = owner[x.name].replace(f"{container}.{t}.", f"{container}.{j}.", 1)
                if name == x.name:
                    raise _NotAChain
                y = g.placeholder(name)
                y.meta = dict(x.meta)
                copy[(j, x)] = y
                (new_params if x.name in params else new_buffers)[y.name] = fqn

    def emit_block_copies():
        for j in range(t + 1, n):
            for x in cur:
                base, c = _split(x.name)
                y = g.create_node(x.op, x.target, fx.map_arg(x.args, lambda a: resolve(a, j)),
                                  fx.map_arg(x.kwargs, lambda a: resolve(a, j)), name=_name(base, c + (j - t) * step[base]))
                y.meta = retarget(x.meta, j)
                copy[(j, x)] = y

    def after_blocks(a: fx.Node) -> fx.Node:
        b = where.get(a)
        if b is None:
            return env[a]
        if b != t:
            raise _NotAChain
        return in_block(n - 1, a)

    placeholders = [x for x in nodes if x.op == "placeholder"]
    runs: dict[fx.Node, list[fx.Node]] = {}  # last of a run of block t's placeholders -> the run
    run: list[fx.Node] = []
    for x in placeholders + [None]:
        if x is not None and where[x] == t:
            run.append(x)
        elif run:
            runs[run[-1]], run = run, []
    after = set(body[last + 1:])
    try:
        blocks_done = False
        for x in nodes:
            if not blocks_done and (x.op == "output" or x in after):
                emit_block_copies()
                blocks_done = True
            if blocks_done and x.op == "call_function":
                base, c = _split(x.name)
                y = g.create_node(x.op, x.target, fx.map_arg(x.args, after_blocks), fx.map_arg(x.kwargs, after_blocks),
                                  name=_name(base, c + (n - k) * step.get(base, 0)))
                y.meta = dict(x.meta)
            else:
                y = g.node_copy(x, after_blocks if blocks_done else (lambda a: env[a]))
            env[x] = y
            if x in runs:
                emit_placeholder_copies(runs[x])
    except _NotAChain:
        return None
    return g, new_params, new_buffers


class _NotAChain(Exception):
    pass


def _describe(graph: fx.Graph, params: dict, buffers: dict) -> list:
    """What the extension must reproduce of an export, node by node."""
    out = []
    for x in graph.nodes:
        val = x.meta.get("val")
        vals = val if isinstance(val, (tuple, list)) else (val,)
        stack = [p for p, _ in (x.meta.get("nn_module_stack") or {}).values()]
        out.append((x.op, x.name, str(x.target), repr(fx.map_arg(x.args, lambda a: a.name)),
                    repr(fx.map_arg(x.kwargs, lambda a: a.name)), params.get(x.name), buffers.get(x.name),
                    [(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else repr(v) for v in vals], stack))
    return out
