"""Which scaled-dot-product attention kernel a training step uses, by device and precision.

PyTorch picks its flash-attention kernel for ``F.scaled_dot_product_attention`` on CPUs too. Its
forward is the fastest there, but its **bf16 backward** is several times slower than the
unfused "math" path (two matmuls and a softmax, differentiated by autograd). Measured on the
development machine (1 thread, DaViT-Tiny's window attention at 256 px, 800 windows x 3 heads x
49 tokens): flash 19 ms forward + 359 ms backward, math 61 + 60 ms; in fp32 flash wins
(21 + 54 against 46 + 53 ms). A whole davit_tiny CLIP step (batch 8, bf16 weights) goes from
0.51 + 2.02 s to 0.68 + 1.05 s (``docs/performance.md``).

So the default (``auto``) trains with the math kernel on CPUs at bf16/fp16 and leaves PyTorch's
choice everywhere else (on GPUs its flash and memory-efficient kernels are the fast ones).
Evaluation forwards keep PyTorch's choice: without a backward, flash is the fast one there.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pretrain.engine.config import AttentionKernel


def uses_math_kernel(choice: AttentionKernel, device: torch.device,
                     compute_dtype: torch.dtype) -> bool:
    """Whether training under ``choice`` restricts attention to the math kernel."""
    if choice == "auto":
        return device.type == "cpu" and compute_dtype in (torch.bfloat16, torch.float16)
    return choice == "math"


def training_attention(choice: AttentionKernel, device: torch.device,
                       compute_dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """A context for a training forward and its backward (activation checkpointing recomputes
    the forward inside the backward, and must pick the same kernel)."""
    if uses_math_kernel(choice, device, compute_dtype):
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()
