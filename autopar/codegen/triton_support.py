"""Whether autopar's Triton kernels run, shared by every kernel file (flash_block, moe_permute).

A kernel runs when ``triton`` imports and its tensor is fp16, bf16 or fp32 and either on CUDA or
on the CPU under ``TRITON_INTERPRET=1`` (the interpreter; set it before triton is first imported).
Otherwise the caller's torch fallback computes the same thing.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the torch paths compute the same thing
    triton = tl = None

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreted() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_runs(t: torch.Tensor) -> bool:
    """True when a Triton kernel runs for ``t`` (module docstring)."""
    return triton is not None and t.dtype in KERNEL_DTYPES and (t.is_cuda or interpreted())
