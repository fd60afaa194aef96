"""Gradient and pipeline-send compression: calibration, the per-layer choice, and the plan entry.

``calibrate_compression`` runs one training step of the model on one process and measures, for
every parameter's gradient and every compression option, the relative error of compressing it
(codegen/compress.py's compressors, no communication). ``choose_compression`` prices each option
of each data-parallel gradient sync with the plan's own collective cost model, solves the
per-layer ILP (solvers/compression.py) under an error budget and writes ``plan.compression``:

    {"grads": {FQN: {"method", "axis", "numel", "comm_s", "codec_s", "rel_error", "alternatives"}},
     "pipeline": "int8" | None, "error_budget": ε, "calibration": "measured" | "synthetic", "predicted": {...}}

The runtime (codegen/runtime.py) reads ``grads[FQN]["method"]`` and ``pipeline``; the rest says
why. A model on the meta device has no gradients to measure: its errors come from Gaussian
gradients of the same shapes, and the plan says ``"calibration": "synthetic"``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .errors import AutoparError

METHODS = ("none", "int8", "topk:0.1", "topk:0.01", "powersgd:4", "powersgd:16")
DEFAULT_BUDGET = 0.1  # relative L2 error of the whole gradient
# One eager torch op on a GPU: Python dispatch plus the kernel launch, ~10 us for the small ops a
# codec is made of. A codec's fixed cost is its op count times this, which is what keeps small
# gradients (a bias, a norm's weight) uncompressed: their all-reduce is latency, and no codec
# shortens latency.
OP_S = 10e-6
CODEC_OPS = {"int8": 12, "topk": 16, "powersgd": 20}  # ops per compress + decompress in codegen/compress.py
SYNTHETIC_SAMPLE = 1 << 16  # elements of a Gaussian stand-in gradient (errors are scale-free)


def protocol(method, shape, world: int) -> list[tuple[str, int]]:
    """codegen/compress.py's collectives of one compressed all-reduce (imported when used: the
    runtime's kernels load triton)."""
    from .codegen.compress import protocol as collectives

    return collectives(method, shape, world)


def sent_bytes(method: str, shape, world: int) -> float:
    """Bytes one rank sends in the compressed all-reduce of ``protocol`` (ring algorithms: an all-reduce sends
    2(p−1)/p of its buffer, an all-gather or all-to-all (p−1)/p of its whole output)."""
    return sum((2 if op == "all_reduce" else 1) * (world - 1) / world * b for op, b in protocol(method, shape, world))


def codec_time(method: str, shape, world: int, hw) -> float:
    """Device seconds to compress and decompress one gradient: memory passes at HBM bandwidth,
    matmul FLOPs at the fp32 peak, and the kernel launches (a roofline, like the op costs)."""
    from .codegen.compress import parse_method, powersgd_applies

    n = math.prod(shape)
    m = parse_method(method)
    bw = hw.memory_bandwidth_Bps
    if m.kind == "none" or world <= 1:
        return 0.0
    fixed = CODEC_OPS[m.kind] * OP_S
    if m.kind == "int8":  # quantize (read 4n, write n), dequantize-sum my chunk, quantize it, dequantize all
        return (12 * n) / bw + fixed
    if m.kind == "topk":  # momentum and error accumulators (5 passes of 4n), selection (2), masking (2)
        return (36 * n) / bw + fixed
    if not powersgd_applies(shape, m.rank):
        return 0.0
    rows, cols = shape[0], n // shape[0]
    r = min(m.rank, rows, cols)
    flops = 6 * rows * cols * r + 4 * (rows + cols) * r * r  # three products and two orthogonalisations
    return flops / hw.peak("float32") + (16 * n) / bw + fixed


class CompressionStats:
    """Per-parameter ``norm2`` (||g||²) and ``rel_err`` {method: ||C(g) − g|| / ||g||}."""

    def __init__(self, params: dict, source: str = "measured"):
        self.params, self.source = params, source

    def save(self, path) -> None:
        Path(path).write_text(json.dumps({"source": self.source, "params": self.params}, indent=1, sort_keys=True))

    @classmethod
    def load(cls, path) -> "CompressionStats":
        try:
            doc = json.loads(Path(path).read_text())
            return cls(doc["params"], doc.get("source", "measured"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AutoparError(f"{str(path)!r} is not a compression calibration file written by "
                               f"CompressionStats.save ({type(exc).__name__}: {exc})") from None


def _errors(g: torch.Tensor, methods) -> dict:
    from .codegen.compress import compression_error

    return {m: float(compression_error(m, g)) for m in methods if m != "none"}


def calibrate_compression(model: torch.nn.Module, example_inputs, *, example_kwargs: dict | None = None,
                          loss_fn=None, methods=METHODS) -> CompressionStats:
    """Measure every option's error on one step's gradients of ``model`` (one process, no
    communication). ``loss_fn(output)`` gives the loss (default: the mean square of the float
    outputs, a stand-in with the model's own gradient structure; pass the real loss when you
    have it). The model's ``.grad`` fields are left as they were."""
    import torch.utils._pytree as pytree

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if any(p.is_meta for _, p in params):
        raise AutoparError("calibrate_compression runs the model; its parameters are on the meta device")
    saved = {n: p.grad for n, p in params}
    for _, p in params:
        p.grad = None
    out = model(*example_inputs, **(example_kwargs or {}))
    if loss_fn is None:
        floats = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        loss = sum(t.float().pow(2).mean() for t in floats)
    else:
        loss = loss_fn(out)
    loss.backward()
    stats, by_id = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):  # every name of a tied parameter
        if p.requires_grad and p.grad is not None:
            if id(p) not in by_id:
                g = p.grad.detach().float()
                by_id[id(p)] = {"norm2": float(g.pow(2).sum()), "shape": list(g.shape), "rel_err": _errors(g, methods)}
            stats[name] = by_id[id(p)]
    for name, p in params:
        p.grad = saved[name]
    return CompressionStats(stats, "measured")


def synthetic_stats(shapes: dict, methods=METHODS) -> CompressionStats:
    """Errors on Gaussian gradients of each shape (capped at SYNTHETIC_SAMPLE elements, rows kept
    2-D for PowerSGD), ||g||² taken as the element count: for planning a model that cannot run."""
    gen = torch.Generator().manual_seed(0)
    stats = {}
    for name, shape in shapes.items():
        n = math.prod(shape)
        if len(shape) >= 2:
            cols = math.prod(shape[1:])
            rows = max(1, min(shape[0], SYNTHETIC_SAMPLE // max(1, cols)))
            sample = (rows, min(cols, SYNTHETIC_SAMPLE))
        else:
            sample = (min(n, SYNTHETIC_SAMPLE),)
        g = torch.randn(sample, generator=gen)
        stats[name] = {"norm2": float(n), "shape": list(shape), "rel_err": _errors(g, methods)}
    return CompressionStats(stats, "synthetic")


def _sync_items(plan, tg) -> dict:
    """FQN -> (axis, local shape) of each gradient sync that is one all-reduce on one axis: the
    ones a compressed all-reduce can replace (codegen/runtime.py's compressed hook)."""
    by_tensor: dict[str, list] = {}
    for c in plan.collectives:
        if c.get("phase") == "grad_sync":
            by_tensor.setdefault(c["tensor"], []).append(c)
    items = {}
    for name, cs in by_tensor.items():
        fqn = tg.params.get(name)
        if fqn is None or len(cs) != 1 or cs[0]["op"] != "all_reduce":
            continue
        meta = next(n.meta["val"] for n in tg.gm.graph.nodes if n.name == name)
        pls = plan.param_placements.get(fqn, {})
        shape = list(meta.shape)
        for axis, p in pls.items():
            if p.startswith("S("):
                d = int(p[2:-1])
                shape[d] = -(-shape[d] // plan.mesh[axis])
        items[fqn] = (cs[0]["axis"], tuple(shape), float(cs[0]["time_s"]))
    return items


def choose_compression(plan, tg, hw, spec, *, model=None, progress=None) -> None:
    """Write ``plan.compression`` from ``spec`` (see ``autopar.plan``'s ``compression``)."""
    from .cost_models.comm import axis_links, collective_time
    from .solvers.compression import Layer, Option, solve_compression

    say = progress or (lambda m: None)
    spec = {"grads": spec} if isinstance(spec, (str, CompressionStats)) else dict(spec)
    unknown = set(spec) - {"grads", "error_budget", "calibration", "pipeline", "methods"}
    if unknown:
        raise AutoparError(f"compression= has unknown keys {sorted(unknown)}; known: grads, error_budget, "
                           "calibration, pipeline, methods")
    grads, pipeline = spec.get("grads", "auto"), spec.get("pipeline")
    if isinstance(grads, CompressionStats):
        spec["calibration"], grads = grads, "auto"
    if pipeline not in (None, "none", "int8"):
        raise AutoparError(f"compression pipeline={pipeline!r}: pipeline sends support 'int8' or None")
    budget = float(spec.get("error_budget", DEFAULT_BUDGET))
    if not 0 <= budget < 1:
        raise AutoparError(f"compression error_budget={budget}: give the relative L2 error allowed, in [0, 1)")
    methods = tuple(spec.get("methods", METHODS))
    from .codegen.compress import parse_method

    for m in methods if grads == "auto" else (grads,) if grads is not None else ():
        parse_method(m)  # a bad method string is an AutoparError saying what is wrong
    out = {"grads": {}, "pipeline": None if pipeline in (None, "none") else pipeline, "error_budget": budget}
    items = _sync_items(plan, tg)
    if "pp" in plan.mesh and grads not in (None, "none"):
        plan.warnings.append("gradient compression is not applied on meshes with 'pp' yet (the stages' gradient "
                             "syncs run uncompressed); pipeline sends can be: compression={'pipeline': 'int8'}")
        items = {}
    if grads not in (None, "none") and not items and "pp" not in plan.mesh:
        plan.warnings.append("compression was asked for, but this plan has no parameter gradient all-reduced on one "
                             "mesh axis (the solver did not use data parallelism here; a model that returns full "
                             "outputs makes every rank gather them, which a slow link may not pay for): nothing "
                             "to compress")
    if grads in (None, "none") or not items:
        plan.compression = out if out["pipeline"] else None
        return
    links = axis_links(plan.mesh, hw)
    if grads != "auto":  # one method everywhere, no solver
        methods = ("none", grads)
    stats = spec.get("calibration")
    if isinstance(stats, (str, Path)):
        stats = CompressionStats.load(stats)
    if stats is None:
        if model is not None and not any(p.is_meta for p in model.parameters()):
            stats = calibrate_compression(model, tg.example[0], example_kwargs=tg.example[1], methods=methods)
        else:
            stats = synthetic_stats({fqn: shape for fqn, (_, shape, _) in items.items()}, methods)
    out["calibration"] = stats.source
    layers = []
    for fqn, (axis, shape, _) in items.items():
        world = plan.mesh[axis]
        st = stats.params.get(fqn)
        if st is None:
            raise AutoparError(f"the compression calibration has no gradient for {fqn!r}; calibrate this model")
        opts = []
        for m in methods:
            rel = 0.0 if m == "none" else st["rel_err"].get(m)
            if rel is None or (m != "none" and protocol(m, shape, world) == protocol("none", shape, world)):
                continue  # not measured, or not applicable here (PowerSGD of a vector is the plain all-reduce)
            comm = sum(collective_time(op, b, world, links[axis]) for op, b in protocol(m, shape, world))
            opts.append(Option(m, comm, codec_time(m, shape, world, hw), rel * rel * st["norm2"]))
        if grads != "auto" and len(opts) == 2:
            opts = [opts[1]]  # the user fixed the method
        layers.append(Layer(fqn, st["norm2"], tuple(sorted(opts, key=lambda o: o.method != "none"))))
    forced = [lay for lay in layers if lay.options[0].method != "none"]
    free = [lay for lay in layers if lay.options[0].method == "none"]
    compute = plan.time_breakdown.get("compute_s", plan.time_breakdown.get("all_stages_compute_s", 0.0))
    overlap = compute * 2 / 3 / plan.mesh.get("pp", 1)  # the backward share of fwd+bwd compute
    fixed_comm = sum(lay.options[0].comm_s for lay in forced)
    choice = solve_compression(free, max(0.0, overlap - fixed_comm), budget if grads == "auto" else 1.0)
    before = sum(t for _, _, t in items.values())
    after_comm, codec = 0.0, 0.0
    for lay in layers:
        m = choice.methods.get(lay.name, lay.options[0].method)
        o = next(o for o in lay.options if o.method == m)
        base = next((o.comm_s for o in lay.options if o.method == "none"), items[lay.name][2])
        after_comm, codec = after_comm + o.comm_s, codec + o.codec_s
        out["grads"][lay.name] = {
            "method": m, "axis": items[lay.name][0], "numel": math.prod(items[lay.name][1]), "comm_s": o.comm_s,
            "codec_s": o.codec_s, "saved_s": base - o.comm_s - o.codec_s,
            "rel_error": (o.err2 / lay.norm2) ** 0.5 if lay.norm2 else 0.0,
            "alternatives": [{"method": a.method, "comm_s": a.comm_s, "codec_s": a.codec_s,
                              "rel_error": (a.err2 / lay.norm2) ** 0.5 if lay.norm2 else 0.0} for a in lay.options]}
    n_on = sum(1 for g in out["grads"].values() if g["method"] != "none")
    out["predicted"] = {"grad_sync_s": before, "compressed_grad_sync_s": after_comm, "codec_s": codec,
                        "overlap_window_s": overlap, "exposed_s": max(0.0, before - overlap),
                        "compressed_exposed_s": max(0.0, after_comm - overlap), "rel_error": choice.rel_error,
                        "status": choice.status}
    plan.timings["compression_solve_time_s"] = choice.solve_time_s  # wall clock: not part of the plan
    plan.compression = out
    plan.time_breakdown["grad_sync_s"] = plan.time_breakdown.get("grad_sync_s", 0.0) - before + after_comm
    plan.time_breakdown["codec_s"] = codec
    plan.step_time_s += after_comm + codec - before
    say(f"compression: {n_on} of {len(layers)} gradient syncs compressed (budget {budget:g}, error "
        f"{choice.rel_error:.3g}, {stats.source} calibration); grad sync {before * 1e3:.3g} -> "
        f"{after_comm * 1e3:.3g} ms + codec {codec * 1e3:.3g} ms, backward overlap {overlap * 1e3:.3g} ms")
