r"""Memory per device: model state by optimizer, and what autograd saves for backward.

The training peak is taken at the start of the backward pass, where every saved activation is
still live, with the gradients counted in full (they fill up as the activations are freed)::

    M = Σ_p (w_p + g_p + o_p) + A + T

* ``w_p = n_p·s_p``: parameter p's local shard (n_p elements of s_p bytes); buffers count here too;
* ``g_p = w_p`` if p is trained, else 0;
* ``o_p``: optimizer state of p's shard (``OPTIMIZERS``): ``adamw`` 2 fp32 moments, ``8 n_p``;
  ``adamw8bit`` 2 one-byte states, each with one fp32 absmax per 256-element block
  (bitsandbytes blockwise), ``2 (n_p + 4 ⌈n_p / 256⌉)``; ``sgd`` 0; ``sgd-momentum`` ``4 n_p``;
* ``A``: the bytes of the distinct storages autograd saves for backward. Which inputs and outputs
  an ATen op saves is read off autograd itself (``saved_by``: the op is run once on fake tensors
  under a saved-tensors hook); ``passes/annotate.py`` turns that into bytes per strategy;
* ``T``: transient buffers, the largest working set of one op (``passes/build_plan.py``).

In inference only ``w_p`` and ``T`` count. The optimizer's update reads the weight, its gradient
and every state and writes the weight and the states: ``n_p (3 s_p + 2 σ)`` bytes, σ the state
bytes per element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import AutoparError

# name -> (state bytes per element, update FLOPs per element)
OPTIMIZERS = {"adamw": (8.0, 10.0), "adamw8bit": (2.0 + 8 / 256, 16.0), "sgd": (0.0, 2.0), "sgd-momentum": (4.0, 3.0)}


def check_optimizer(name) -> str:
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise AutoparError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return name


def state_bytes(n: int, optimizer: str) -> float:
    """Optimizer state bytes for a shard of ``n`` elements."""
    if optimizer == "adamw8bit":
        return 2.0 * (n + 4 * math.ceil(n / 256))
    return OPTIMIZERS[optimizer][0] * n


def update_cost(n: int, itemsize: int, optimizer: str) -> tuple[float, float]:
    """(FLOPs, bytes) of one optimizer step on a shard of ``n`` elements."""
    return OPTIMIZERS[optimizer][1] * n, 3.0 * itemsize * n + 2.0 * state_bytes(n, optimizer)


@dataclass(frozen=True)
class Saved:
    """What autograd keeps of one op for backward."""

    ins: tuple[int, ...]  # positions among the op's tensor inputs
    outs: tuple[int, ...]  # positions among its outputs
    extra: float = 0.0  # other saved tensors (sdpa's logsumexp), in bytes per byte of output 0


_CACHE: dict = {}


def saved_by(node, grads: list[bool]) -> Saved:
    """Which tensor inputs (``grads[k]``: input k needs a gradient) and outputs ``node`` saves.

    The op runs once on CPU fake tensors (no memory; kernels chosen as on gloo ranks: sdpa saves
    q, k, v, its output and a logsumexp); an op that cannot run so is taken to save its inputs."""
    leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
    tens = [i for i, a in enumerate(leaves) if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)]
    if getattr(node.target, "saved_per_row", None) is not None:  # an MoE layer: its inputs (its body's rows:
        return Saved(tuple(range(len(tens))), ())                 # passes/annotate.py, _saved_charges)
    vals = [leaves[i].meta["val"] for i in tens]
    key = (node.target, tuple((tuple(v.shape), v.dtype, g) for v, g in zip(vals, grads)),
           repr([None if isinstance(a, fx.Node) else a for a in leaves]))
    if key not in _CACHE:
        _CACHE[key] = _probe(node.target, leaves, spec, tens, vals, grads)
    return _CACHE[key]


def _probe(target, leaves, spec, tens, vals, grads) -> Saved:
    from torch._subclasses.fake_tensor import FakeTensorMode

    saved = []
    try:
        with FakeTensorMode(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            args = list(leaves)
            for k, (i, v) in enumerate(zip(tens, vals)):
                args[i] = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="cpu").requires_grad_(
                    bool(grads[k]) and v.dtype.is_floating_point)
            a, kw = pytree.tree_unflatten(args, spec)
            out = target(*a, **kw)
    except Exception:
        return Saved(tuple(range(len(tens))), ())
    ins = [args[i] for i in tens]
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    s_in, s_out, extra = set(), set(), 0.0
    for t in {id(t): t for t in saved}.values():
        k = next((k for k, x in enumerate(ins) if x is t), None)
        o = next((o for o, x in enumerate(outs) if x is t), None)
        if k is not None:
            s_in.add(k)
        elif o is not None:
            s_out.add(o)
        else:
            extra += t.numel() * t.element_size()
    ref = outs[0] if outs and isinstance(outs[0], torch.Tensor) and outs[0].numel() else None
    per_out_byte = extra / (ref.numel() * ref.element_size()) if ref is not None else 0.0
    return Saved(tuple(sorted(s_in)), tuple(sorted(s_out)), per_out_byte)
