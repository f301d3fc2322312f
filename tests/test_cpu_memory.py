"""`reuse_freed_memory`: large tensors come from memory the process freed, not from fresh pages of the OS."""

import os
import platform
import subprocess
import sys

import pytest

from hf_minigpt import cpu_memory

A_100_MB_TENSOR_TWICE = """
import ctypes, os, resource, torch
from hf_minigpt.cpu_memory import reuse_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2

def mapped_apart_and_page_faults():
    torch.empty(25 * 2**20).fill_(1)  # 100 MB, written, then freed
    mapped, faults = libc.mallinfo2().hblkhd, resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.empty(25 * 2**20).fill_(1)
    return libc.mallinfo2().hblkhd - mapped, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

print(*mapped_apart_and_page_faults(), reuse_freed_memory(), *mapped_apart_and_page_faults(),
      os.environ["MALLOC_MMAP_THRESHOLD_"], os.environ["MALLOC_TRIM_THRESHOLD_"])
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_a_large_tensor_reuses_the_memory_freed_before_it():
    result = subprocess.run([sys.executable, "-c", A_100_MB_TENSOR_TWICE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    mapped_before, _, took, mapped_after, faults_after, *for_started_processes = result.stdout.split()
    assert int(mapped_before) >= 100 * 2**20  # glibc's default: a mapping of its own, unmapped when freed
    assert took == "True"
    assert int(mapped_after) == 0 and int(faults_after) < 100  # the heap's pages, written before: no fresh ones
    assert for_started_processes == [str(2**30)] * 2  # glibc reads these where a process starts


def test_another_c_library_is_left_as_it_is(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setattr(cpu_memory.ctypes, "CDLL", None)  # not called
    assert cpu_memory.reuse_freed_memory() is False
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ
