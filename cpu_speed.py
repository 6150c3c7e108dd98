"""The one CPU speed device that pays for its lines: glibc keeps the memory freed tensors leave, for the next ones.

    cpu_speed.keep_freed_memory(device)     # once, at the start of a run; off a CPU, or off glibc, it does nothing

Each speed device of the default run was measured alone against the same code without it (benchmarks/README.md);
a device that saved under a tenth of the run and is not part of the algorithm went. This one is CPU-specific, so it
is not in the concept files: train.py and eval.py call it. It is not part of the algorithm either: every logged number
is the same with it and without it.

Why it pays. A CPU pass allocates every activation, gradient and logit anew, the largest (the output layer's
gradient, 113 MB; logits over the vocabulary) every micro-batch. glibc maps each allocation above its mmap threshold
on its own and unmaps it when freed, so the next one page-faults every 4 KB page in again, each zeroed by the kernel.
Here every allocation comes from the heap and up to 2 GB may stay free at its top. The default run, the same draw
with and without it: 445 s (three runs, 431 to 457) against 518 s on an AMD EPYC, 1.5 against 5.2 million page
faults; 380 against 392 s on an Intel Xeon. The process stays near its peak size (+0.3 GB there).
"""

from __future__ import annotations

import ctypes
import platform

import torch


def keep_freed_memory(device: torch.device) -> None:
    """Have glibc keep the memory that freed tensors leave, for the next tensors, where `device` is the CPU; elsewhere,
    and where the C library is not glibc, nothing."""
    if device.type != "cpu" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt's parameter numbers (malloc.h)
    libc.mallopt(m_mmap_max, 0)  # every allocation from the heap
    libc.mallopt(m_trim_threshold, 2**31 - 1)  # an int: 2 GB
