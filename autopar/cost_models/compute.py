"""Compute cost of one ATen op: FLOPs, bytes moved, and a roofline time.

``op`` is the op's string form (``str(torch.ops.aten.mm.default) == "aten.mm.default"``); shapes
are tuples of ints, ``None`` for non-tensor arguments, or lists of shapes for tensor-list arguments.
FLOP formulas follow ``torch.utils.flop_counter`` (a multiply-add is 2 FLOPs):

* mm/matmul/linear/bmm/mv/dot: 2·numel(out)·K, K the contracted size (last dim of the first matrix);
  addmm/baddbmm/addmv: the same with the first matrix after the bias; addbmm also sums over batch.
* scaled dot-product attention, q (…, L, E), k (…, S, E), v (…, S, Ev):
  2·B·H·L·S·E + 2·B·H·L·S·Ev with B·H = Π q.shape[:-2] (query heads, so GQA counts correctly);
  masks and causality are ignored. Backward ops: 2× the forward.
* convolution, weight (Cout, Cin/groups, *kernel): 2·numel(out)·(Cin/groups)·Π kernel;
  convolution_backward: 2× that (grad input + grad weight). Transposed convs are not special-cased.
* embedding, views, metadata and pure copies: 0.
* reductions: numel of the largest input; everything else (elementwise): numel of the largest output.
"""

from __future__ import annotations

import math
import re

from autopar.cost_models.hardware import Hardware

# name -> index of the first matrix in in_shapes (after any bias)
_MATMULS = {"mm": 0, "matmul": 0, "linear": 0, "bmm": 0, "mv": 0, "dot": 0, "vdot": 0,
            "addmm": 1, "baddbmm": 1, "addmv": 1, "addbmm": 1}
_SDPA = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
         "_scaled_dot_product_flash_attention_for_cpu"}
_CONV = {"convolution", "_convolution", "conv1d", "conv2d", "conv3d"}
_VIEWS = {"view", "reshape", "_unsafe_view", "_reshape_alias", "permute", "transpose", "t", "expand",
          "expand_as", "view_as", "unsqueeze", "squeeze", "slice", "select", "split", "split_with_sizes",
          "unbind", "chunk", "narrow", "unflatten", "flatten", "movedim", "as_strided", "diagonal",
          "getitem", "alias", "detach", "lift_fresh", "sym_size", "sym_numel", "sym_stride",
          "_assert_tensor_metadata", "empty", "empty_like", "empty_strided", "new_empty"}
_MOVES = {"clone", "copy", "_to_copy", "contiguous", "cat", "stack", "embedding", "index_select",
          "gather", "index"}  # 0 FLOPs but real bytes
_GATHERS = {"embedding", "index_select", "gather", "index"}  # read only the rows they return
_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "prod", "var", "std", "var_mean",
               "std_mean", "norm", "linalg_vector_norm", "logsumexp", "argmax", "argmin", "any", "all"}


def op_name(op) -> str:
    """``"aten.addmm.default"`` / ``"aten::addmm"`` / ``"addmm"`` -> ``"addmm"``; in-place ``add_`` -> ``add``."""
    text = re.sub(r"^<built-in function (\w+)>$", r"\1", str(op).replace("::", "."))
    parts = [p for p in text.split(".") if p not in ("torch", "ops", "aten", "prims", "operator", "_operator")]
    name = parts[0] if parts else text
    return name.rstrip("_") or name


def op_flops(op: str, in_shapes: list, out_shapes: list) -> float:
    """FLOPs of one call of ``op`` (formulas in the module docstring)."""
    name = op_name(op)
    if name in _MATMULS:
        first = in_shapes[_MATMULS[name]]
        k = first[-1] * (first[0] if name == "addbmm" else 1)
        return 2.0 * _largest(out_shapes) * k
    if name in _SDPA or name.removesuffix("_backward") in _SDPA:
        q, k, v = in_shapes[1:4] if name.endswith("_backward") else in_shapes[:3]
        bh, L, E, S, Ev = math.prod(q[:-2]), q[-2], q[-1], k[-2], v[-1]
        fwd = 2.0 * bh * L * S * E + 2.0 * bh * L * S * Ev
        return 2 * fwd if name.endswith("_backward") else fwd
    if name in _CONV:
        return 2.0 * _largest(out_shapes) * math.prod(in_shapes[1][1:])
    if name == "convolution_backward":  # (grad_out, input, weight, ...)
        return 2 * 2.0 * _numel(in_shapes[0]) * math.prod(in_shapes[2][1:])
    if name in _VIEWS or name in _MOVES:
        return 0.0
    if name in _REDUCTIONS:
        return float(_largest(in_shapes))
    return float(_largest(out_shapes))


def op_bytes(op: str, in_shapes: list, out_shapes: list, itemsize: int) -> float:
    """Bytes read + written, all at ``itemsize``: Σ numel(inputs) + Σ numel(outputs); 0 for views.

    Gathers (embedding, index_select, gather, index) read only the rows they return, so the table
    counts as numel(out), not its full size.
    """
    name = op_name(op)
    if name in _VIEWS:
        return 0.0
    reads = _numel(in_shapes[1:]) + _numel(out_shapes) if name in _GATHERS else _numel(in_shapes)
    return float((reads + _numel(out_shapes)) * itemsize)


def compute_time(flops: float, nbytes: float, dtype: str, hw: Hardware) -> float:
    """Roofline seconds: max(flops / peak(dtype), nbytes / memory bandwidth)."""
    return max(flops / hw.peak(dtype), nbytes / hw.memory_bandwidth_Bps)


def _is_shape(x) -> bool:
    """A shape is a tuple of ints (``()`` is a scalar) or a non-empty list of ints."""
    ints = all(isinstance(d, int) or hasattr(d, "__index__") for d in x) if isinstance(x, (tuple, list)) else False
    return ints and (isinstance(x, tuple) or len(x) > 0)


def _numel(x) -> int:
    """Elements in a shape, or summed over a (nested) list of shapes; None counts 0."""
    if x is None:
        return 0
    if _is_shape(x):
        return math.prod(int(d) for d in x)
    return sum(_numel(s) for s in x)


def _largest(x) -> int:
    """numel of the largest tensor in a shape or (nested) list of shapes; 0 if none."""
    if x is None:
        return 0
    if _is_shape(x):
        return _numel(x)
    return max((_largest(s) for s in x), default=0)
