"""autopar's memory model against torch.cuda.max_memory_allocated, on one GPU.

    python benchmarks/gpu_memory.py [--small] [--only gpt,llama] [--dtypes fp32,bf16] [--meshes dp,tp]

On a 1-rank NCCL group, with mesh {"dp": 1} and {"tp": 1} on hardware "h100-sxm", it compiles
(a) examples/gpt.py's GPT with its next-token loss inside (``WithLoss``; d=1024, 16 heads, 8 layers,
vocab 32000, batch 8 x 1024) and (b) a HF LlamaForCausalLM (hidden 1024, 8 layers, 16 heads, 8 kv
heads, intermediate 2816, vocab 32000) wrapped with the same loss, in fp32 and bf16. Each is trained
with torch.optim.AdamW: a warm-up step, then one measured forward + backward + step. The same is run
for the plain eager model (no autopar), so a reader sees what autopar's runtime costs on top.

Measured (all from torch.cuda.memory_allocated, so the CUDA context and NCCL's own buffers are out;
the cuBLAS workspaces are created before the baseline, so they are out too):

* parameters: allocated after the model is on the device and compiled, minus the baseline;
* param.stor: distinct storages of the parameters (the same without the allocator);
* optimizer: allocated after the warm-up step (gradients set to None), minus the parameters;
* opt.states: distinct storages of the optimizer's state tensors on the device;
* gradients: distinct storages of the .grad tensors after the measured backward;
* activations: the distinct storages a saved-tensors hook sees packed during the measured forward
  (parameters excluded; as benchmarks/memory_check.py counts them, through autopar's own
  ``Executor._pack`` for the compiled model);
* act.live: allocated at the end of the forward minus before it (what the forward left alive);
* peak f+b: max_memory_allocated over forward + backward minus the baseline (the plan's
  ``peak_memory_bytes`` = parameters + gradients + optimizer + activations + transient is taken to
  be this; it does not model the optimizer step);
* peak step: max_memory_allocated during optimizer.step() minus the baseline (not in the plan).

Without CUDA it runs tiny sizes on a 1-rank gloo group on the CPU (a dry run of the logic): the
CUDA-only columns are then "-".
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, os.path.join(ROOT, "examples")):
    sys.path.insert(0, p)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
try:  # the infeasibility explainer (autopar/solvers/feasibility.py) needs z3; without it, no memory limit
    import z3  # noqa: F401

    LIMIT = None  # the hardware's capacity
except ImportError:
    LIMIT = float("inf")  # one device holds every layout alike: the limit changes no plan here
KINDS = ("parameters", "gradients", "optimizer", "activations", "transient")


class LlamaWithLoss(nn.Module):
    """LlamaForCausalLM with the next-token loss inside (as examples/gpt.py's WithLoss)."""

    def __init__(self, small: bool):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        size = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, vocab_size=256, max_position_embeddings=64) if small else
                dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
                     intermediate_size=2816, vocab_size=32000, max_position_embeddings=1024))
        cfg = LlamaConfig(attn_implementation="sdpa", use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                          tie_word_embeddings=False, **size)
        self.lm = LlamaForCausalLM(cfg)

    def forward(self, ids):
        logits = self.lm(ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def build(name: str, small: bool):
    """(model on CPU in fp32, ids on DEV)."""
    import gpt

    torch.manual_seed(0)
    if name == "gpt":
        cfg = (dict(vocab=256, d=64, heads=4, layers=2, max_len=64) if small else
               dict(vocab=32000, d=1024, heads=16, layers=8, max_len=1024))
        model, vocab = gpt.WithLoss(**cfg), cfg["vocab"]
    else:
        model = LlamaWithLoss(small)
        vocab = model.lm.config.vocab_size
    batch, seq = (2, 32) if small else (8, 1024)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(DEV)
    return model, ids


def allocated() -> int | None:
    if CUDA:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return None


def minus(a, *b):
    return None if a is None or None in b else a - sum(b)


def local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def storages(tensors) -> int:
    seen = {}
    for t in tensors:
        s = local(t).untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


class SavedCounter:
    """Distinct storages packed for backward during a forward, parameters excluded
    (tests/models.py ``saved_activation_bytes``, with an outer hook for anything outside the executor)."""

    def __init__(self, module):
        self.params = {local(p).untyped_storage().data_ptr() for p in module.parameters()}
        self.saved: dict[int, int] = {}

    def note(self, t):
        x = t[1] if isinstance(t, tuple) else t
        if isinstance(x, torch.Tensor):
            s = local(x).untyped_storage()
            if s.data_ptr() not in self.params:
                self.saved[s.data_ptr()] = s.nbytes()

    def __enter__(self):
        from autopar.codegen import runtime

        self._orig = orig = runtime.Executor._pack
        counter = self

        def pack(ex, t):
            kept = orig(ex, t)
            counter.note(kept)
            return kept

        runtime.Executor._pack = pack
        self._hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: (self.note(t), t)[1], lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        from autopar.codegen import runtime

        self._hooks.__exit__(*exc)
        runtime.Executor._pack = self._orig

    @property
    def total(self) -> int:
        return sum(self.saved.values())


def measure(name, dtype, axes, small):
    """One row: (predicted dict or None, measured dict, compile seconds)."""
    import autopar

    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    model, ids = build(name, small)  # on the CPU; ids (a few KiB) already on DEV
    base = allocated()
    model = model.to(DEV, dtype)
    t0 = time.perf_counter()
    if axes is None:
        run, plan = model, None
    else:
        run = autopar.compile(model, autopar.Mesh(axes, hardware="h100-sxm"), (ids,), memory_limit_bytes=LIMIT)
        plan = run.plan
    compile_s = time.perf_counter() - t0
    del model
    gc.collect()
    meas = {"parameters": minus(allocated(), base),
            "param.stor": storages(run.parameters())}
    opt = torch.optim.AdamW(run.parameters(), lr=1e-4)

    run(ids).backward()  # warm-up: optimizer state, kernels, autotuning
    opt.step()
    opt.zero_grad(set_to_none=True)
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    state = allocated()
    meas["optimizer"] = minus(state, base, meas["parameters"] or 0)
    meas["opt.states"] = storages(v for st in opt.state.values() for v in st.values()
                                  if isinstance(v, torch.Tensor) and local(v).device.type == DEV)

    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    with SavedCounter(run) as counter:
        loss = run(ids)
    meas["activations"] = counter.total
    meas["act.live"] = minus(allocated(), state)
    loss.backward()
    del loss
    meas["peak f+b"] = torch.cuda.max_memory_allocated() - base if CUDA else None
    meas["gradients"] = storages(p.grad for p in run.parameters() if p.grad is not None)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    opt.step()
    meas["peak step"] = torch.cuda.max_memory_allocated() - base if CUDA else None
    opt.zero_grad(set_to_none=True)
    pred = None
    if plan is not None:
        pred = dict(plan.memory)
        pred["peak f+b"] = plan.peak_memory_bytes
    del run, opt, counter
    return pred, meas, compile_s


def mib(x):
    return "-" if x is None else f"{x / 2**20:,.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny sizes (the CPU dry run)")
    ap.add_argument("--only", default="gpt,llama")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--meshes", default="eager,dp,tp")
    a = ap.parse_args()
    small = a.small or not CUDA
    import torch.distributed as dist

    if CUDA:
        torch.cuda.set_device(0)
        for dt in DTYPES.values():  # create the cuBLAS workspaces before any baseline
            w = torch.randn(64, 64, device=DEV, dtype=dt, requires_grad=True)
            (w @ w).sum().backward()
        del w
    dist.init_process_group("nccl" if CUDA else "gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    print(f"device: {torch.cuda.get_device_name() if CUDA else 'cpu (dry run, tiny sizes)'}; torch {torch.__version__}; "
          f"memory limit: {'h100-sxm capacity' if LIMIT is None else 'none (no z3)'}; sizes: {'tiny' if small else 'd=1024, 8 layers, batch 8 x 1024, vocab 32000'}; MiB", flush=True)
    meshes = {"eager": None, "dp": {"dp": 1}, "tp": {"tp": 1}}
    cols = ("parameters", "optimizer", "gradients", "activations", "transient", "peak f+b")
    for name in a.only.split(","):
        for dn in a.dtypes.split(","):
            print(f"\n== {name} {dn}")
            print(f"{'run':<6} {'kind':<12} {'predicted':>10} {'measured':>10} {'pred/meas':>9}", flush=True)
            for mn in a.meshes.split(","):
                try:
                    pred, meas, cs = measure(name, DTYPES[dn], meshes[mn], small)
                except Exception as exc:  # noqa: BLE001  report and go on
                    import traceback

                    traceback.print_exc()
                    print(f"{mn:<6} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    continue
                for k in cols + ("act.live", "param.stor", "opt.states", "peak step"):
                    p = pred.get(k) if pred else None
                    m = meas.get(k)
                    r = f"{p / m:.2f}" if p is not None and m else "-"
                    print(f"{mn:<6} {k:<12} {mib(p):>10} {mib(m):>10} {r:>9}")
                if pred is not None:
                    print(f"{mn:<6} (compile {cs:.1f} s; predicted peak = sum of {', '.join(KINDS)})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
