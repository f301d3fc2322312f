"""Large tensors on the CPU reuse the memory freed before them, where glibc's malloc would hand it back to the OS: an
option of the training scripts and the benchmark (`--reuse_freed_memory`), faster steps for a higher peak.

On 64-bit Linux glibc maps each allocation of more than 32 MB on its own and unmaps it when it is freed, so the next
tensor of that size starts on fresh pages, which the kernel zeroes on first touch. A training step allocates and
frees such tensors every step (the loss's logits, gradients, activations). `reuse_freed_memory()` raises malloc's two
thresholds for this process, as `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` (`MALLOC_ENVIRONMENT`) would
before a process starts: freed memory stays in the process for the next tensor, and the heap grows past a step's live
tensors where freed blocks of one size do not fit the next (docs/speed.md has the measurements). glibc accepts
thresholds over 32 MB from release 2.35 on. A preloaded jemalloc or tcmalloc answers malloc instead, with its own
ways: nothing here changes them.
"""

import ctypes
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
KEPT_BYTES = 2**30  # allocations up to this size come from the heap, and up to this much freed memory stays
MALLOC_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(KEPT_BYTES), "MALLOC_TRIM_THRESHOLD_": str(KEPT_BYTES)}
NOT_REUSED = "--reuse_freed_memory: this C library's malloc keeps its own ways (it takes glibc 2.35 or newer)"


def malloc_keeps_large_blocks() -> bool:
    """Whether this process's malloc can be told to: glibc 2.35 or newer, on Linux."""
    name, version = platform.libc_ver()
    return platform.system() == "Linux" and name == "glibc" and tuple(map(int, version.split("."))) >= (2, 35)


def reuse_freed_memory() -> bool:
    """Sets this process's malloc to keep freed memory for reuse; whether it took. Elsewhere than glibc 2.35 or newer
    nothing changes, and the answer is False."""
    if not malloc_keeps_large_blocks():
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return all([mallopt(M_MMAP_THRESHOLD, KEPT_BYTES) == 1, mallopt(M_TRIM_THRESHOLD, KEPT_BYTES) == 1])
