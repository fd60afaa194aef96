"""autopar's Triton kernels and NCCL path on one GPU, each against a torch reference on the same device.

    python benchmarks/gpu_check.py [--only flash,moe,fusion,quant,sdpa,nccl] [--small]

Per kernel and shape: max abs error and max relative error (max abs / max |ref|) against a float64
(or fp32) torch reference, and the median time of the kernel vs torch eager doing the same thing.
``nccl`` compiles examples/gpt.py's GPT on a 1-rank NCCL process group and compares forward and
gradients with the plain model. Without CUDA it runs on the CPU under TRITON_INTERPRET=1 (a dry run;
use ``--small``): no times worth reading there.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, os.path.join(ROOT, "examples"), os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "codegen")):
    sys.path.insert(0, p)

import torch  # noqa: E402

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
DEV = "cuda" if CUDA else "cpu"

from autopar.codegen import flash_block as fb  # noqa: E402
from autopar.codegen import moe_permute as mp  # noqa: E402
from autopar.codegen import quantize as qz  # noqa: E402

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def bench(fn, reps=20) -> float:
    """Median ms of fn() (CUDA events on GPU; 1 rep on CPU)."""
    if not CUDA:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def err(got, ref) -> tuple[float, float]:
    """(max abs, max abs / max |ref|) over finite ref entries; inf if an infinity or NaN differs."""
    g, r = got.double(), ref.double()
    fin = torch.isfinite(r)
    if not torch.equal(fin, torch.isfinite(g)) or not torch.equal(g[~fin], r[~fin]):
        return float("inf"), float("inf")
    if not fin.any():
        return 0.0, 0.0
    a = (g[fin] - r[fin]).abs().max().item()
    return a, a / max(r[fin].abs().max().item(), 1e-30)


def row(*cells):
    print("  ".join(str(c) for c in cells), flush=True)


def dt(d):
    return str(d).removeprefix("torch.")


# ---- flash block ------------------------------------------------------------------------------

def flash_ref(q, k, v, scale, causal, q0, k0):
    s = scale * (q.double() @ k.double().transpose(-1, -2))
    if causal:
        s = s.masked_fill(~fb._allowed(q.shape[2], k.shape[2], q0, k0, q.device), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - fb._finite(lse)[..., None])
    return p @ v.double(), lse


def torch_path(mod, name, off):
    """Context: mod.name returns ``off`` (forces the torch fallback)."""
    class _C:
        def __enter__(self):
            self.old = getattr(mod, name)
            setattr(mod, name, off)

        def __exit__(self, *a):
            setattr(mod, name, self.old)
    return _C()


def check_flash(small):
    print("\n== flash block (autopar/codegen/flash_block.py): out / lse vs fp64 torch; time vs torch fallback")
    cases = [(1, 2, 5, 13, 24, False, 0, 0), (2, 1, 13, 5, 24, True, 8, 0), (1, 1, 70, 150, 24, True, 0, 0),
             (1, 2, 40, 50, 16, True, 0, 10),  # first 10 query rows see no key: out 0, lse -inf
             (2, 3, 257, 129, 80, False, 0, 0)]
    if not small:
        cases += [(2, 4, 300, 1000, 64, True, 700, 0), (1, 8, 1024, 1024, 128, True, 0, 0),
                  (4, 16, 2048, 2048, 64, True, 2048, 0), (2, 8, 4096, 4096, 128, False, 0, 0),
                  (1, 2, 200, 300, 256, True, 100, 0)]
    row("B H Lq Lk D causal q0 k0 | dtype | out abs, rel | lse abs | kernel ms | torch ms | speedup")
    for B, H, Lq, Lk, D, causal, q0, k0 in cases:
        g = torch.Generator(device=DEV).manual_seed(0)
        base = [torch.randn(B, H, n, D, device=DEV, generator=g) for n in (Lq, Lk, Lk)]
        ro, rl = flash_ref(*base, D ** -0.5, causal, q0, k0)
        for dtype in (F32, BF16, F16):
            q, k, v = (t.to(dtype) for t in base)
            kw = dict(scale=D ** -0.5, causal=causal, q_pos0=q0, k_pos0=k0)
            assert fb.backend(q) == "triton"
            o, lse = fb.attention_block(q, k, v, **kw)
            ea, er = err(o, ro)
            la, _ = err(lse, rl)
            tk = bench(lambda: fb.attention_block(q, k, v, **kw))
            with torch_path(fb, "backend", lambda q: "torch"):
                tt = bench(lambda: fb.attention_block(q, k, v, **kw))
            row(B, H, Lq, Lk, D, causal, q0, k0, "|", dt(dtype), "|", f"{ea:.2e} {er:.2e}", "|", f"{la:.2e}", "|",
                f"{tk:.3f}", "|", f"{tt:.3f}", "|", f"{tt / tk:.2f}x")


def check_sdpa(small):
    print("\n== flash block vs torch scaled_dot_product_attention (torch picks its backend), causal, q0 = k0 = 0")
    import torch.nn.functional as F

    shapes = [(1, 2, 128, 64)] if small else [(4, 16, 2048, 64), (4, 16, 4096, 128), (1, 32, 8192, 128)]
    row("B H L D | dtype | kernel ms | sdpa ms | kernel/sdpa | kernel TFLOP/s | out max abs diff")
    for B, H, L, D in shapes:
        for dtype in (BF16, F16):
            g = torch.Generator(device=DEV).manual_seed(0)
            q, k, v = (torch.randn(B, H, L, D, device=DEV, generator=g, dtype=dtype) for _ in range(3))
            tk = bench(lambda: fb.attention_block(q, k, v, scale=D ** -0.5, causal=True))
            ts = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            diff = (fb.attention_block(q, k, v, scale=D ** -0.5, causal=True)[0].float()
                    - F.scaled_dot_product_attention(q, k, v, is_causal=True).float()).abs().max().item()
            flops = 4 * B * H * L * L * D / 2
            row(B, H, L, D, "|", dt(dtype), "|", f"{tk:.3f}", "|", f"{ts:.3f}", "|", f"{tk / ts:.2f}", "|",
                f"{flops / tk / 1e9:.0f}", "|", f"{diff:.2e}")


def check_tune(small):
    """Sweep the flash block kernel's launch config (fb._attention_block_triton's choice is marked *)."""
    import math

    import triton

    print("\n== flash block launch configs (block_m, block_n, warps, stages): ms, out rel err; * = current choice")
    cases = [(1, 2, 70, 150, 24, True, 0, 0, F32)] if small else [
        (2, 4, 300, 1000, 64, True, 700, 0, F32), (1, 8, 1024, 1024, 128, True, 0, 0, F32),
        (2, 8, 4096, 4096, 128, False, 0, 0, F32), (4, 16, 4096, 4096, 64, True, 0, 0, BF16),
        (4, 16, 4096, 4096, 128, True, 0, 0, BF16)]
    for B, H, Lq, Lk, D, causal, q0, k0, dtype in cases:
        g = torch.Generator(device=DEV).manual_seed(0)
        q, k, v = (torch.randn(B, H, n, D, device=DEV, generator=g).to(dtype) for n in (Lq, Lk, Lk))
        ro, _ = flash_ref(q, k, v, D ** -0.5, causal, q0, k0)
        cur = fb.attention_block(q, k, v, scale=D ** -0.5, causal=causal, q_pos0=q0, k_pos0=k0)[0]
        tcur = bench(lambda: fb.attention_block(q, k, v, scale=D ** -0.5, causal=causal, q_pos0=q0, k_pos0=k0))
        res = [(tcur, "*current", err(cur, ro)[1])]
        block_d = max(16, triton.next_power_of_2(D))
        ms = (32, 64) if dtype == F32 else (64, 128)
        ns = (16, 32, 64) if dtype == F32 else (32, 64, 128)
        for bm in ms:
            for bn in ns:
                for warps in (4, 8):
                    for stages in ((1, 2) if dtype == F32 else (2, 3)):
                        out = torch.empty_like(q)
                        lse = torch.empty((B, H, Lq), dtype=torch.float32, device=DEV)

                        def go():
                            fb._attention_block_kernel[(triton.cdiv(Lq, bm), B * H)](
                                q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                                H, Lq, Lk, D, D ** -0.5 * math.log2(math.e), q0, k0, CAUSAL=causal,
                                PRECISION="ieee" if dtype == F32 else None, UPCAST=not CUDA and dtype == BF16,
                                BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
                        try:
                            go()
                            res.append((bench(go), (bm, bn, warps, stages), err(out, ro)[1]))
                        except Exception as exc:  # noqa: BLE001  out of shared memory etc.
                            res.append((float("inf"), (bm, bn, warps, stages), type(exc).__name__))
        res.sort(key=lambda r: r[0])
        row(B, H, Lq, Lk, D, causal, dt(dtype), "|", " ".join(
            f"{c}:{t:.3f}ms/{e if isinstance(e, str) else f'{e:.1e}'}" for t, c, e in res[:6]),
            "| current", f"{tcur:.3f}ms", "| failed:", sum(t == float("inf") for t, _, _ in res))


# ---- MoE permute / combine --------------------------------------------------------------------

def routing(T, k, E, drop, g):
    experts = torch.rand(T, E, device=DEV, generator=g).topk(k, -1).indices  # [T, k]
    order = torch.sort(experts.reshape(-1), stable=True).indices  # permuted slot -> flat (t, j)
    rows = order // k
    inv = torch.empty(T * k, dtype=torch.int64, device=DEV)
    inv[order] = torch.arange(T * k, device=DEV)
    inv = inv.view(T, k)
    inv = torch.where(torch.rand(T, k, device=DEV, generator=g) < drop, -1, inv)
    return rows, inv


def check_moe(small):
    print("\n== MoE permute_rows / combine (autopar/codegen/moe_permute.py): fwd + bwd vs the fp64 torch path; "
          "time fwd+bwd vs torch fallback")
    shapes = [(5, 24, 2, 3), (300, 1000, 2, 8)] + ([] if small else [(4096, 1000, 2, 8), (8192, 4096, 2, 64),
                                                                        (16384, 2048, 4, 64)])
    row("op T H k E | dtype | out abs, rel | grad abs, rel | gradw abs, rel | kernel ms | torch ms | speedup")
    for T, H, k, E in shapes:
        g = torch.Generator(device=DEV).manual_seed(1)
        rows, inv = routing(T, k, E, 0.1, g)
        x64 = torch.randn(T, H, device=DEV, generator=g, dtype=torch.float64)
        y64 = torch.randn(T * k, H, device=DEV, generator=g, dtype=torch.float64)
        w64 = torch.rand(T, k, device=DEV, generator=g, dtype=torch.float64)
        gp64 = torch.randn(T * k, H, device=DEV, generator=g, dtype=torch.float64)
        gc64 = torch.randn(T, H, device=DEV, generator=g, dtype=torch.float64)

        def perm(x, gout):
            x = x.detach().requires_grad_()
            out = mp.permute_rows(x, rows)
            (gx,) = torch.autograd.grad(out, x, gout)
            return out, gx, None

        def comb(y, w, gout):
            y, w = y.detach().requires_grad_(), w.detach().requires_grad_()
            out = mp.combine(y, inv, w)
            gy, gw = torch.autograd.grad(out, (y, w), gout)
            return out, gy, gw

        for name, fn, args64 in (("permute", perm, (x64, gp64)), ("combine", comb, (y64, w64, gc64))):
            ref = fn(*args64)
            for dtype in (F32, BF16):
                args = [a.to(dtype) for a in args64]
                assert mp.uses_triton(args[0])
                got = fn(*args)
                cells = ["-" if rr is None else "{:.2e} {:.2e}".format(*err(gg, rr)) for gg, rr in zip(got, ref)]
                tk = bench(lambda: fn(*args))
                with torch_path(mp, "uses_triton", lambda t: False):
                    tt = bench(lambda: fn(*args))
                row(name, T, H, k, E, "|", dt(dtype), "|", " | ".join(cells), "|", f"{tk:.3f}", "|", f"{tt:.3f}", "|",
                    f"{tt / tk:.2f}x")


# ---- fusion -----------------------------------------------------------------------------------

def check_fusion(small):
    print("\n== fused kernels (autopar/codegen/fusion.py, the tests' groups): fwd vs fp32 eager; bwd vs eager; "
          "fwd time vs eager")
    import test_fusion as tf

    from autopar.codegen import fusion

    shapes = [(7, 33), (3, 1500)] + ([] if small else [(4096, 1000), (8192, 4096), (1024, 16384)])
    row("group R C | dtype | fwd abs, rel (worst output) | bwd abs, rel | fused ms | eager ms | speedup")
    for name in ("bias_gelu", "bias_residual_layernorm", "softmax", "rmsnorm", "casts", "where_max", "misc"):
        for R, C in shapes:
            for dtype in (F32, BF16):
                fn, _, args = tf._inputs(name, R, C, dtype)
                args = [a.detach().to(DEV).requires_grad_(a.requires_grad) for a in args]
                run, op, _ = tf._fused(fn, *args)
                assert fusion.uses_kernel(op, args)
                tup = lambda t: (t,) if isinstance(t, torch.Tensor) else tuple(t)  # noqa: E731
                got = tup(run(*args))
                exact = tup(fn(*[a.detach().float() if a.dtype == BF16 else a.detach() for a in args]))
                fw = max((err(gg, e) for gg, e in zip(got, exact)), key=lambda t: t[1])
                want = tup(fn(*args))
                leaves = [a for a in args if a.requires_grad]
                douts = [torch.randn_like(w) for w in want]
                ref = torch.autograd.grad(want, leaves, douts)
                res = torch.autograd.grad(got, leaves, douts)
                bw = max((err(s, r) for s, r in zip(res, ref)), key=lambda t: t[1])
                with torch.no_grad():
                    tk = bench(lambda: run(*args))
                    tt = bench(lambda: fn(*args))
                row(name, R, C, "|", dt(dtype), "|", f"{fw[0]:.2e} {fw[1]:.2e}", "|", f"{bw[0]:.2e} {bw[1]:.2e}", "|",
                    f"{tk:.3f}", "|", f"{tt:.3f}", "|", f"{tt / tk:.2f}x")


# ---- quantize ---------------------------------------------------------------------------------

def check_quant(small):
    print("\n== int8 quantize / dequantize_sum (autopar/codegen/quantize.py) vs its torch reference; times vs it")
    cases = [(37, 64), (1000, 64), (200, 7), (4099, 256)] + ([] if small else [(10_000_003, 64), (10_000_003, 4096),
                                                                               (50_000_000, 64)])
    row("n block | dtype | scale max abs | code max diff, frac | dequant err / (s/2) | dqsum(4) abs | "
        "q ms | torch q ms | dqsum ms | torch dqsum ms")
    for n, block in cases:
        for dtype in (F32, BF16):
            g = torch.Generator(device=DEV).manual_seed(n)
            x = (torch.randn(n, device=DEV, generator=g) * torch.rand(n, device=DEV, generator=g) * 10).to(dtype)
            assert qz.kernel_runs(x)
            q, s = qz.quantize(x, block)
            qr, sr = qz._quantize_torch(x, block)
            sa = (s - sr).abs().max().item()
            cd = (q.int() - qr.int()).abs()
            y = qz.dequantize(q, s, block, F32)
            step = s.repeat_interleave(block)[:n] / 2
            bound = ((y.double() - x.double()).abs() / step.double().clamp(min=1e-30)).max().item()
            qs, ss = torch.stack([q, -q, q, q]), torch.stack([s, 2 * s, s, 0.5 * s])
            da = (qz.dequantize_sum(qs, ss, block) - qz._dequantize_sum_torch(qs, ss, block)).abs().max().item()
            t = [bench(lambda: qz.quantize(x, block)), bench(lambda: qz._quantize_torch(x, block)),
                 bench(lambda: qz.dequantize_sum(qs, ss, block)), bench(lambda: qz._dequantize_sum_torch(qs, ss, block))]
            row(n, block, "|", dt(dtype), "|", f"{sa:.1e}", "|", f"{cd.max().item()} {cd.float().mean().item():.1e}", "|",
                f"{bound:.3f}", "|", f"{da:.1e}", "|", " | ".join(f"{v:.3f}" for v in t))


# ---- NCCL: autopar.compile on one rank --------------------------------------------------------

def check_nccl(small):
    print(f"\n== autopar.compile of examples/gpt.py on a 1-rank {'NCCL' if CUDA else 'gloo'} group: "
          "forward + backward vs the plain model")
    import torch.distributed as dist

    import autopar
    import gpt
    from models import rel_err

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    if CUDA:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if CUDA else "gloo", rank=0, world_size=1)
    configs = [("tiny", dict(vocab=128, d=64, heads=4, layers=2, max_len=64), 4, 16)]
    if not small:
        configs += [("d512", dict(vocab=8192, d=512, heads=8, layers=4, max_len=512), 8, 512)]
    row("model | mesh | fusion backend, kernels | out rel err | max grad rel err | loss | fixups | pm ms | eager ms")
    for name, cfg, batch, seq in configs:
        for axes, extra in (({"dp": 1}, {}), ({"tp": 1}, {})):
            torch.manual_seed(0)
            model = gpt.GPT(**cfg).to(DEV)
            ids = torch.randint(0, cfg["vocab"], (batch, seq), device=DEV)
            ref = copy.deepcopy(model)
            try:
                pm = autopar.compile(model, autopar.Mesh(axes, hardware="h100-sxm"), (ids,), **extra)
            except Exception as exc:  # noqa: BLE001  report and go on
                row(name, axes, "| compile failed:", type(exc).__name__, str(exc)[:300])
                continue
            y, y_ref = pm(ids), ref(ids)
            y.float().pow(2).mean().backward()
            y_ref.float().pow(2).mean().backward()
            rp = dict(ref.named_parameters())
            gerr = max(rel_err(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad, rp[f].grad)
                       for f, p in pm.named_parameters())
            rec = pm.plan.fusion

            def step(m):
                return lambda: m(ids).float().pow(2).mean().backward()
            tp, te = bench(step(pm), 10), bench(step(ref), 10)
            row(name, axes, "|", rec["backend"], len(rec["kernels"]), "|", f"{rel_err(y, y_ref):.2e}", "|", f"{gerr:.2e}",
                "|", f"{y.float().pow(2).mean().item():.5f}", "|", list(pm.runtime_fixups)[:3], "|", f"{tp:.2f}", "|",
                f"{te:.2f}")
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="flash,moe,fusion,quant,sdpa,nccl")
    ap.add_argument("--small", action="store_true", help="small shapes only (the CPU dry run)")
    a = ap.parse_args()
    import triton

    print(f"device: {torch.cuda.get_device_name() if CUDA else 'cpu (TRITON_INTERPRET=1)'}; torch {torch.__version__}, "
          f"triton {triton.__version__}")
    checks = dict(tune=check_tune, flash=check_flash, moe=check_moe, fusion=check_fusion, quant=check_quant, sdpa=check_sdpa,
                  nccl=check_nccl)
    failed = []
    for name in a.only.split(","):
        try:
            checks[name](a.small)
        except Exception:  # noqa: BLE001  one failing check must not hide the others
            import traceback

            traceback.print_exc()
            failed.append(name)
    print("\nFAILED checks:" if failed else "\nall checks ran", " ".join(failed), flush=True)


if __name__ == "__main__":
    main()
