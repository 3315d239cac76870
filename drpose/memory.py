"""Peak-memory measurement of a piece of work, on GPU or CPU.

GPU: the torch caching allocator's peak beyond what was allocated before. CPU: the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs) beyond the resident set before. On CPU the
figure is faithful only when freed tensors leave the resident set at once: glibc serves allocations of
at least ``MALLOC_MMAP_THRESHOLD_`` bytes with their own mappings and unmaps them on free, so processes
that measure set that variable before they start (``exact_cpu_env``); otherwise the allocator may
reuse cached heap pages and under-report.
"""

from __future__ import annotations

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


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> tuple[int | None, str]:
    """Run ``fn`` once; return (extra peak bytes, how it was measured)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, "cuda_allocator_peak"
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        base = _status_kb("VmRSS")
        fn()
        kind = "cpu_peak_rss" if cpu_peak_is_exact() else "cpu_peak_rss_approx"
        return max(0, _status_kb("VmHWM") - base) * 1024, kind
    except OSError:
        return None, "unavailable"
