"""Trainer suite: one full DrPose training step under DeepSpeed, as the work grows.

A step is: sample the multi-view latents with K gradient-carrying denoising steps (the last K, as
DRaFT-K does, so exactly K UNet calls carry gradients) -> g_skel -> PoseScore -> loss -> DeepSpeed
backward -> optimizer step. It is timed (median of repeats after a warm-up), its peak memory measured
(GPU: allocator peak; CPU: peak RSS), and the reward's share of the step timed separately (g_skel +
PoseScore forward and backward on the same latents). Configurations: K in {1, 2, 4, 8}; activation
checkpointing off / on / on + offload of saved activations to CPU; ZeRO-2 and ZeRO-3 (+ offload on GPU).
On GPU it also runs the real-size PSHuman / SD-2.1-shaped UNet (random weights) at 96x96 latents.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from drpose.body import joints_from_params
from drpose.memory import peak_memory
from drpose.models.multiview_unet import MultiViewConfig, MultiViewUNet, pshuman_unet_config, tiny_unet_config
from drpose.models.sampling import DDIMSampler, SamplingPlan
from drpose.poses import sample_poses
from drpose.reward import PoseReward
from drpose.training.config import LoraSettings, load_config
from drpose.training.lora import add_lora
from drpose.world.assets import load_world

from common import Row, fmt, markdown_table, time_fn

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_MODES = {"off": (False, False), "on": (True, False), "on+offload": (True, True)}


@dataclass
class TrainerSettings:
    device: torch.device
    ks: list[int]
    modes: list[str]
    zero_configs: list[str]
    num_steps: int
    batch_size: int
    warmup: int
    repeats: int
    view_counts: list[int] = field(default_factory=list)
    real_size: bool = False


def _engine(unet: MultiViewUNet, zero_config: str, batch_size: int, lora: LoraSettings):
    import deepspeed

    params = add_lora(unet, lora)
    ds = json.loads((ROOT / "configs" / zero_config).read_text())
    ds.update(train_micro_batch_size_per_gpu=batch_size, gradient_accumulation_steps=1, train_batch_size=batch_size,
              gradient_clipping=1.0, steps_per_print=10**9)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    engine, *_ = deepspeed.initialize(model=unet, model_parameters=params, optimizer=optimizer, config=ds,
                                      dist_init_required=False)
    return engine


def _world_parts(device: torch.device):
    """Scheduler, rig, g_skel and sigma from the tiny world (g_skel is resolution-agnostic)."""
    world = load_world()
    return world.scheduler, world.rig, world.g_skel.to(device), world.settings.sigma


def measure_step(settings: TrainerSettings, *, k: int, mode: str, zero_config: str, unet_config: dict,
                 num_views: int = 6, batch_size: int | None = None, lora: LoraSettings | None = None) -> Row:
    """Time and memory of one training step for one configuration."""
    device = settings.device
    batch = batch_size or settings.batch_size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    latent = unet_config["sample_size"]
    params = {"K": k, "checkpointing": mode, "zero": zero_config.removesuffix(".json"), "views": num_views,
              "batch": batch, "T": settings.num_steps, "latent": latent,
              "unet": "pshuman" if unet_config.get("block_out_channels", (0,))[0] == 320 else "tiny"}
    row = Row(suite="trainer", name=f"K{k}_{mode}_{params['zero']}_{params['unet']}_v{num_views}_b{batch}",
              provider="deepspeed", mode="step", dtype="bf16" if dtype == torch.bfloat16 else "fp32", params=params)
    scheduler, rig, g_skel, sigma = _world_parts(device)
    rig = type(rig)(azimuths_deg=rig.azimuths_deg[:num_views]) if num_views != rig.num_views else rig
    torch.manual_seed(0)
    unet = MultiViewUNet.from_config(unet_config, MultiViewConfig(num_views=num_views)).to(device, dtype)
    engine = _engine(unet, zero_config, batch, lora or LoraSettings())
    checkpointing, offload = CHECKPOINT_MODES[mode]
    sampler = DDIMSampler(scheduler, settings.num_steps, checkpointing=checkpointing, offload_activations=offload)
    reward_fn = PoseReward(g_skel.to(dtype), rig, 2, sigma, backend="auto")
    plan = SamplingPlan(settings.num_steps, tuple(range(settings.num_steps - k, settings.num_steps)), False)
    gen = torch.Generator().manual_seed(0)
    images = unet.config.images_per_sample
    noise = torch.randn(batch * images, 4, latent, latent, generator=gen).to(device)
    cond = torch.randn(batch, 4, latent, latent, generator=gen).to(device, dtype)
    joints = joints_from_params(sample_poses("broad", batch, 0)).to(device)
    framing = rig.frame(joints)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            x0 = sampler.sample(engine, cond, noise, plan).x0
            loss = -reward_fn(x0, joints, framing).mean()
        engine.backward(loss)
        engine.step()

    def reward_only():
        x0 = torch.randn(batch * images, 4, latent, latent, generator=gen).to(device).requires_grad_(True)
        with autocast:
            loss = -reward_fn(x0, joints, framing).mean()
        loss.backward()

    try:
        timing = time_fn(step, device, warmup=settings.warmup, repeats=settings.repeats)
        row.peak_memory_bytes, row.peak_memory_kind = peak_memory(step, device)
        reward_timing = time_fn(reward_only, device, warmup=1, repeats=max(3, settings.repeats))
    except torch.OutOfMemoryError as error:
        row.error = "out of memory: " + str(error).splitlines()[0]
        row.extra["fits"] = False
        return row
    finally:
        del engine, unet
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row.median_ms, row.p20_ms, row.p80_ms, row.repeats = timing.median_ms, timing.p20_ms, timing.p80_ms, timing.repeats
    row.extra.update(fits=True, samples_per_s=batch / (timing.median_ms / 1e3), reward_ms=reward_timing.median_ms,
                     reward_share=reward_timing.median_ms / timing.median_ms)
    return row


def run(settings: TrainerSettings, progress) -> tuple[list[Row], dict]:
    rows = []
    tiny = tiny_unet_config()
    # The adapters the main job trains (configs/tiny.yaml). They matter for memory: with adapters in the
    # attention layers only, a K=1 backward stops at the first attention layer, while K >= 2 must reach
    # the UNet's input to chain into the previous step, so K=1 alone would look cheaper.
    lora = load_config(ROOT / "configs" / "tiny.yaml").lora
    for zero_config in settings.zero_configs:
        for mode in settings.modes:
            for k in settings.ks:
                progress(f"trainer tiny K={k} checkpointing={mode} {zero_config}")
                rows.append(measure_step(settings, k=k, mode=mode, zero_config=zero_config, unet_config=tiny, lora=lora))
    for views in settings.view_counts:
        progress(f"trainer tiny views={views}")
        row = measure_step(settings, k=2, mode="on", zero_config=settings.zero_configs[0], unet_config=tiny,
                           num_views=views, lora=lora)
        row.params["sweep"] = "views"
        rows.append(row)
    meta = {"step": "sample with K gradient-carrying steps (the last K) -> g_skel -> PoseScore -> backward -> step",
            "tiny_lora": f"rank {lora.rank}, targets {', '.join(lora.target_modules)} (configs/tiny.yaml)"}
    if settings.real_size:
        rows += real_size_rows(settings, progress)
    elif settings.device.type != "cuda":
        meta["note"] = "real-size (PSHuman / SD-2.1 UNet at 96x96 latents) figures need a GPU"
    return rows, meta


def real_size_rows(settings: TrainerSettings, progress) -> list[Row]:
    """The SD-2.1-shaped UNet (random weights) at 96x96 latents, 6 views x 2 domains, T=20."""
    real = pshuman_unet_config()
    real_settings = TrainerSettings(**{**settings.__dict__, "num_steps": 20, "warmup": 1, "repeats": 3})
    rows = []
    lora = LoraSettings(rank=32, alpha=32.0)
    for batch in (1, 2):
        for mode, zero in (("on", "ds_zero2.json"), ("on+offload", "ds_zero2_offload.json"), ("on+offload", "ds_zero3_offload.json")):
            progress(f"trainer real-size batch={batch} K=2 checkpointing={mode} {zero}")
            rows.append(measure_step(real_settings, k=2, mode=mode, zero_config=zero, unet_config=real, batch_size=batch, lora=lora))
    for k in (1, 4, 8, 12, 16):
        progress(f"trainer real-size largest K: K={k}")
        row = measure_step(real_settings, k=k, mode="on+offload", zero_config="ds_zero2_offload.json", unet_config=real,
                           batch_size=1, lora=lora)
        rows.append(row)
        if not row.extra.get("fits"):
            break
    return rows


def memory_growth(rows: list[Row]) -> list[str]:
    """One line per (UNet, ZeRO, checkpointing, batch) series: peak memory at the largest K over the smallest."""
    lines = []
    series: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.peak_memory_bytes and "sweep" not in r.params:
            key = (r.params["unet"], r.params["zero"], r.params["checkpointing"], r.params["batch"])
            series.setdefault(key, []).append(r)
    for (unet, zero, mode, batch), group in series.items():
        group.sort(key=lambda r: r.params["K"])
        first, last = group[0], group[-1]
        if first.params["K"] == last.params["K"]:
            continue
        ratio = last.peak_memory_bytes / first.peak_memory_bytes
        lines.append(f"- {unet} UNet, {zero}, checkpointing {mode}: peak memory at K={last.params['K']} is "
                     f"{ratio:.2f}x K={first.params['K']} ({first.peak_memory_bytes / 2**20:.0f} -> "
                     f"{last.peak_memory_bytes / 2**20:.0f} MB, batch {batch})")
    return lines


def markdown(rows: list[Row]) -> str:
    headers = ["UNet", "ZeRO", "checkpointing", "K", "views", "batch", "step ms", "samples/s", "peak MB",
               "reward share", "note"]
    body = []
    for r in rows:
        p = r.params
        peak = r.peak_memory_bytes / 2**20 if r.peak_memory_bytes is not None else None
        body.append([p["unet"], p["zero"], p["checkpointing"], str(p["K"]), str(p["views"]), str(p["batch"]),
                     fmt(r.median_ms, ".0f"), fmt(r.extra.get("samples_per_s"), ".3f"), fmt(peak, ".0f"),
                     fmt(100 * r.extra["reward_share"] if "reward_share" in r.extra else None, ".2f", "-") + ("%" if "reward_share" in r.extra else ""),
                     r.error or ""])
    growth = memory_growth(rows)
    table = markdown_table(headers, body)
    return table + ("\nMemory growth in K:\n\n" + "\n".join(growth) + "\n" if growth else "")


def plot_growth(rows: list[Row], path: Path) -> Path | None:
    """Step time and peak memory against K (per checkpointing mode) and against the number of views."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiny = [r for r in rows if r.params["unet"] == "tiny" and r.median_ms and "sweep" not in r.params]
    if not tiny:
        return None
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for (zero, mode), style in zip(sorted({(r.params["zero"], r.params["checkpointing"]) for r in tiny}), ["-o", "-s", "-^", "--o", "--s", "--^"]):
        series = sorted((r for r in tiny if r.params["zero"] == zero and r.params["checkpointing"] == mode), key=lambda r: r.params["K"])
        if len(series) < 2:
            continue
        ks = [r.params["K"] for r in series]
        axes[0].plot(ks, [r.median_ms / 1e3 for r in series], style, label=f"{zero}, ckpt {mode}")
        axes[1].plot(ks, [r.peak_memory_bytes / 2**20 for r in series], style, label=f"{zero}, ckpt {mode}")
    axes[0].set(xlabel="K (gradient-carrying steps)", ylabel="step time (s)", title="step time vs K")
    axes[1].set(xlabel="K (gradient-carrying steps)", ylabel="peak memory (MB)", title="peak memory vs K")
    axes[0].legend(fontsize=7)
    views = {r.params["views"]: r for r in rows if r.params.get("sweep") == "views" and r.median_ms}
    if len(views) > 1:
        xs = sorted(views)
        axes[2].plot(xs, [views[v].median_ms / 1e3 for v in xs], "-o", label="step time (s)")
        twin = axes[2].twinx()
        twin.plot(xs, [views[v].peak_memory_bytes / 2**20 for v in xs], "--s", color="#c40", label="peak MB")
        twin.set_ylabel("peak memory (MB)")
        axes[2].set(xlabel="views per sample (x2 domains)", ylabel="step time (s)", title="growth with views (K=2)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
