"""``plan_batch``: split one packed batch of varied-length sequences over SP groups of varied sizes.

    plan = autopar.plan_batch(lengths, autopar.Mesh({"dp": 64}, hardware="h100-sxm"), model="llama3-8b")
    plan.groups[0].size, plan.groups[0].first_device, plan.groups[0].sequences, plan.max_time_s

The mesh gives only the device count and hardware (its axes do not matter); the model gives only
its shape.  :func:`seq_cost` turns both into :class:`~autopar.solvers.seq_batch.SeqCost`, for
training with ZeRO-3 over the whole mesh and full activation checkpointing, as in FlexSP:

* α₂ = 4·2·P_dense / (peak·eff): matmul FLOPs per token (P_dense: the layers' and the LM head's
  weights), four forward passes' worth per step (forward, recomputation, backward = 2 forwards);
* α₁ = 4·2·h·L / (peak·eff): causal attention, 2·s²·h FLOPs per layer forward (QKᵀ and PV, half
  the pairs), four passes;
* c = 3·L·(2h + 2h_kv)·bytes: Ulysses moves q, k, v and the output (forward, recomputation, and
  their gradients in backward); a = 12·L all-to-alls;
* m = bytes·(L·h + 2·(5h + 2h_kv + 4f)): each layer's checkpointed input, plus one layer's
  activations and their gradients while it is recomputed (logits assumed chunked);
* state = 16·P / N bytes (bf16 weights and gradients, fp32 master weights and Adam moments, sharded
  over all N devices; embeddings counted untied); D = the largest power of two dividing the heads.

``recompute=False`` keeps every layer's activations (m = bytes·L·(5h + 2h_kv + 4f)) and runs three
passes (c and a shrink by a third).  ZeRO-3's gathers cost every plan the same and are left out.
On h100-sxm, ``benchmarks/plan_batch.py`` measures ~1.02x over the best static degree for 1000
lognormal sequences on 64 GPUs (a node-local static degree already balances them; no plan can do
better than ~1.02x there), and ~1.1x when the longest sequence forces a multi-node static degree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cost_models.hardware import Hardware, load_hardware
from .errors import AutoparError, InfeasibleError
from .mesh import Mesh
from .solvers.seq_batch import BatchPlan, SeqCost, degrees, solve

__all__ = ["ModelDims", "seq_cost", "plan_batch", "BatchPlan"]

EFFICIENCY = 0.5  # achieved / peak FLOP/s of the matmuls and attention kernels
STATE_BYTES_PER_PARAM = 16


@dataclass(frozen=True)
class ModelDims:
    """A transformer's shape; ``gated``: a SwiGLU MLP (three ffn matrices, else two)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    dtype_bytes: int = 2
    gated: bool = True

    @classmethod
    def of(cls, model: str | dict) -> "ModelDims":
        """From a preset name of :data:`autopar.models.PRESETS` (not built) or a dict of these fields."""
        if isinstance(model, dict):
            missing = [k for k in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab") if k not in model]
            unknown = sorted(set(model) - set(cls.__dataclass_fields__))
            if missing or unknown:
                raise AutoparError(f"model dims {model} lack {missing} / have unknown keys {unknown}")
            return cls(**model)
        from .models import PRESETS

        if model not in PRESETS:
            raise AutoparError(f"unknown model {model!r}: use a preset ({', '.join(PRESETS)}) or a dict of dims")
        cfg = PRESETS[model].config
        if "n_embd" in cfg:  # gpt2 family
            h = cfg["n_embd"]
            return cls(cfg["n_layer"], h, cfg["n_head"], cfg["n_head"], 4 * h, cfg["vocab_size"], gated=False)
        return cls(cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
                   cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["vocab_size"])


def seq_cost(dims: ModelDims, hw: Hardware, n_devices: int, memory_limit_bytes: float | None = None,
             recompute: bool = True) -> SeqCost:
    """The coefficients of the module docstring (``recompute=False``: 3 passes, 2 all-to-all rounds, all
    layers' activations kept)."""
    h, L, nb = dims.hidden, dims.layers, dims.dtype_bytes
    h_kv = h // dims.heads * dims.kv_heads
    dense = L * (2 * h * h + 2 * h * h_kv + (3 if dims.gated else 2) * h * dims.ffn) + h * dims.vocab
    flops = hw.peak("bfloat16" if nb == 2 else "float32") * EFFICIENCY
    passes, layer = (4 if recompute else 3), 5 * h + 2 * h_kv + 4 * dims.ffn  # a layer's saved activations
    return SeqCost(
        alpha1=passes * 2 * h * L / flops, alpha2=passes * 2 * dense / flops,
        a2a_bytes_per_token=(passes - 1) * L * (2 * h + 2 * h_kv) * nb, a2a_per_step=4 * (passes - 1) * L,
        bw_intra=hw.intra_node.bandwidth_Bps, bw_inter=hw.inter_node.bandwidth_Bps,
        lat_intra=hw.intra_node.latency_s, lat_inter=hw.inter_node.latency_s, devices_per_node=hw.devices_per_node,
        act_bytes_per_token=nb * (L * h + 2 * layer if recompute else L * layer),
        state_bytes=STATE_BYTES_PER_PARAM * (dense + h * dims.vocab) / n_devices,
        memory_bytes=hw.memory_capacity_bytes if memory_limit_bytes is None else memory_limit_bytes,
        max_degree=dims.heads & -dims.heads)


def plan_batch(lengths, mesh: Mesh, *, model: str | dict = "llama3-8b", hardware: str | Hardware | None = None,
               memory_limit_bytes: float | None = None, recompute: bool = True, time_limit_s: float = 2.0) -> BatchPlan:
    """Assign the sequences of ``lengths`` to SP groups within ``mesh.size`` devices (FlexSP).

    ``time_limit_s`` is CP-SAT deterministic time.  Raises :class:`AutoparError` on bad input and
    :class:`InfeasibleError` when a sequence fits no group, or the batch fits no set of groups.
    """
    ints = isinstance(lengths, (list, tuple)) and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in lengths)
    arr = np.asarray(lengths, dtype=np.int64) if ints else lengths if isinstance(lengths, np.ndarray) else None
    if arr is None or arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu" or (arr < 1).any():
        bad = [(i, v) for i, v in enumerate(arr.tolist()) if v < 1] if ints and len(arr) else []
        raise AutoparError(f"lengths must be a non-empty 1-D list or array of positive ints, got "
                           f"{f'(index, length) {bad[:10]}' if bad else repr(lengths)[:200]}")
    hw = mesh.hardware_spec if hardware is None else hardware if isinstance(hardware, Hardware) \
        else load_hardware(hardware)
    dims = ModelDims.of(model)
    cost = seq_cost(dims, hw, mesh.size, memory_limit_bytes, recompute)
    d_max = degrees(cost, mesh.size)[-1]
    too_long = [(int(k), int(arr[k])) for k in np.flatnonzero(arr > cost.capacity(d_max))]
    if too_long:
        raise InfeasibleError(
            f"sequence(s) (index, length) {too_long[:10]} fit no SP group: even {d_max} devices (the largest degree: "
            f"heads={dims.heads}, mesh={mesh.size}) hold only {cost.capacity(d_max)} tokens of {model} in "
            f"{cost.memory_bytes / 1e9:.1f} GB each; split or truncate them, or use more devices or memory")
    return solve(arr.astype(np.int64), cost, mesh.size, time_limit_s=time_limit_s)
