"""Peak-memory measurement of a piece of work, on GPU or CPU.

GPU: the torch caching allocator's peak beyond what was allocated before. CPU: the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs) beyond the resident set before. On CPU the
figure is faithful only when freed tensors leave the resident set at once: glibc serves allocations of
at least ``MALLOC_MMAP_THRESHOLD_`` bytes with their own mappings and unmaps them on free, so processes
that measure set that variable before they start (``exact_cpu_env``); otherwise the allocator may
reuse cached heap pages and under-report. ``peak_memory`` also trims the C heap before it starts, so that
pages freed by earlier, larger work do not hide part of the next measurement.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
from typing import Callable

import torch

MMAP_THRESHOLD_BYTES = 64 * 1024


def exact_cpu_env(env: dict | None = None) -> dict:
    """Environment for a child process whose CPU peak-RSS figures track live tensors exactly."""
    env = dict(os.environ if env is None else env)
    env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD_BYTES)
    return env


def cpu_peak_is_exact() -> bool:
    return "MALLOC_MMAP_THRESHOLD_" in os.environ


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def _release_free_heap() -> None:
    """Hand memory that was freed but kept by the C allocator back to the system.

    Earlier, larger work leaves freed pages resident (small allocations live in glibc's heaps whatever
    the mmap threshold); later allocations would reuse them without raising the resident set, and a peak
    measured after a big job would come out too low."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def reset_peak(device: torch.device | str) -> int:
    """Start a peak measurement; returns the baseline (allocated bytes on GPU, resident bytes on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return _status_kb("VmRSS") * 1024


def read_peak(device: torch.device | str, baseline: int) -> tuple[int, str]:
    """Extra peak bytes since ``reset_peak`` returned ``baseline``, and how it was measured."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline, "cuda_allocator_peak"
    kind = "cpu_peak_rss" if cpu_peak_is_exact() else "cpu_peak_rss_approx"
    return max(0, _status_kb("VmHWM") * 1024 - baseline), kind


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> tuple[int | None, str]:
    """Run ``fn`` once; return (extra peak bytes, how it was measured)."""
    if torch.device(device).type == "cpu":
        _release_free_heap()
    try:
        baseline = reset_peak(device)
    except OSError:
        fn()
        return None, "unavailable"
    fn()
    return read_peak(device, baseline)
