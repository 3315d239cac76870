"""Measured step: one DrPose training step of a config at its real size, with random weights, on a device.

    python benchmarks/run.py step [--config configs/pshuman.yaml] [--device cuda] [--repeats N] [--tiny]

The dry run (``benchmarks/dryrun.py``) models the step on fake tensors: memory tracked, FLOPs counted,
time from a roofline. This suite runs the same step for real: :func:`dryrun.build_step` builds the
configured architecture (PSHuman's UNet, the VAE, the CLIP image encoder, g_skel, LoRA adapters, the
sampler and the PoseScore reward) with random weights on the device, and
:func:`drpose.training.step.train_step` + the optimizer step run once to warm up (Triton compilation, cuDNN
autotuning, allocator growth), then ``repeats`` timed times. Reported per step:

* peak memory: the CUDA caching allocator's peak of allocated bytes over the step (the figure the dry
  run's peak stands for), its peak of reserved bytes (what the allocator took from the device: rounding
  and fragmentation included), and the device's used memory seen by NVML (CUDA context and library
  workspaces included); on CPU the process's peak resident-set growth;
* time: wall clock around the step with the device synchronised; achieved TFLOP/s from the dry run's
  FLOP count of the same settings;
* next to each, the dry run's modelled figure for the same settings, read from
  ``benchmarks/results/dryrun_<config>.json`` when that file holds a row with the same settings and
  architecture.

Random weights compute at the speed of trained ones (no op depends on the values); the reward and loss
values they give mean nothing and are not reported.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

import dryrun

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _nvml_used_bytes(device: torch.device) -> int | None:
    """Device memory in use by every process (NVML), or None without NVML or on CPU."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # NVML missing or not answering: the allocator's figures stand alone
        return None


def modelled_row(config_path: Path, arch_name: str, settings: dryrun.StepSettings,
                 results: Path = ROOT / "benchmarks" / "results") -> dict | None:
    """The dry run's row for the same settings and architecture, when a dry-run result file holds one."""
    path = results / f"dryrun_{config_path.stem}.json"
    if not path.is_file():
        return None
    key = json.dumps(asdict(settings), sort_keys=True, default=list)
    defaults = asdict(dryrun.StepSettings())  # a row written before a setting existed has that setting's default
    for row in json.loads(path.read_text()).get("rows", []):
        settings_then = {**defaults, **row["settings"]}
        if row.get("architecture") == arch_name and json.dumps(settings_then, sort_keys=True, default=list) == key:
            return {"file": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
                    "peak_memory_bytes": row["peak_memory_bytes"], "flops": row["flops"],
                    "modelled_device_s": row["modelled_device_s"], "categories_bytes": row["categories_bytes"]}
    return None


def measure(arch: dryrun.Architecture, settings: dryrun.StepSettings, device: torch.device, repeats: int,
            progress: Callable[[str], None], seed: int = 0) -> dict:
    """Build the step on ``device`` with random weights; one warm-up step, then ``repeats`` timed steps."""
    from drpose.memory import read_peak, reset_peak
    from drpose.training.step import train_step

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    started = time.perf_counter()
    built = dryrun.build_step(arch, settings, None, seed, device=device)
    dryrun.warm_up_optimizer(built.optimizer, built.lora_params)
    _sync(device)
    build_s = time.perf_counter() - started
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    progress(f"step: built {arch.name} on {device} in {build_s:.1f} s"
             + (f" ({resident / GIB:.2f} GiB allocated)" if resident is not None else ""))

    def one_step() -> None:
        result = train_step(built.model, built.batch, built.plan, backward=torch.Tensor.backward)
        del result
        built.optimizer.step()
        built.optimizer.zero_grad(set_to_none=True)
        _sync(device)

    steps = []
    for index in range(repeats + 1):
        baseline = reset_peak(device)  # on CUDA: synchronises and resets the allocator's peak statistics
        t0 = time.perf_counter()
        one_step()
        seconds = time.perf_counter() - t0
        extra, kind = read_peak(device, baseline)
        record = {"warmup": index == 0, "seconds": seconds, "peak_extra_bytes": extra, "peak_kind": kind}
        if device.type == "cuda":
            record["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            record["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
            record["nvml_used_bytes"] = _nvml_used_bytes(device)
        steps.append(record)
        progress(f"step {'warm-up' if index == 0 else index}: {seconds:.2f} s"
                 + (f", peak allocated {record['peak_allocated_bytes'] / GIB:.2f} GiB, reserved "
                    f"{record['peak_reserved_bytes'] / GIB:.2f} GiB" if device.type == "cuda" else ""))
    timed = [s for s in steps if not s["warmup"]]
    out = {"label": settings.label(), "settings": asdict(settings), "architecture": arch.name,
           "plan": {"steps_run": built.plan.num_steps_run, "grad_steps": list(built.plan.grad_steps)},
           "build_s": build_s, "resident_bytes": resident, "steps": steps,
           "median_s": statistics.median(s["seconds"] for s in timed),
           "lora_parameters": sum(p.numel() for p in built.lora_params),
           "parameter_bytes": built.parameter_bytes}
    if device.type == "cuda":
        out["peak_allocated_bytes"] = max(s["peak_allocated_bytes"] for s in timed)
        out["peak_reserved_bytes"] = max(s["peak_reserved_bytes"] for s in timed)
        used = [s["nvml_used_bytes"] for s in timed if s["nvml_used_bytes"] is not None]
        out["nvml_used_bytes"] = max(used) if used else None
    else:
        out["peak_extra_bytes"] = max(s["peak_extra_bytes"] or 0 for s in timed)
    return out


def device_model_key(facts: dict) -> str | None:
    """The dry run's modelled device matching the measured one (by name), if any."""
    name = facts.get("name", "").upper()
    for key in dryrun.DEVICES:
        if key in name:
            return key
    return None


def compare(measured: dict, modelled: dict | None, model_key: str | None) -> dict:
    """Measured against modelled: ratios of peak memory and time, and the achieved FLOP rate."""
    if modelled is None:
        return {}
    out = {"modelled_peak_bytes": modelled["peak_memory_bytes"], "flops": modelled["flops"],
           "achieved_tflops": modelled["flops"] / measured["median_s"] / 1e12}
    if "peak_allocated_bytes" in measured:
        out["peak_ratio"] = measured["peak_allocated_bytes"] / modelled["peak_memory_bytes"]
    if model_key:
        out["modelled_s"] = modelled["modelled_device_s"][model_key]
        out["time_ratio"] = measured["median_s"] / out["modelled_s"]
    return out


def markdown(payload: dict) -> str:
    meta, row = payload["meta"], payload["row"]
    cmp = payload.get("comparison", {})
    gib = lambda b: "n/a" if b is None else f"{b / GIB:.2f}"  # noqa: E731
    lines = ["**Measured on the device named above** (random weights, the real step: "
             "`drpose.training.step.train_step` + the optimizer step).", "",
             f"- config: `{meta['config']}`" + (f" with {', '.join(meta['overrides'])}" if meta["overrides"] else ""),
             f"- architecture: {row['architecture']}; {row['label']}; T={row['plan']['steps_run']} steps run, "
             f"gradient-carrying steps {row['plan']['grad_steps']}; {row['lora_parameters']:,} LoRA parameters",
             f"- build (random weights on the device): {row['build_s']:.1f} s",
             "- steps: " + ", ".join(f"{'warm-up ' if s['warmup'] else ''}{s['seconds']:.2f} s" for s in row["steps"]),
             f"- **step time: {row['median_s']:.2f} s** (median of {len(row['steps']) - 1} after the warm-up)"]
    if "peak_allocated_bytes" in row:
        lines += [f"- **peak allocated: {gib(row['peak_allocated_bytes'])} GiB**; peak reserved "
                  f"{gib(row['peak_reserved_bytes'])} GiB; device memory in use (NVML, CUDA context included) "
                  f"{gib(row.get('nvml_used_bytes'))} GiB; weights and optimizer state resident before the step "
                  f"{gib(row['resident_bytes'])} GiB"]
    else:
        lines += [f"- peak resident-set growth over the step: {gib(row['peak_extra_bytes'])} GiB"]
    if cmp:
        lines += ["", f"## Against the dry run (`{payload['modelled_file']}`)", "",
                  "| figure | measured | dry-run model | measured / model |", "| --- | --- | --- | --- |"]
        if "peak_ratio" in cmp:
            lines.append(f"| peak memory (GiB) | {gib(row['peak_allocated_bytes'])} | {gib(cmp['modelled_peak_bytes'])} "
                         f"| {cmp['peak_ratio']:.3f} |")
        if "time_ratio" in cmp:
            lines.append(f"| step time (s, {meta['model_key']}) | {row['median_s']:.2f} | {cmp['modelled_s']:.2f} "
                         f"| {cmp['time_ratio']:.2f} |")
        lines += ["", f"Achieved rate: {cmp['achieved_tflops']:.1f} TFLOP/s over the dry run's count of "
                  f"{cmp['flops'] / 1e12:.1f} TFLOP per step."]
    else:
        lines += ["", "No dry-run row with these settings and this architecture was found to compare with."]
    return "\n".join(lines) + "\n"


def run(config_path: Path, device: torch.device, repeats: int, tiny: bool, overrides: list[str],
        progress: Callable[[str], None], facts: dict) -> dict:
    from drpose.training.config import load_config

    config = load_config(config_path, list(overrides))
    settings = dryrun.StepSettings.from_config(config)
    if tiny:
        arch, settings = dryrun.tiny_architecture(), dryrun.tiny_settings(settings)
    else:
        arch = dryrun.pshuman_architecture()
        if config.model.pipeline and Path(config.model.pipeline).is_dir():
            arch = dryrun.architecture_from_folder(Path(config.model.pipeline), arch)
    progress(f"step: {arch.name}, {settings.label()}, {settings.dtype}, on {device}")
    row = measure(arch, settings, device, repeats, progress)
    modelled = modelled_row(config_path, arch.name, settings)
    model_key = device_model_key(facts) if device.type == "cuda" else None
    payload = {"meta": {"config": dryrun._shown(config_path), "overrides": list(overrides), "device": facts,
                        "model_key": model_key, "tiny": tiny},
               "row": row, "comparison": compare(row, modelled, model_key),
               "modelled_file": modelled["file"] if modelled else None}
    return payload
