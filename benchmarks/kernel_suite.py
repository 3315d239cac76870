"""Kernel suite: the fused PoseScore divergence against the PyTorch reference, eager and compiled.

For every shape and dtype it times forward, backward (gradient of the logits for a random upstream
gradient, graph kept) and full (forward + backward), and reports the median time, the achieved GB/s
over the op's byte floor (forward reads the logits once; backward reads them and writes their
gradient), that figure as a share of the device's measured copy bandwidth, and the peak extra memory.
The fused op is timed without its value checks (``validate=False``); the "fused+checks" provider adds
them (one host sync) so their cost is visible. On CUDA the "fused@graph" and "reference_compiled@graph"
providers replay the same call captured once in a CUDA graph: the device's own time, without Python, autograd
bookkeeping and launch overhead, so the gap between a provider and its ``@graph`` row is host cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import drpose_kernels as dk
from drpose_kernels import pose_score_op, reference

from common import Row, copy_bandwidth_gbps, fmt, markdown_table, peak_memory, time_fn

SHAPES = [(24, 23, 96, 96), (48, 55, 96, 96), (24, 127, 192, 192)]
QUICK_SHAPES = [(6, 23, 32, 32)]
SIZE_SWEEP = [24, 48, 96, 192]  # heatmap sides for the growth sweep at N=24, C=23 (fp32, full)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("forward", "backward", "full")
SIGMA = 2.0
CPU_FUSED_NOTE = (
    "fused-kernel figures need a GPU: on CPU the Triton kernels only run in Triton's interpreter, "
    "which checks correctness and says nothing about performance"
)


@dataclass
class Settings:
    device: torch.device
    shapes: list
    dtypes: list[str]
    compile: bool
    warmup: int
    repeats: int
    size_sweep: list[int]


def make_inputs(shape, dtype: torch.dtype, device: torch.device):
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape, generator=gen) * 3 - 4).to(dtype).to(device)
    segments = torch.rand(n, c, 2, 2, generator=gen) * torch.tensor([w - 1.0, h - 1.0])
    segments[:, : c // 2, 1] = segments[:, : c // 2, 0]  # half joints, half bones
    upstream = torch.randn(n, c, generator=gen).to(device)
    return logits, segments.to(device), upstream


def providers(settings: Settings, segments: torch.Tensor, with_compile: bool = True) -> dict:
    """Name -> f(logits) -> (N, C) divergences, or a reason it is not measured here."""
    found = {}
    if settings.device.type == "cuda" and dk.HAS_TRITON:
        found["fused"] = lambda x: dk.heatmap_divergence(x, segments, SIGMA, backend="triton", validate=False)
        found["fused+checks"] = lambda x: dk.heatmap_divergence(x, segments, SIGMA, backend="triton")
    else:
        found["fused"] = CPU_FUSED_NOTE
    found["reference"] = lambda x: reference.divergence_from_checked(x, segments, SIGMA)
    if settings.compile and with_compile:
        # A fresh compile cache per case: one function compiled for every shape, dtype and mode would pass
        # dynamo's recompile limit and silently run eager for the later cases.
        torch._dynamo.reset()
        compiled = torch.compile(reference.divergence_from_checked, dynamic=False)
        found["reference_compiled"] = lambda x: compiled(x, segments, SIGMA)
    return found


def mode_call(mode: str, divergence, logits: torch.Tensor, upstream: torch.Tensor):
    if mode == "forward":
        def call():
            with torch.no_grad():
                return divergence(logits)
        return call
    x = logits.detach().clone().requires_grad_(True)
    if mode == "backward":
        out = divergence(x)
        return lambda: torch.autograd.grad(out, x, upstream, retain_graph=True)
    return lambda: torch.autograd.grad(divergence(x), x, upstream)


GRAPHED = ("fused", "reference_compiled")  # providers also timed as a captured CUDA graph on CUDA


def graphed(call, device: torch.device):
    """``call`` captured once in a CUDA graph; returns the replay. Warm-up runs on a side stream first (as
    capture requires), so lazy allocations, autotuning and compilation happen outside the graph."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def byte_floor(mode: str, logits: torch.Tensor) -> int:
    per_pass = logits.numel() * logits.element_size()
    return {"forward": 1, "backward": 2, "full": 3}[mode] * per_pass


def measure_case(settings: Settings, shape, dtype_name: str, modes, with_compile: bool, copy_gbps: float,
                 progress) -> list[Row]:
    """Every provider and mode at one shape and dtype."""
    device = settings.device
    logits, segments, upstream = make_inputs(shape, DTYPES[dtype_name], device)
    params = dict(zip("NCHW", shape), sweep=not with_compile)
    name = f"N{shape[0]}_C{shape[1]}_{shape[2]}x{shape[3]}" + ("" if with_compile else "_sweep")
    rows = []
    cases = []
    for provider, divergence in providers(settings, segments, with_compile).items():
        cases.append((provider, divergence, False))
        if device.type == "cuda" and provider in GRAPHED and not isinstance(divergence, str):
            cases.append((provider + "@graph", divergence, True))
    for provider, divergence, as_graph in cases:
        for mode in modes:
            progress(f"{shape} {dtype_name} {provider} {mode}")
            row = Row(suite="kernel", name=name, provider=provider, mode=mode, dtype=dtype_name, params=params,
                      bytes=byte_floor(mode, logits))
            rows.append(row)
            if isinstance(divergence, str):
                row.error = divergence
                continue
            try:
                call = mode_call(mode, divergence, logits, upstream)
                if as_graph:
                    try:
                        call = graphed(call, device)
                    except RuntimeError as error:  # a capture that fails is reported, not fatal to the suite
                        row.error = f"CUDA graph capture failed: {error}".splitlines()[0]
                        continue
                timing = time_fn(call, device, warmup=settings.warmup, repeats=settings.repeats)
                row.peak_memory_bytes, row.peak_memory_kind = peak_memory(call, device)
            except torch.OutOfMemoryError as error:
                row.error = f"out of memory: {error}".splitlines()[0]
                continue
            row.median_ms, row.p20_ms, row.p80_ms, row.repeats = (
                timing.median_ms, timing.p20_ms, timing.p80_ms, timing.repeats)
            row.gbps = row.bytes / (timing.median_ms * 1e-3) / 1e9
            row.pct_of_copy_bandwidth = 100 * row.gbps / copy_gbps
            progress(f"{shape} {dtype_name} {provider} {mode}: {timing.median_ms:.4g} ms, {row.gbps:.1f} GB/s")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run(settings: Settings, progress) -> tuple[list[Row], dict]:
    device = settings.device
    copy_gbps = copy_bandwidth_gbps(device, 1024 if device.type == "cuda" else 256, repeats=10)
    rows: list[Row] = []
    for shape in settings.shapes:
        for dtype_name in settings.dtypes:
            rows += measure_case(settings, shape, dtype_name, MODES, True, copy_gbps, progress)
    for side in settings.size_sweep:
        rows += measure_case(settings, (24, 23, side, side), "fp32", ("full",), False, copy_gbps, progress)
    add_speedups(rows)
    meta = {"copy_bandwidth_gbps": copy_gbps, "sigma": SIGMA,
            "compiled_kernels": dict(pose_score_op.COMPILED_KERNEL_STATS)}
    if device.type != "cuda":
        meta["note"] = CPU_FUSED_NOTE
    return rows, meta


def add_speedups(rows: list[Row]) -> None:
    """Each row's speed-up over the eager and the compiled reference at the same shape, dtype and mode. A
    CUDA-graph row (``@graph``) is set against the compiled reference's graph replay: device time against
    device time."""
    index = {(r.name, r.dtype, r.mode, r.provider): r for r in rows if r.median_ms}
    for row in rows:
        if not row.median_ms:
            continue
        compiled = "reference_compiled@graph" if row.provider.endswith("@graph") else "reference_compiled"
        for baseline, provider in (("reference", "reference"), ("reference_compiled", compiled)):
            other = index.get((row.name, row.dtype, row.mode, provider))
            if other is not None and other is not row:
                row.extra[f"speedup_vs_{baseline}"] = other.median_ms / row.median_ms


def markdown(rows: list[Row], meta: dict) -> str:
    headers = ["shape (N, C, H, W)", "dtype", "mode", "provider", "median ms", "GB/s", "% copy BW",
               "peak extra MB", "x vs eager ref", "x vs compiled ref"]
    body = []
    for r in rows:
        shape = "({N}, {C}, {H}, {W})".format(**r.params)
        if r.error:
            body.append([shape, r.dtype, r.mode, r.provider, "n/a", "", "", "", "", r.error[:60] + "..."])
            continue
        body.append([
            shape, r.dtype, r.mode, r.provider, fmt(r.median_ms, ".4g"), fmt(r.gbps, ".1f"),
            fmt(r.pct_of_copy_bandwidth, ".1f"), fmt(r.peak_memory_bytes / 2**20 if r.peak_memory_bytes is not None else None, ".1f"),
            fmt(r.extra.get("speedup_vs_reference"), ".2f"), fmt(r.extra.get("speedup_vs_reference_compiled"), ".2f"),
        ])
    text = markdown_table(headers, body)
    stats = meta.get("compiled_kernels") or {}
    if stats:
        text += "\nCompiled kernels (registers per thread, spills):\n\n"
        text += markdown_table(["kernel", "registers", "spills"],
                               [[k, str(v["n_regs"]), str(v["n_spills"])] for k, v in sorted(stats.items())])
    return text


def plot_sizes(rows: list[Row], path) -> object:
    """Full (forward + backward) time against heatmap side for every provider of the size sweep."""
    sweep = [r for r in rows if r.params.get("sweep") and r.median_ms]
    if not sweep:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.4))
    for provider in sorted({r.provider for r in sweep}):
        series = sorted((r for r in sweep if r.provider == provider), key=lambda r: r.params["H"])
        axis.loglog([r.params["H"] for r in series], [r.median_ms for r in series], "-o", label=provider)
    axis.set(xlabel="heatmap side (N=24, C=23, fp32)", ylabel="forward + backward (ms)", title="growth with heatmap size")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
