"""Find mixture-of-experts layers in the traced graph and fuse each into one ``autopar.moe`` node.

An MoE layer computes, for T tokens x[t], top-k routing (idx[t, j], w[t, j]) and E experts,

    out[t] = Σ_j  f(x[t], w[t, j]; θ[idx[t, j]])

where f is the expert body (an MLP whose weights θ[e] are row e of tensors with a leading expert
dim, and which applies the routing weight). The graph spells this many ways (HF sorts the
assignments by expert and runs a grouped matmul with offsets; ``batched_mm`` gathers each row's
expert weights and runs ``bmm``; a user writes either by hand). Detection works on the graph, not
on module classes:

1. a ``topk`` over router scores [T, E] gives idx; the region is what lies between idx (and the
   parameters with a leading dim E: the experts) and the first later node of shape [T, H], the
   layer's output; its other inputs must reduce, through shape ops, to x [T, H] and w [T, k];
2. the *body* is the row-wise part of the region: the expert matmuls (``grouped_mm`` with
   offsets, or ``index(θ, ids)`` + ``bmm``) and the elementwise ops around them, one row per
   (token, pick) assignment. Its inputs are rows of x, per-row weights, per-row expert ids and
   per-expert offsets, each checked below;
3. the region runs once on probe values (distinct tokens and weights, random routing) with the
   body replaced by a known row function. Rows must be x's rows, weights w's, expert ids idx's
   (each assignment exactly once: dropless), offsets the cumulative expert counts of rows sorted
   by expert, and the output the sum of each token's k body rows. With real parameters the body
   also runs on a subset of experts and rows, with the parameters sliced, and must give the same
   rows: that is what expert parallelism runs on each rank.

Anything that fails a check stays in the graph as ordinary ops, with a warning saying why: that
is never wrong, only slower. ``autopar.moe`` nodes carry an ``MoeLayer`` (their target), which
the planner prices and the runtime (codegen/moe.py) dispatches by all-to-all.
"""

from __future__ import annotations

import math
import operator
import torch
import torch.fx as fx

MOE_OP = "autopar.moe"
_SHAPE_OPS = {"aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.expand.default",
              "aten.clone.default", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims",
              "aten.alias.default", "aten._to_copy.default", "aten.contiguous.default"}


class MoeLayer:
    """One fused MoE layer: the target of its ``autopar.moe`` node, called as
    ``layer(x, idx, w, *experts)`` (single device: every expert local)."""

    __name__ = MOE_OP

    def __init__(self, name, experts, top_k, tokens, hidden, params, body, roles, flops_per_row, fused,
                 saved_per_row=0.0):
        self.name = name  # "moe_0", ...
        self.experts = experts  # E
        self.top_k = top_k
        self.tokens = tokens  # T, as traced
        self.hidden = hidden
        self.params = params  # placeholder names of the expert tensors, in the node's argument order
        self.body = body  # fx.GraphModule: rows, weights, expert ids, counts-derived offsets, experts -> rows
        self.roles = roles  # body placeholder -> "rows" | "weights" | "ids" | "offsets:<dtype>" | "param:<i>"
        self.flops_per_row = flops_per_row  # forward FLOPs of the body for one row
        self.fused = fused  # names of the traced nodes it replaced
        self.saved_per_row = saved_per_row  # elements autograd keeps per row: the body's activations

    def __repr__(self) -> str:
        return MOE_OP

    __str__ = __repr__

    def __call__(self, x, idx, w, *experts):
        from ..codegen.moe import moe_forward

        return moe_forward(self, x, idx, w, experts)

    def run_body(self, rows, weights, ids, counts, experts):
        """The body on ``rows`` sorted by (local) expert id ``ids``, ``counts`` rows per expert."""
        env = {}
        for ph, role in self.roles.items():
            if role == "rows":
                env[ph] = rows
            elif role == "weights":
                env[ph] = weights
            elif role == "ids":
                env[ph] = ids
            elif role.startswith("offsets:"):
                env[ph] = torch.cumsum(counts, 0).to(getattr(torch, role.split(":")[1]))
            else:
                env[ph] = experts[int(role.split(":")[1])]
        return fx.Interpreter(self.body).run(*[env[n] for n in self.body_placeholders])

    @property
    def body_placeholders(self) -> list[str]:
        return [n.name for n in self.body.graph.nodes if n.op == "placeholder"]

    def describe(self) -> dict:
        return {"name": self.name, "experts": self.experts, "top_k": self.top_k, "tokens": self.tokens,
                "hidden": self.hidden, "expert_params": list(self.params), "flops_per_row": self.flops_per_row,
                "checked": getattr(self, "checked", "values")}


def _name(n: fx.Node) -> str:
    t = n.target
    return str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _is_grouped(n: fx.Node) -> bool:
    return n.op == "call_function" and "grouped_mm" in _name(n)


def _is_assert(n: fx.Node) -> bool:
    return _name(n) == "aten._assert_tensor_metadata.default"


def _closure(roots, step) -> set:
    seen, stack = set(), list(roots)
    while stack:
        for a in step(stack.pop()):
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _descendants(roots) -> set:
    return _closure(roots, lambda n: n.users)


def _ancestors(n: fx.Node) -> set:
    return {n} | _closure([n], lambda m: m.all_input_nodes)


def fuse_moe(gm: fx.GraphModule, params: dict[str, str], warnings: list[str]) -> list[MoeLayer]:
    """Replace every MoE layer of ``gm`` that passes the checks by one ``autopar.moe`` node."""
    layers, verified = [], set()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    topks = [n for n in gm.graph.nodes if n.op == "call_function" and _name(n) == "aten.topk.default"]
    for K in topks:
        if K not in order or K.graph is not gm.graph:
            continue
        try:
            layer = _fuse_one(gm, K, params, order, len(layers), verified)
        except _NotMoe as why:
            if why.args[0]:
                warnings.append(f"{K.name}: a top-k that looks like MoE routing was left as ordinary ops ({why.args[0]})")
            continue
        layers.append(layer)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
    if layers:
        gm.graph.lint()
        gm.recompile()
    return layers


class _NotMoe(Exception):
    pass


def _fuse_one(gm, K, params, order, index, verified) -> MoeLayer:
    scores = _val(K.args[0])
    if scores is None or scores.dim() != 2 or len(K.args) < 2:
        raise _NotMoe("")
    T, E = scores.shape
    k = K.args[1]
    idx = next((u for u in K.users if u.target is operator.getitem and u.args[1] == 1), None)
    if idx is None or not isinstance(k, int):
        raise _NotMoe("")
    before_k = _ancestors(K)
    experts = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name in params and _val(n) is not None
               and _val(n).dim() >= 2 and _val(n).shape[0] == E and n not in before_k]
    if not experts:
        raise _NotMoe("")  # no expert weights at all: an ordinary top-k, nothing to say
    d_idx = _descendants([idx])
    outs = [n for n in gm.graph.nodes if n in d_idx and order[n] > order[K] and isinstance(_val(n), torch.Tensor)
            and _val(n).dim() == 2 and _val(n).shape[0] == T and _val(n).dtype.is_floating_point]
    reasons = []
    for out in outs[:3]:
        try:
            return _build(gm, K, idx, out, experts, T, E, k, index, verified)
        except _NotMoe as why:
            reasons.append(why.args[0])
    raise _NotMoe(reasons[0] if reasons else "no [tokens, hidden] output after the routing")


_LIKE = {"aten.full_like.default", "aten.zeros_like.default", "aten.empty_like.default", "aten.ones_like.default"}


def _shape_only(n: fx.Node) -> bool:
    """Whether a value depends on no tensor's values, only on shapes (factories, ``*_like``)."""
    if n.op == "call_function" and _name(n) in _LIKE:
        return True
    return n.op == "call_function" and all(_shape_only(a) for a in n.all_input_nodes)


def _shape_only_nodes(n: fx.Node) -> set:
    if _name(n) in _LIKE:
        return {n}
    return {n}.union(*(_shape_only_nodes(a) for a in n.all_input_nodes))


def _walk_to_base(n: fx.Node, T: int) -> fx.Node:
    """Back through shape ops and gathers at fixed positions (``x[arange(T).repeat_interleave(k)]``)."""
    while n.op == "call_function" and not (_val(n).dim() == 2 and _val(n).shape[0] == T):
        fixed_gather = (_name(n) == "aten.index.Tensor" and len(n.args[1]) == 1 and n.args[1][0] is not None
                        and _shape_only(n.args[1][0]))
        if _name(n) not in _SHAPE_OPS and not fixed_gather:
            break
        n = n.args[0]
    return n


def _signature(nodes, inputs) -> tuple:
    """The layer's ops, wiring, constants and shapes, with node names left out."""
    pos = {n: i for i, n in enumerate(inputs)}
    pos.update({n: len(inputs) + i for i, n in enumerate(nodes)})

    def enc(a):
        if isinstance(a, fx.Node):
            return ("%", pos.get(a, -1))
        if isinstance(a, (list, tuple)):
            return tuple(enc(b) for b in a)
        if isinstance(a, dict):
            return tuple(sorted((k, enc(v)) for k, v in a.items()))
        return repr(a)

    def shape(n):
        v = _val(n)
        return tuple(v.shape) if isinstance(v, torch.Tensor) else None

    return tuple((_name(n), enc(n.args), enc(n.kwargs), shape(n)) for n in nodes) + tuple(shape(n) for n in inputs)


def _build(gm, K, idx, out, experts, T, E, k, index, verified) -> MoeLayer:
    anc = _ancestors(out)
    used_experts = [p for p in experts if p in anc]
    if not used_experts:
        raise _NotMoe("no expert weights (parameters with a leading dim of the expert count) feed it")
    r0 = anc & (_descendants([idx]) | _descendants(used_experts))
    region = set(r0)
    # the region's other inputs reduce, through shape ops, to x [T, H] and w [T, k]
    bases = {}
    for n in list(r0):
        for a in n.all_input_nodes:
            if a in region or a is idx or a in used_experts:
                continue
            if _shape_only(a):  # made from shapes alone (arange, zeros_like): part of the layer
                region.update(_shape_only_nodes(a))
                continue
            b = _walk_to_base(a, T)
            v = _val(b)
            if v is None or v.dim() != 2 or v.shape[0] != T or not v.dtype.is_floating_point:
                raise _NotMoe(f"the region reads {a.name}, which is neither the tokens, the routing weights nor an expert")
            role = "w" if v.shape[1] == k and b in _descendants([K]) else "x"
            if bases.setdefault(role, b) is not b:
                raise _NotMoe(f"two candidate {role} inputs ({bases[role].name}, {b.name})")
            c = a
            while c is not b:
                region.add(c)
                region.update(n for arg in c.all_input_nodes[1:] if _shape_only(arg) for n in _shape_only_nodes(arg))
                c = c.args[0]
    if set(bases) != {"x", "w"}:
        raise _NotMoe(f"could not find both the tokens and the routing weights (found {sorted(bases)})")
    x, w = bases["x"], bases["w"]
    if _val(out).shape[1] != _val(x).shape[1]:
        raise _NotMoe("output width differs from the tokens'")
    for n in list(r0):  # shape asserts on the layer's values go with it
        region.update(u for u in n.users if _is_assert(u))
    for n in r0:
        if n is not out and any(u not in region for u in n.users):
            raise _NotMoe(f"{n.name} is used outside the layer")
    body, roles, flops = _extract_body(gm, region, used_experts, T * k)
    node_order = [n for n in gm.graph.nodes if n in region]
    acts = sum(_val(n).numel() for n in body.graph.nodes if n.op == "call_function" and isinstance(_val(n), torch.Tensor)
               and _name(n) not in _SHAPE_OPS and n.target is not operator.getitem and _val(n).dim() >= 1
               and _val(n).shape[0] == T * k and not _name(n).startswith("aten.index"))
    layer = MoeLayer(f"moe_{index}", E, k, T, _val(x).shape[1], [p.name for p in used_experts], body, roles,
                     flops, [n.name for n in node_order], _val(x).shape[1] + acts / (T * k))
    sig = _signature(node_order, [x, w, idx, *used_experts])
    if sig not in verified and T * k * layer.hidden <= 4 * _PROBE_LIMIT:
        _probe(node_order, layer, body, x, w, idx, out, used_experts, T, E, k)  # once per distinct layer
        verified.add(sig)
    layer.checked = "values" if sig in verified else "structure"  # too big to probe: planning a huge batch
    with gm.graph.inserting_before(out):
        new = gm.graph.create_node("call_function", layer, (x, idx, w, *used_experts), name=layer.name)
    new.meta["val"] = out.meta["val"]
    new.meta["autopar.moe"] = layer.describe()
    out.replace_all_uses_with(new)
    for n in reversed(node_order):
        if not n.users:
            gm.graph.erase_node(n)
    return layer


# ops that act on each row of an [N, ...] tensor alone (dim 0 untouched)
def _row_wise(n: fx.Node, N: int) -> bool:
    name = _name(n)
    v = _val(n)
    if _is_grouped(n) or name == "aten.bmm.default":
        return True
    if name in ("aten.split_with_sizes.default", "aten.split.Tensor"):
        dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
        return dim % _val(n.args[0]).dim() != 0
    if n.target is operator.getitem:
        return True
    if name in ("aten.unsqueeze.default",):
        return n.args[1] % (_val(n.args[0]).dim() + 1) != 0
    if name in ("aten.squeeze.dim", "aten.squeeze.dims"):
        dims = n.args[1] if isinstance(n.args[1], (list, tuple)) else [n.args[1]]
        return all(d % _val(n.args[0]).dim() != 0 for d in dims)
    if isinstance(n.target, torch._ops.OpOverload) and torch.Tag.pointwise in n.target.tags:
        return isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == N
    return name in ("aten._to_copy.default", "aten.clone.default")


def _expert_view(n: fx.Node, experts) -> bool:
    """A chain of permutes/transposes of an expert tensor that keeps the expert dim first."""
    while n.op == "call_function":
        name = _name(n)
        if name == "aten.permute.default" and n.args[1][0] == 0:
            n = n.args[0]
        elif name == "aten.transpose.int" and 0 not in (n.args[1] % _val(n.args[0]).dim(), n.args[2] % _val(n.args[0]).dim()):
            n = n.args[0]
        else:
            return False
    return n in experts


def _extract_body(gm, region, experts, N):
    """The row-wise subgraph: from the expert matmuls forward, and back through row-wise prep."""
    consumers = []
    for n in region:
        if _is_grouped(n) and len(n.args) >= 3 and _expert_view(n.args[1], experts):
            consumers.append(n)
        elif _name(n) == "aten.index.Tensor" and _expert_view(n.args[0], experts) and len(n.args[1]) == 1:
            consumers.append(n)
    if not consumers:
        raise _NotMoe("no grouped or gathered expert matmul")
    body = set(consumers)
    grew = True
    while grew:
        grew = False
        for n in region:
            if n in body or n.op != "call_function":
                continue
            ins = n.all_input_nodes
            fwd = any(a in body for a in ins) and _row_wise(n, N)
            back = (any(u in body for u in n.users) and all(u in body or _is_assert(u) for u in n.users)
                    and (_expert_view(n, experts) or (_row_wise(n, N) and _name(n) not in ("aten.bmm.default",)
                                                      and not _is_grouped(n) and isinstance(_val(n), torch.Tensor)
                                                      and _val(n).shape[0] == N and len(ins) == 1
                                                      and _name(n) != "aten.index.Tensor")))
            if fwd or back:
                body.add(n)
                grew = True
    exits = [n for n in body if any(u not in body and not _is_assert(u) for u in n.users)]
    if len(exits) != 1 or not isinstance(_val(exits[0]), torch.Tensor) or _val(exits[0]).dim() != 2 or _val(exits[0]).shape[0] != N:
        raise _NotMoe(f"the expert body does not end in one [assignments, hidden] tensor ({[e.name for e in exits]})")
    g = fx.Graph()
    env, roles = {}, {}
    ordered = [n for n in gm.graph.nodes if n in body]
    flops = 0.0
    for n in ordered:
        for a in n.all_input_nodes:
            if a in body or a in env:
                continue
            v = _val(a)
            if a in experts:
                role = f"param:{experts.index(a)}"
            elif a.op == "call_function" and _name(a) == "aten.arange.start_step":
                raise _NotMoe("the body reads a position index")
            elif not v.dtype.is_floating_point and v.dim() == 1 and v.shape[0] == N:
                role = "ids"
            elif not v.dtype.is_floating_point and v.dim() == 1:
                role = f"offsets:{str(v.dtype).removeprefix('torch.')}"
            elif v.dim() == 2 and v.shape[0] == N:
                role = "rows"
            elif v.dim() == 1 and v.shape[0] == N:
                role = "weights"
            else:
                raise _NotMoe(f"the body reads {a.name} {tuple(v.shape)}, which is not per row")
            if role in roles.values() and not role.startswith("param"):
                raise _NotMoe(f"the body has two inputs of role {role}")
            env[a] = g.placeholder(a.name)
            env[a].meta["val"] = v
            roles[a.name] = role
        if _is_grouped(n) or _name(n) == "aten.bmm.default":
            shapes = [_val(a).shape for a in n.all_input_nodes if _val(a).dim() >= 2]
            flops += 2 * _val(n).numel() * shapes[0][-1]
        env[n] = g.node_copy(n, lambda a: env[a])
    if "rows" not in roles.values() or "weights" not in roles.values():
        raise _NotMoe("the body does not read token rows and routing weights")
    g.output(env[exits[0]])
    return fx.GraphModule(gm, g), roles, flops / N


def _probe(node_order, layer, body, x, w, idx, out, experts, T, E, k) -> None:
    """Run the region on probe values with a known body; check what each body input is.

    Rows are matched to tokens by value (they are copies), their experts come from the ids or the
    offsets, and each (token, expert) names one pick j, which must be there exactly once and carry
    weight w[t, j]: any dtype, since nothing relies on the weights being distinct."""
    gen = torch.Generator().manual_seed(0)
    H = layer.hidden
    xv = torch.randn(T, H, generator=gen, dtype=torch.float64).to(_val(x).dtype)
    wv = torch.rand(T, k, generator=gen, dtype=torch.float64).add(0.5).to(_val(w).dtype)
    iv = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(_val(idx).dtype)
    env = {x: xv, w: wv, idx: iv}
    body_inputs = {}
    exit_node = list(body.graph.nodes)[-1].args[0]
    body_names = {n.name for n in body.graph.nodes if n.op == "call_function"}
    by_name = {n.name: n for n in out.graph.nodes}
    for n in node_order:
        if (n.name in body_names and n.name != exit_node.name) or _is_assert(n):
            continue
        if n.name == exit_node.name:
            for ph in layer.roles:
                body_inputs[layer.roles[ph]] = env.get(by_name[ph])
            rows, wts = body_inputs.get("rows"), body_inputs.get("weights")
            if rows is None or wts is None:
                raise _NotMoe("the body's inputs are not computed inside the layer")
            env[n] = _stand_in(rows, wts).to(_val(exit_node).dtype)  # a known row function
            continue
        if n in env:
            continue
        if n.op == "placeholder":
            raise _NotMoe(f"the layer reads {n.name}")
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env[a] if a in env else _materialise(a))
        if "device" in kwargs:  # planning traces on the meta device; the probe runs on the CPU
            kwargs = {**kwargs, "device": torch.device("cpu")}
        env[n] = n.target(*args, **kwargs)
    rows, wts, ids = body_inputs["rows"], body_inputs["weights"], body_inputs.get("ids")
    offs = next((v for r, v in body_inputs.items() if r.startswith("offsets")), None)
    if rows.shape[0] != T * k:
        raise _NotMoe(f"the body runs {rows.shape[0]} rows, not one per pick ({T} tokens x {k}): dropping or padding")
    probe = torch.randn(H, generator=gen, dtype=torch.float64)
    hx, hr = xv.double() @ probe, rows.double() @ probe
    order = torch.argsort(hx)
    tok = order[torch.searchsorted(hx[order], hr).clamp(max=T - 1)]
    if not torch.equal(rows, xv[tok]):
        raise _NotMoe("the body's rows are not copies of the tokens")
    if ids is not None:
        row_expert = ids.long()
    elif offs is not None:
        row_expert = torch.searchsorted(offs.long(), torch.arange(T * k), right=True)
    else:
        raise _NotMoe("the body knows neither expert ids nor offsets")
    hit = iv[tok].long() == row_expert.unsqueeze(1)  # [rows, k]: which pick of its token each row is
    if not bool((hit.sum(1) == 1).all()):
        raise _NotMoe("a row goes to an expert its token did not pick")
    pick = tok * k + hit.float().argmax(1)
    if sorted(pick.tolist()) != list(range(T * k)):
        raise _NotMoe("the rows are not each (token, pick) exactly once")
    if not torch.equal(wts.double(), wv.reshape(-1)[pick].double()):
        raise _NotMoe("the body's weights are not the routing weights of its rows")
    if offs is not None:
        counts = torch.bincount(row_expert, minlength=E)
        if not bool((row_expert[1:] >= row_expert[:-1]).all()) or not torch.equal(offs.long(), torch.cumsum(counts, 0)):
            raise _NotMoe("the grouped matmul's offsets are not the expert counts of rows sorted by expert")
    stand_in = _stand_in(rows, wts).to(_val(exit_node).dtype).double()
    want = torch.zeros(T, H, dtype=torch.float64).index_add_(0, tok, stand_in)
    tol = 1e-4 if _val(out).dtype in (torch.float32, torch.float64) else 3e-2
    if not torch.allclose(env[out].double(), want, rtol=tol, atol=tol):
        raise _NotMoe("the output is not the sum of each token's expert rows")
    _check_body_slices(layer, experts, rows, wts, row_expert)


def _stand_in(rows, wts):
    return rows.double() * wts.double().unsqueeze(-1) + 1.0


def _materialise(a):
    raise _NotMoe(f"the layer reads {a.name} from outside")


def _check_body_slices(layer, experts, rows, wts, row_expert) -> None:
    """The body on two experts' rows, with the expert tensors sliced to those two, gives the rows
    it gives with every expert: what each expert-parallel rank runs. Random weights: this is a
    property of the body's ops, not of the values."""
    vals = [_val(p) for p in experts]
    if sum(v.numel() for v in vals) > _PROBE_LIMIT or layer.experts < 2:
        return
    gen = torch.Generator().manual_seed(1)
    full = [torch.randn(tuple(v.shape), generator=gen, dtype=torch.float64).to(v.dtype) / math.sqrt(v.shape[-1])
            for v in vals]
    order = torch.argsort(row_expert, stable=True)
    rows, wts, e = rows[order], wts[order], row_expert[order]
    lo = layer.experts // 2
    pick = (e == lo) | (e == lo + 1)
    if not bool(pick.any()):
        return
    counts = torch.bincount(e, minlength=layer.experts)
    with torch.no_grad():
        ref = layer.run_body(rows, wts, e, counts, full)[pick]
        sub = layer.run_body(rows[pick], wts[pick], e[pick] - lo, counts[lo:lo + 2], [t[lo:lo + 2] for t in full])
    if sub.shape != ref.shape or not torch.allclose(sub, ref, rtol=1e-4, atol=1e-5):
        raise _NotMoe("the expert body does not give the same rows on a slice of the experts")


_PROBE_LIMIT = 1 << 26  # elements: above this the layer is checked by structure only (planning huge models)
