"""Shared benchmark machinery: timing, peak memory, device facts, and the result files.

Every suite produces rows of one schema (see ``Row``); ``write_results`` turns them into a JSON file
(rows + device/versions metadata) and a Markdown table. Times are medians over repeated runs after
warm-up: CUDA events with the L2 cache flushed before each run on GPU, ``perf_counter`` on CPU.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from drpose.memory import peak_memory  # noqa: F401  (re-exported for the suites)

L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int


@dataclass
class Row:
    """One measurement. ``params`` holds the suite-specific knobs (shape, K, ZeRO stage, ...)."""

    suite: str
    name: str
    provider: str
    mode: str
    dtype: str
    params: dict
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    repeats: int = 0
    bytes: int | None = None
    gbps: float | None = None
    pct_of_copy_bandwidth: float | None = None
    peak_memory_bytes: int | None = None
    peak_memory_kind: str | None = None
    extra: dict = field(default_factory=dict)
    error: str | None = None


# --------------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> Timing:
    """Median wall time of ``fn`` in milliseconds (do_bench-style)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    if device.type == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        for _ in range(repeats):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return Timing(
        median_ms=statistics.median(times),
        p20_ms=times[int(0.2 * (len(times) - 1))],
        p80_ms=times[int(0.8 * (len(times) - 1))],
        repeats=repeats,
    )


def copy_bandwidth_gbps(device: torch.device, megabytes: int, repeats: int) -> float:
    """The device's achievable memory bandwidth: a large device-to-device copy (read + write bytes)."""
    n = megabytes * 1024 * 1024 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, warmup=3, repeats=repeats)
    return 2 * src.numel() * 4 / (timing.median_ms * 1e-3) / 1e9


# --------------------------------------------------------------------------------------------------
# Device facts and versions


def device_facts(device: torch.device) -> dict:
    facts = {"device": str(device), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    if device.type != "cuda":
        facts["name"] = platform.processor() or platform.machine()
        facts["gpu"] = "no GPU"
        return facts
    props = torch.cuda.get_device_properties(device)
    facts.update(name=props.name, total_memory_bytes=props.total_memory, sm_count=props.multi_processor_count,
                 capability=f"{props.major}.{props.minor}")
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        facts.update(
            nvml_name=pynvml.nvmlDeviceGetName(handle),
            driver=pynvml.nvmlSystemGetDriverVersion(),
            memory_total_bytes=pynvml.nvmlDeviceGetMemoryInfo(handle).total,
            sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            mem_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            max_sm_clock_mhz=pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            power_limit_w=pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000,
        )
        pynvml.nvmlShutdown()
    except Exception as error:  # NVMLError_LibraryNotFound and friends: report, do not fail the run
        facts["nvml"] = f"unavailable: {type(error).__name__}"
    return facts


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("triton", "diffusers", "deepspeed", "peft", "numpy"):
        try:
            found[module] = __import__(module).__version__
        except Exception:
            found[module] = None
    return found


# --------------------------------------------------------------------------------------------------
# Output


def write_results(out_dir: Path, stem: str, rows: list[Row], meta: dict, markdown: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    payload = {"meta": meta, "rows": [asdict(row) for row in rows]}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt(value, spec: str = ".3g", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)
