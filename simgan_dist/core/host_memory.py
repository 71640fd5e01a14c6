"""glibc's allocator, set for processes that free and re-allocate multi-MB buffers every step."""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def reuse_freed_memory() -> None:
    """Let glibc keep freed multi-MB buffers in its heap instead of unmapping them.

    By default every multi-MB temporary (numpy's or a CPU tensor's) can be a fresh mmap whose
    pages the kernel zero-fills on first touch, which costs more than the arithmetic: this
    makes the renderer 2-3x faster and the tiny preset's CPU training step ~9% faster
    (bench/RESULTS.md, issue 11 (b)). Process-wide, so it is called where a process does that
    work and nothing else: the renderer and the two training loops. Elsewhere (not
    Linux/glibc) it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 << 20)
    libc.mallopt(m_trim_threshold, 128 << 20)
