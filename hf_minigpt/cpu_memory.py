"""Large tensors on the CPU reuse the memory freed before them, where glibc's malloc would hand it back to the OS: an
option of the training scripts and the benchmark (`--reuse_freed_memory`), faster steps for a higher peak.

glibc maps each allocation of more than 32 MB on its own and unmaps it when it is freed, so the next tensor of that
size starts on fresh pages, which the kernel zeroes on first touch. A training step allocates and frees such tensors
every step (the loss's logits, gradients, activations). On the AMD EPYC with AVX-512 (`minigpt-bench --tables train
memory`), reusing them took the small shape's fp32 step from 2,254 to 2,924 tokens/s and 124M's from 368 to 382, and
the peak memory from 707 to 1,298 MB and from 2,300 to 2,558 MB: freed blocks of one size do not always fit the next
tensor, so the heap grows past the step's live tensors. `reuse_freed_memory()` raises malloc's two thresholds for
this process, as `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` would before it starts, and sets those two for
the processes it starts (the benchmark's).
"""

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
KEPT_BYTES = 2**30  # allocations up to this size come from the heap, and up to this much freed memory stays


def reuse_freed_memory() -> bool:
    """Sets this process's malloc, and that of the processes it starts, to keep freed memory for reuse; whether it
    took. Only glibc's malloc is changed: elsewhere (musl, macOS, Windows) nothing is, and the answer is False."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    os.environ["MALLOC_MMAP_THRESHOLD_"] = os.environ["MALLOC_TRIM_THRESHOLD_"] = str(KEPT_BYTES)
    libc = ctypes.CDLL(None)  # the C library this process runs on
    return libc.mallopt(M_MMAP_THRESHOLD, KEPT_BYTES) == 1 and libc.mallopt(M_TRIM_THRESHOLD, KEPT_BYTES) == 1
