"""Trainer suite: the trainer's training step under DeepSpeed, timed as the work grows.

A step is :func:`drpose.training.step.train_step`, the function ``drpose/train.py`` runs, on a model built
as the trainer builds it (:func:`build`: the config's bundle through ``trainer.load_bundle``, the reward
from the bundle, the config's LoRA adapters, the DeepSpeed engine from the config's DeepSpeed JSON):
condition the front images -> DDIM sampling with the DRTune policy (K gradient-carrying steps, inputs
detached) -> g_skel -> PoseScore -> the KL term against the frozen model (adapters off) -> the
preservation loss -> ``engine.backward`` -> ``engine.step``. The model is the bundle the config names
(``configs/tiny.yaml``: the embedded tiny world; ``--set model.pipeline=... --set model.g_skel=...`` for
another); the batch is random front images and poses, the preservation pool random latents (its work does
not depend on what it holds); the step is the longest DRTune makes (every step runs, no early stop), so
runs are comparable. Each configuration is timed (median of repeats after a warm-up), its peak memory
measured (GPU: allocator peak; CPU: peak RSS), and the reward's share of the step timed separately
(g_skel + PoseScore forward and backward on the same latents). Configurations: K in {1, 2, 4, 8};
checkpointing off / per UNet call / per call + inside the UNet / per call + offload of the saved
activations; ZeRO-2 and ZeRO-3.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from common import Row, fmt, markdown_table, time_fn
from drpose.memory import peak_memory
from drpose.training.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
# checkpointing mode -> (per UNet call, inside the UNet, offload of the saved activations)
CHECKPOINT_MODES = {"off": (False, False, False), "call": (True, False, False), "call+unet": (True, True, False),
                    "call+offload": (True, False, True)}


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
    guidance_scale: float = 1.0
    config: Path = ROOT / "configs" / "tiny.yaml"  # the bundle, LoRA, reward and preservation weight
    overrides: tuple[str, ...] = ()
    preserve_pool: int = 4


@dataclass
class Built:
    engine: object
    model: object  # StepModel
    batch: object  # StepBatch
    plan: object  # SamplingPlan
    source: str


def step_config(settings: TrainerSettings, *, k: int, mode: str, zero_config: str) -> TrainConfig:
    """The config with one configuration's sampling, batch and DeepSpeed settings."""
    config = load_config(settings.config, list(settings.overrides))
    checkpointing, unet_checkpointing, offload = CHECKPOINT_MODES[mode]
    config.sampling = dataclasses.replace(
        config.sampling, num_steps=settings.num_steps, num_grad_steps=k, guidance_scale=settings.guidance_scale,
        checkpointing=checkpointing, unet_checkpointing=unet_checkpointing, offload_activations=offload)
    config.data = dataclasses.replace(config.data, batch_size=settings.batch_size, grad_accum=1)
    config.run = dataclasses.replace(config.run, deepspeed_config=str(ROOT / "configs" / zero_config))
    return config


def longest_plan(sampling) -> object:
    """The longest plan the policy makes: every step runs (DRTune's early stop skips none), the K
    gradient-carrying steps where DRTune puts them at that length."""
    from drpose.models.sampling import GradientPolicy, SamplingPlan

    policy = GradientPolicy(sampling.policy, sampling.num_grad_steps, sampling.early_stop_max)
    steps, k = sampling.num_steps, min(sampling.num_grad_steps, sampling.num_steps)
    if policy.name == "drtune":
        return SamplingPlan(steps, tuple(j * (steps // k) for j in range(k)), True)
    return SamplingPlan(steps, tuple(range(steps - k, steps)), False)


def build(config: TrainConfig, device: torch.device, preserve_pool: int = 4, seed: int = 0) -> Built:
    """The engine, step model, batch and plan of one configuration, built as ``drpose.training.trainer.train``
    builds them."""
    import deepspeed

    from drpose.body import joints_from_params
    from drpose.models.sampling import DDIMSampler
    from drpose.poses import sample_poses
    from drpose.reward import PoseReward
    from drpose.training.data import sample_noise
    from drpose.training.lora import add_lora
    from drpose.training.step import StepBatch, StepModel
    from drpose.training.trainer import deepspeed_config, load_bundle, run_dtype

    torch.manual_seed(seed)
    dtype = run_dtype(config, device)
    bundle = load_bundle(config, device, dtype)
    pipeline, unet = bundle.pipeline, bundle.pipeline.unet
    reward = PoseReward.from_bundle(bundle, config.reward.sigma, config.reward.backend, config.reward.include_bones)
    lora_params = add_lora(unet, config.lora)
    sampling = config.sampling
    if sampling.unet_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(lora_params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    engine, *_ = deepspeed.initialize(model=unet, model_parameters=lora_params, optimizer=optimizer,
                                      config=deepspeed_config(config, 1, dtype), dist_init_required=False)
    sampler = DDIMSampler(pipeline.scheduler, sampling.num_steps, bundle.num_views, sampling.guidance_scale,
                          sampling.checkpointing, sampling.offload_activations, sampling.groups_per_call)
    preserve = _preservation(pipeline, preserve_pool, device, dtype) if config.preserve.weight > 0 else None
    model = StepModel(pipeline, engine, unet, reward, sampler, config.reward.kl_weight, seed, preserve,
                      config.preserve.weight, config.preserve.target, dtype)
    b = config.data.batch_size
    generator = torch.Generator().manual_seed(seed)
    positions = list(range(b))
    batch = StepBatch(torch.rand(b, 3, bundle.image_size, bundle.image_size, generator=generator).to(device, dtype),
                      joints_from_params(sample_poses("broad", b, seed)).float().to(device),
                      sample_noise((2, bundle.num_views, *bundle.latent_shape), seed, 0, positions).to(device, dtype),
                      positions, 0)
    source = (f"{config.model.pipeline or 'the tiny world'} + {config.model.g_skel or 'its g_skel'} "
              f"({bundle.latent_shape[-1]}x{bundle.latent_shape[-1]} latents, {bundle.num_views} views)")
    return Built(engine, model, batch, longest_plan(sampling), source)


def _preservation(pipeline, pool: int, device: torch.device, dtype: torch.dtype):
    """A pool of random multi-view latents with the conditioning of random images: the preservation loss's
    work does not depend on what the pool holds."""
    from drpose.training.preserve import PreservationSet

    generator = torch.Generator().manual_seed(1)
    size = pipeline.image_size
    latents = torch.randn(pool, 2, pipeline.num_views, pipeline.latent_channels, pipeline.latent_size,
                          pipeline.latent_size, generator=generator).to(device, dtype)
    images = torch.rand(pool, 3, size, size, generator=generator).to(device, dtype)
    with torch.no_grad():
        cond = pipeline.condition(images, generator=generator)
    return PreservationSet(latents, cond, pipeline.scheduler.config.num_train_timesteps)


def measure_step(settings: TrainerSettings, *, k: int, mode: str, zero_config: str) -> Row:
    """Time and memory of the trainer's step for one configuration."""
    from drpose.training.step import train_step

    device = settings.device
    config = step_config(settings, k=k, mode=mode, zero_config=zero_config)
    built = build(config, device, settings.preserve_pool)
    model, batch, plan, engine = built.model, built.batch, built.plan, built.engine
    pipeline = model.pipeline
    params = {"K": k, "checkpointing": mode, "zero": zero_config.removesuffix(".json"), "batch": settings.batch_size,
              "T": settings.num_steps, "latent": pipeline.latent_size, "views": pipeline.num_views,
              "guidance": settings.guidance_scale, "preserve_weight": config.preserve.weight}
    row = Row(suite="trainer", name=f"K{k}_{mode}_{params['zero']}_b{settings.batch_size}", provider="deepspeed",
              mode="train_step", dtype={torch.bfloat16: "bf16", torch.float32: "fp32"}.get(model.dtype, str(model.dtype)),
              params=params)
    row.extra["model"] = built.source

    def full_step():
        train_step(model, batch, plan, backward=engine.backward)
        engine.step()

    joints = batch.joints
    framing = model.reward.rig.frame(joints)
    gen = torch.Generator().manual_seed(0)

    def reward_only():
        x0 = torch.randn(batch.noise.shape, generator=gen).to(device, batch.noise.dtype).requires_grad_(True)
        with model.autocast():
            loss = -model.reward(x0, joints, framing).mean()
        loss.backward()

    try:
        timing = time_fn(full_step, device, warmup=settings.warmup, repeats=settings.repeats)
        row.peak_memory_bytes, row.peak_memory_kind = peak_memory(full_step, device)
        reward_timing = time_fn(reward_only, device, warmup=1, repeats=max(3, settings.repeats))
    except torch.OutOfMemoryError as error:
        row.error = "out of memory: " + str(error).splitlines()[0]
        row.extra["fits"] = False
        return row
    finally:
        del engine, built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row.median_ms, row.p20_ms, row.p80_ms, row.repeats = timing.median_ms, timing.p20_ms, timing.p80_ms, timing.repeats
    row.extra.update(fits=True, samples_per_s=settings.batch_size / (timing.median_ms / 1e3),
                     reward_ms=reward_timing.median_ms, reward_share=reward_timing.median_ms / timing.median_ms)
    return row


def run(settings: TrainerSettings, progress) -> tuple[list[Row], dict]:
    rows = []
    # The config's adapters (configs/tiny.yaml: attention, projections, feed-forward and resnet convs). They
    # matter for memory: with adapters in the attention layers only, a K=1 backward stops at the first
    # attention layer, while K >= 2 must reach the UNet's input to chain into the previous step.
    lora = load_config(settings.config, list(settings.overrides)).lora
    for zero_config in settings.zero_configs:
        for mode in settings.modes:
            for k in settings.ks:
                progress(f"trainer K={k} checkpointing={mode} {zero_config}")
                rows.append(measure_step(settings, k=k, mode=mode, zero_config=zero_config))
    meta = {"step": "drpose.training.step.train_step (the trainer's step: DRTune sampling with K gradient-carrying "
                    "steps -> g_skel -> PoseScore -> KL to the frozen model -> preservation loss) -> "
                    "engine.backward -> engine.step; the longest plan (all T steps run)",
            "config": str(settings.config), "overrides": list(settings.overrides),
            "lora": f"rank {lora.rank}, targets {', '.join(lora.target_modules)} ({settings.config.name})",
            "model": rows[0].extra.get("model") if rows else None}
    if settings.device.type != "cuda":
        meta["note"] = ("real-size figures (PSHuman's UNet at 96x96 latents) need a GPU; on CPU see the dry run "
                        "(python benchmarks/run.py dryrun)")
    return rows, meta


def memory_growth(rows: list[Row]) -> list[str]:
    """One line per (ZeRO, checkpointing, batch) series: peak memory at the largest K over the smallest."""
    lines = []
    series: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.peak_memory_bytes:
            series.setdefault((r.params["zero"], r.params["checkpointing"], r.params["batch"]), []).append(r)
    for (zero, mode, batch), group in series.items():
        group.sort(key=lambda r: r.params["K"])
        first, last = group[0], group[-1]
        if first.params["K"] == last.params["K"]:
            continue
        ratio = last.peak_memory_bytes / first.peak_memory_bytes
        lines.append(f"- {zero}, checkpointing {mode}: peak memory at K={last.params['K']} is "
                     f"{ratio:.2f}x K={first.params['K']} ({first.peak_memory_bytes / 2**20:.0f} -> "
                     f"{last.peak_memory_bytes / 2**20:.0f} MB, batch {batch})")
    return lines


def markdown(rows: list[Row]) -> str:
    headers = ["ZeRO", "checkpointing", "K", "T", "batch", "step ms", "samples/s", "peak MB", "reward share", "note"]
    body = []
    for r in rows:
        p = r.params
        peak = r.peak_memory_bytes / 2**20 if r.peak_memory_bytes is not None else None
        share = r.extra.get("reward_share")
        body.append([p["zero"], p["checkpointing"], str(p["K"]), str(p["T"]), str(p["batch"]), fmt(r.median_ms, ".0f"),
                     fmt(r.extra.get("samples_per_s"), ".3f"), fmt(peak, ".0f"),
                     f"{100 * share:.2f}%" if share is not None else "-", r.error or ""])
    growth = memory_growth(rows)
    table = markdown_table(headers, body)
    return table + ("\nMemory growth in K:\n\n" + "\n".join(growth) + "\n" if growth else "")


def plot_growth(rows: list[Row], path: Path) -> Path | None:
    """Step time and peak memory against K, per (ZeRO, checkpointing) series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r.median_ms]
    if not measured:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    styles = ["-o", "-s", "-^", "-d", "--o", "--s", "--^", "--d"]
    for (zero, mode), style in zip(sorted({(r.params["zero"], r.params["checkpointing"]) for r in measured}), styles):
        series = sorted((r for r in measured if r.params["zero"] == zero and r.params["checkpointing"] == mode),
                        key=lambda r: r.params["K"])
        ks = [r.params["K"] for r in series]
        axes[0].plot(ks, [r.median_ms / 1e3 for r in series], style, label=f"{zero}, ckpt {mode}")
        axes[1].plot(ks, [r.peak_memory_bytes / 2**20 for r in series], style, label=f"{zero}, ckpt {mode}")
    axes[0].set(xlabel="K (gradient-carrying steps)", ylabel="step time (s)", title="train_step time vs K")
    axes[1].set(xlabel="K (gradient-carrying steps)", ylabel="peak memory (MB)", title="peak memory vs K")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


