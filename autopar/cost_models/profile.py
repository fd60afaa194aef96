"""Profiled compute: time each distinct (op, local shapes, dtype) on this device, and cache it.

``autopar profile --hardware local --model M --mesh tp=2`` traces M, enumerates every strategy
the planner would consider on that mesh, and times each distinct local op call once (forward
alone, and forward + backward through autograd for training), with warm-up and the median of k
samples. It also measures what the per-rank program pays per op beyond the op itself: compiled
chains of n tiny ops on a one-rank mesh give the slope ``o_op`` (interpreter + DTensor dispatch +
autograd, per op) and chains of n parameters the slope ``o_param`` (gradient hook, accumulation
and the optimizer step, per parameter).

Results go to ``$AUTOPAR_CACHE_DIR/ops-<device>-torch<version>-t<threads>.json`` (default
``~/.cache/autopar``), keyed by device, torch version and thread count, and are reused: a second
run only times what is new. The planner reads the file for the ``local`` preset (this host).

The cost of op v on its local shards x, in seconds per step, is then

    t_v = T[key(v, x)]                                      if profiled (fwd, or fwd+bwd in training)
        = f · (b_c + e_c · roofline(v, x))                  otherwise, c = class(v)

plus ``o_op`` for every op the per-rank program runs (views included), ``o_param`` for every
trainable parameter and ``a + b·bytes`` for every collective it issues (on top of the link's
α-β time; measured on 2 ranks after compute, as a step issues them: ``profiler.py``). ``f`` is
1 + bwd/fwd in training, 1 in inference. The per-class base
``b_c`` and efficiency ``e_c`` are fitted over the profiled forward times of class c by least
squares on relative error: min Σ_i ((b_c + e_c·r_i − t_i) / t_i)², b_c, e_c ≥ 0.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SCHEMA = 1
CLASSES = ("matmul", "attention", "conv", "reduction", "pointwise")


def op_class(name: str) -> str:
    """Cost class of an op: view (no work, only dispatch), or for the efficiency fit matmul,
    attention, conv, reduction or pointwise."""
    from ..passes.strategies import VIEW_OPS
    from .compute import _CONV, _MATMULS, _REDUCTIONS, _SDPA, op_name

    if str(name) in VIEW_OPS:
        return "view"
    n = op_name(name)
    base = n.removesuffix("_backward")
    if n in _MATMULS:
        return "matmul"
    if base in _SDPA:
        return "attention"
    if base in _CONV or n == "convolution_backward":
        return "conv"
    if n in _REDUCTIONS or base in ("_softmax", "_log_softmax", "native_layer_norm", "native_group_norm",
                                    "native_batch_norm", "_native_batch_norm_legit_no_training"):
        return "reduction"
    return "pointwise"


def device_name() -> str:
    """A stable name for this device: the GPU's name, or the CPU model."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_path(threads: int = 1) -> Path:
    """Where this device's profile lives (keyed by device, torch version and thread count)."""
    import re

    import torch

    root = Path(os.environ.get("AUTOPAR_CACHE_DIR") or Path.home() / ".cache" / "autopar").expanduser()
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", device_name()).strip("-").lower()
    return root / f"ops-{slug}-torch{torch.__version__.split('+')[0]}-t{threads}.json"


@dataclass
class OpProfile:
    """Measured op times ``ops[key] = {"fwd_s", "train_s"}``, runtime overheads and class fits."""

    device: str
    torch: str
    threads: int
    ops: dict = field(default_factory=dict)
    overhead: dict = field(default_factory=dict)  # op_fwd_s, op_train_s, param_s, step_s, collective_s...
    efficiency: dict = field(default_factory=dict)  # class -> {"base_s", "eff", "n"}
    failed: dict = field(default_factory=dict)  # key -> why it could not be timed
    path: str = ""

    def time(self, key: str, train: bool) -> float | None:
        hit = self.ops.get(key)
        return None if hit is None else hit["train_s" if train else "fwd_s"]

    def estimate(self, cls: str, roofline_s: float, mult: float) -> float | None:
        """``mult · (b_c + e_c · roofline)`` from the class fit, or None without one."""
        fit = self.efficiency.get(cls)
        return None if fit is None else mult * (fit["base_s"] + fit["eff"] * roofline_s)

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "device": self.device, "torch": self.torch, "threads": self.threads,
                "overhead": self.overhead, "efficiency": self.efficiency, "ops": self.ops, "failed": self.failed}

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path or self.path or cache_path(self.threads))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True))
        tmp.replace(path)  # never a half-written cache
        self.path = str(path)
        return path


def load_profile(path: str | Path | None = None) -> OpProfile | None:
    """The cached profile of this device (or the file ``path``); None if there is none or it is stale."""
    import torch

    from ..errors import AutoparError

    p = Path(path) if path else cache_path()
    if not p.is_file():
        if path:
            raise AutoparError(f"op profile {str(p)!r} does not exist; make one with `autopar profile --hardware local`")
        return None
    try:
        d = json.loads(p.read_text())
        if d.get("schema") != SCHEMA or (not path and d.get("torch") != torch.__version__.split("+")[0]):
            return None  # written by another version: re-profile rather than trust it
        return OpProfile(d["device"], d["torch"], int(d["threads"]), dict(d["ops"]), dict(d["overhead"]),
                         dict(d["efficiency"]), dict(d.get("failed", {})), str(p))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AutoparError(f"op profile {str(p)!r} is unreadable ({e}); delete it and run `autopar profile --hardware local`") from None


# ---- what to time --------------------------------------------------------------------------------


def op_call(node, in_shapes: list, grad_mask: tuple, dtensor: bool) -> tuple[str, dict] | None:
    """(cache key, recipe) of ``node`` called on local tensors of ``in_shapes``; None if not timeable.

    ``dtensor``: the runtime calls the op on DTensors (not on local shards, as for autopar's own
    rules), so it is timed through DTensor's dispatch. Views are timed on their global shapes:
    their constant arguments are global sizes, and their cost is the dispatch, not the size.
    The recipe holds the op, each tensor input's shape and dtype, which inputs need a gradient,
    and the flattened arguments with the tensors' slots (rebuilt with the pytree spec); the key
    is plain data.
    """
    import torch
    import torch.fx as fx
    import torch.utils._pytree as pytree

    from ..passes.strategies import VIEW_OPS

    if not isinstance(node.target, torch._ops.OpOverload):
        return None
    if str(node.target) in VIEW_OPS:
        in_shapes = [tuple(a.meta["val"].shape) for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
    leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
    consts, slots, dtypes = [], [], []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, fx.Node):
            val = leaf.meta.get("val")
            if not isinstance(val, torch.Tensor):
                return None  # a symbolic int or a non-tensor value
            slots.append(i)
            consts.append(None)
            dtypes.append(str(val.dtype).removeprefix("torch."))
        elif leaf is None or isinstance(leaf, (bool, int, float, str, torch.dtype)):
            consts.append(leaf)
        else:
            return None  # devices, layouts, memory formats: leave to the roofline
    if not slots or len(slots) != len(in_shapes):
        return None
    recipe = {"op": str(node.target), "shapes": [list(s) for s in in_shapes], "dtypes": dtypes,
              "grad": list(grad_mask), "leaves": consts, "slots": slots, "spec": spec, "dtensor": dtensor}
    described = [str(c).removeprefix("torch.") if isinstance(c, torch.dtype) else c for c in consts]
    key = json.dumps([recipe["op"], recipe["shapes"], dtypes, recipe["grad"], described, dtensor], separators=(",", ":"))
    return key, recipe


def _rebuild(recipe: dict, tensors: list):
    """(args, kwargs) for the recipe, tensors substituted in."""
    import torch.utils._pytree as pytree

    leaves = list(recipe["leaves"])
    for k, i in enumerate(recipe["slots"]):
        leaves[i] = tensors[k]
    return pytree.tree_unflatten(leaves, recipe["spec"])


def _resolve(op: str):
    import torch

    ns, name, overload = op.split(".")
    return getattr(getattr(getattr(torch.ops, ns), name), overload)


def _inputs(recipe: dict, train: bool, mesh=None) -> list:
    import torch

    if mesh is not None and recipe.get("dtensor"):
        from torch.distributed.tensor import Replicate, distribute_tensor

        return [distribute_tensor(t.detach(), mesh, [Replicate()]).requires_grad_(t.requires_grad)
                for t in _inputs(recipe, train)]
    out = []
    for shape, dt, g in zip(recipe["shapes"], recipe["dtypes"], recipe["grad"]):
        dtype = getattr(torch, dt)
        if dtype.is_floating_point:
            t = torch.randn(shape, dtype=dtype).requires_grad_(bool(g) and train)
        elif dtype == torch.bool:
            t = torch.ones(shape, dtype=dtype)
        else:
            t = torch.zeros(shape, dtype=dtype)  # index 0 is valid for every gather/embedding
        out.append(t)
    return out


def _median_time(fn, repeats: int, min_sample_s: float) -> float:
    fn()
    fn()  # warm-up: allocator, caches, lazy init
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, min(1000, int(min_sample_s / one)))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def time_recipe(recipe: dict, *, repeats: int = 7, min_sample_s: float = 2e-3, mesh=None) -> dict:
    """Median seconds of the op forward (``fwd_s``) and forward + backward (``train_s``); on
    replicated DTensors over the 1-device ``mesh`` when the recipe says the runtime uses DTensor."""
    import torch

    op = _resolve(recipe["op"])
    with torch.no_grad():
        ins = _inputs(recipe, train=False, mesh=mesh)
        args, kwargs = _rebuild(recipe, ins)
        fwd = _median_time(lambda: op(*args, **kwargs), repeats, min_sample_s)
    ins = _inputs(recipe, train=True, mesh=mesh)
    needs = [t for t in ins if t.requires_grad]
    args, kwargs = _rebuild(recipe, ins)

    def step():
        out = op(*args, **kwargs)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(o, torch.Tensor) and o.requires_grad]
        if outs and needs:
            torch.autograd.grad(outs, needs, [torch.ones_like(o) for o in outs], allow_unused=True)

    if not needs:
        return {"fwd_s": fwd, "train_s": fwd}
    # One autograd.grad call per sample pays the engine's start-up; in a training step that is
    # paid once for the whole backward, so take it out (measured on a trivial op).
    bwd = _median_time(step, repeats, min_sample_s) - fwd - _engine_startup(repeats)
    return {"fwd_s": fwd, "train_s": fwd + max(0.0, bwd)}


_STARTUP: list[float] = []


def _engine_startup(repeats: int) -> float:
    """Seconds one ``autograd.grad`` call costs beyond its op's forward, for a 1-element neg."""
    import torch

    if not _STARTUP:
        x = torch.ones(1, requires_grad=True)
        fwd = _median_time(lambda: torch.neg(x), repeats, 2e-3)
        both = _median_time(lambda: torch.autograd.grad(torch.neg(x), x, torch.ones(1)), repeats, 2e-3)
        _STARTUP.append(max(0.0, both - fwd))
    return _STARTUP[0]


# ---- runtime overheads ---------------------------------------------------------------------------


def _chain(n_ops: int, n_params: int):
    import torch
    import torch.nn as nn

    class Chain(nn.Module):
        """n_ops cheap pointwise ops, then one multiply per parameter."""

        def __init__(self):
            super().__init__()
            self.w = nn.ParameterList([nn.Parameter(torch.ones(8)) for _ in range(n_params)])

        def forward(self, x):
            for _ in range(n_ops):
                x = torch.tanh(x)
            for w in self.w:
                x = x * w
            return x

    return Chain()


def measure_overheads(sizes: tuple[int, ...] = (8, 24, 40), repeats: int = 7) -> dict:
    """Per-op and per-parameter cost of autopar's runtime, from compiled chains on a 1-rank mesh.

    Needs an initialised process group of world size 1. Each is a least-squares slope over the
    chain lengths ``sizes``: ``op_fwd_s`` of the no-grad forward in the number of ops,
    ``op_train_s`` of forward+backward, both less the same slope of an eager chain of DTensor
    ops (the ops and their dispatch, which the profile times), so what is left is the program's
    own per-node cost; ``param_s`` of forward+backward+AdamW step in the number
    of parameters, less the one op each parameter adds; ``step_s`` the intercept of the
    parameter chains, a step's fixed cost. (The per-collective cost needs 2 ranks:
    ``profiler._collective_overhead``.)
    """
    import torch

    from ..api import compile as compile_model
    from ..mesh import Mesh

    x = torch.randn(4, 8)

    def timed(n_ops, n_params):
        pm = compile_model(_chain(n_ops, n_params), Mesh({"tp": 1}, hardware="local"), example_inputs=(x,),
                           op_profile=None)
        opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)

        def fwd():
            with torch.no_grad():
                pm(x)

        def fwd_bwd():
            pm(x).sum().backward()

        def train():
            fwd_bwd()
            opt.step()
            opt.zero_grad()

        return [_median_time(f, repeats, 5e-3) for f in (fwd, fwd_bwd, train)]

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))

    def eager(n):
        xg = distribute_tensor(x.clone(), mesh, [Replicate()]).requires_grad_()

        def chain(grad):
            y = xg
            for _ in range(n):
                y = torch.tanh(y)
            if grad:
                y.sum().backward()

        with torch.no_grad():
            f = _median_time(lambda: chain(False), repeats, 5e-3)
        return [f, _median_time(lambda: chain(True), repeats, 5e-3)]

    def slope(ys, k=0):  # k=1: the intercept
        return float(np.polyfit(np.array(sizes, dtype=float), np.array(ys), 1)[k])

    ops = np.array([timed(n, 1) for n in sizes])
    ref = np.array([eager(n) for n in sizes])
    op_fwd = max(0.0, slope(ops[:, 0]) - slope(ref[:, 0]))
    op_train = max(0.0, slope(ops[:, 1]) - slope(ref[:, 1]))
    params = np.array([timed(0, n) for n in sizes])
    param = max(0.0, slope(params[:, 2]) - slope(ops[:, 1]))
    # what a step costs with no op and no parameter: entering the program, starting backward, the
    # optimizer's own fixed work
    step = max(0.0, slope(params[:, 2], 1))
    return {"op_fwd_s": op_fwd, "op_train_s": op_train, "param_s": param, "step_s": step}


# ---- fitting -------------------------------------------------------------------------------------


def fit_efficiency(entries: list[tuple[str, float, float]]) -> dict:
    """Per class, (b_c, e_c) ≥ 0 minimising Σ ((b + e·r − t)/t)² over (class, roofline r, time t)."""
    out = {}
    for cls in CLASSES:
        pts = [(r, t) for c, r, t in entries if c == cls and t > 0]
        if not pts:
            continue
        r, t = np.array(pts).T
        a = np.stack([1.0 / t, r / t], axis=1)
        best = None
        for cols in ((0, 1), (0,), (1,)):  # both free, then each alone (non-negativity at a bound)
            sol = np.zeros(2)
            sol[list(cols)] = np.linalg.lstsq(a[:, cols], np.ones(len(t)), rcond=None)[0]
            if (sol < 0).any():
                continue
            err = float(np.sum((a @ sol - 1.0) ** 2))
            if best is None or err < best[0]:
                best = (err, sol)
        if best is not None:
            b, e = best[1]
            worst = float(np.max(np.abs(a @ best[1] - 1.0)))
            out[cls] = {"base_s": float(b), "eff": float(e), "n": len(t), "max_rel_error": worst}
    return out


def refit(prof: OpProfile) -> None:
    """Refit the class efficiencies over every profiled op (each entry keeps its class and roofline)."""
    prof.efficiency = fit_efficiency([(e["class"], e["roofline_s"], e["fwd_s"]) for e in prof.ops.values()
                                      if e.get("roofline_s", 0) > 0])


def new_profile(threads: int = 1) -> OpProfile:
    import torch

    return OpProfile(device_name(), torch.__version__.split("+")[0], threads, path=str(cache_path(threads)))
