"""`reuse_freed_memory`: large tensors come from memory the process freed, not from fresh pages of the OS."""

import os
import subprocess
import sys

import pytest

from hf_minigpt import cpu_memory

A_100_MB_TENSOR_TWICE = """
import ctypes, resource, torch
from hf_minigpt.cpu_memory import reuse_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2

def mapped_apart_and_page_faults():  # of a 90 MB tensor written after a 100 MB one was written and freed
    torch.empty(25 * 2**20).fill_(1)
    mapped, faults = libc.mallinfo2().hblkhd, resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.empty(90 * 2**18).fill_(1)
    return libc.mallinfo2().hblkhd - mapped, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

print(*mapped_apart_and_page_faults(), reuse_freed_memory(), *mapped_apart_and_page_faults())
"""


@pytest.mark.skipif(not cpu_memory.malloc_keeps_large_blocks(), reason="glibc 2.35 or newer")
def test_a_large_tensor_reuses_the_memory_freed_before_it():
    # malloc as glibc sets it by default: none of the settings or other mallocs a user may have chosen
    chosen = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")
    env = {name: value for name, value in os.environ.items() if name not in chosen}
    result = subprocess.run([sys.executable, "-c", A_100_MB_TENSOR_TWICE], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    mapped_before, _, took, mapped_after, faults_after = result.stdout.split()
    assert int(mapped_before) >= 90 * 2**20  # glibc's default: a mapping of its own, unmapped when freed
    assert took == "True"
    # From the heap, in the pages the 100 MB tensor wrote: no fresh ones. (A tensor as large as the freed one may
    # not fit its block, which the allocator's alignment makes a few bytes too small: the peak's growth.)
    assert int(mapped_after) == 0 and int(faults_after) < 100


@pytest.mark.parametrize("libc", [("", ""), ("glibc", "2.34")])
def test_another_malloc_is_left_as_it_is(monkeypatch, libc):
    monkeypatch.setattr(cpu_memory.platform, "libc_ver", lambda: libc)
    monkeypatch.setattr(cpu_memory.ctypes, "CDLL", None)  # not called
    assert cpu_memory.reuse_freed_memory() is False
