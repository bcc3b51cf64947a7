"""Keep freed host memory for reuse instead of returning it to the OS (glibc, CPU training).

glibc serves every allocation above 32 MB (at most) with a fresh ``mmap`` and unmaps it when it
is freed, so a block allocated again faults all its pages in again. A CPU training step
allocates and frees activations and gradient buckets of that size hundreds of times. Measured
on the development machine (davit_tiny CLIP, batch 8 per rank, 2 ranks, fp32, ZeRO stage 0):
~1 GB of page faults per rank per step, and DeepSpeed's flattening of the gradients for the
all-reduce alone took 4.5 s of a 9.2 s step (``docs/performance.md``). With mmap off and the heap
never trimmed, the same run faults almost nothing after its second step, its resident memory
stays flat (4.37 GB over 10 steps) and the step takes 4.8 s. The price is that the process
keeps its peak host memory until it exits, which a training process does anyway.

Only for training on CPUs: on GPUs the large tensors live in device memory (PyTorch's caching
allocator already reuses them), and host memory is the loader's. The trainer applies it at ZeRO
stage 0 only: at stages 1-2 it measured slower (DeepSpeed's partitioned optimizer step went from
0.7 to 4.3 s; not understood, so not used there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # the largest value mallopt takes: trim only above 2 GB free at the top


def keep_freed_host_memory() -> bool:
    """Make this process's large allocations reusable; returns whether glibc took the settings
    (False on other C libraries, where nothing changes)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
