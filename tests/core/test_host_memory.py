"""The allocator setting the renderer and the training loops rely on: freed multi-MB buffers are reused."""

import subprocess
import sys

import pytest

# A fresh process: the setting is process-wide, and this one may have rendered images already.
MEASURE = """
import resource
import numpy as np
from simgan_dist.core.host_memory import reuse_freed_memory

def page_faults_per_buffer(n=8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        buffer = np.ones(48 << 18, dtype=np.float32)  # 48 MB, every page written
        del buffer
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n

default = page_faults_per_buffer()
reuse_freed_memory()
page_faults_per_buffer(1)  # the heap grows once
print(default, page_faults_per_buffer())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc setting")
def test_freed_buffers_are_reused_instead_of_mapped_afresh():
    out = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, check=True).stdout
    default, tuned = map(float, out.split())
    assert default > 0, "glibc's default maps a 48 MB buffer afresh (zero-filled pages) at every allocation"
    assert tuned * 10 < default, f"page faults per 48 MB buffer: {default:g} by default, {tuned:g} after the call"
