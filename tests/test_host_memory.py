"""Heap-kept host memory: a large block allocated again after a free faults no pages in."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PROBE = """
import ctypes, resource, sys
from pretrain.engine.host_memory import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
SIZE = 128_000_000  # far above glibc's largest mmap threshold (32 MB)
def touch_and_free():
    block = libc.malloc(SIZE)
    ctypes.memset(block, 1, SIZE)
    libc.free(ctypes.c_void_p(block))
touch_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    touch_and_free()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_of_reallocating(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=True)
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_reallocated_tensors_reuse_the_heap() -> None:
    default, kept = _faults_of_reallocating("default"), _faults_of_reallocating("keep")
    pages = 5 * 128_000_000 // 4096
    assert default > pages / 2  # glibc maps every 128 MB block afresh: its pages fault again
    assert kept < pages / 50  # kept in the heap: the pages stay mapped
