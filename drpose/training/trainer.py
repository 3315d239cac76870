"""The DrPose training loop on DeepSpeed.

One optimizer step: for each micro-batch of (front image, pose), :func:`~drpose.training.step.train_step`
(condition -> sample the multi-view latents with the gradient policy -> g_skel -> PoseScore (fused op on
GPU, reference on CPU) -> loss = -PoseScore + w_KL * KL (+ w_pres * the preservation loss,
:mod:`drpose.training.preserve`) -> DeepSpeed backward); then DeepSpeed's optimizer step, logging and
checkpointing. Only LoRA adapters train. The model is a bundle (:mod:`drpose.models.bundle`): the tiny
world's by default, or a PSHuman folder plus a g_skel folder.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from drpose.data.dataset import DrPoseDataset
from drpose.data.synthesize import synthesize
from drpose.memory import read_peak, reset_peak
from drpose.models.bundle import ModelBundle
from drpose.models.sampling import DDIMSampler, GradientPolicy, make_plan
from drpose.reward import PoseReward

from . import checkpoints
from .config import ConfigError, TrainConfig, resolved_yaml
from .data import BatchLayout, SampleStream, collate, sample_noise, seeded_generator
from .lora import add_lora, export_lora
from .metrics_log import MetricsLog
from .preserve import PreservationSet
from .rendezvous import free_port
from .step import StepBatch, StepModel, StepResult, train_step

PLAN_STREAM = 1_000_003  # separates the plan generators' seeds from the noise generators'


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (e.g. a non-finite loss); the message says why and what to do."""


@dataclass
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized() and self.world_size > 1:
            dist.barrier()

    def mean(self, values: list[float]) -> list[float]:
        """The mean over ranks of each value (collectives on the run's device: NCCL needs CUDA tensors)."""
        tensor = torch.tensor(values, dtype=torch.float64 if self.device.type == "cpu" else torch.float32,
                              device=self.device)
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.device)
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())


def setup_distributed() -> DistributedContext:
    """Join the process group the ``deepspeed`` launcher describes, or make a one-process group."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def run_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    precision = config.run.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def load_bundle(config: TrainConfig, device: torch.device, dtype: torch.dtype) -> ModelBundle:
    """The model bundle the config names (the tiny world's by default), frozen, in the run dtype."""
    model = config.model
    try:
        return ModelBundle.load(model.pipeline, model.g_skel, model.prompt_embeds, model.unet, dtype=dtype,
                                device=device)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"model: {error}") from error


def deepspeed_config(config: TrainConfig, world_size: int) -> dict:
    path = Path(config.run.deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"run.deepspeed_config: {path} does not exist (see configs/ds_*.json)")
    ds = json.loads(path.read_text())
    for key in ("fp16", "bf16"):
        if ds.get(key, {}).get("enabled"):
            raise ConfigError(f"{path}: '{key}' is enabled; precision is set by run.precision (frozen weights in "
                              f"the run dtype, LoRA weights in fp32, autocast), so leave it out of the DeepSpeed JSON")
    ds.update(
        train_micro_batch_size_per_gpu=config.data.batch_size,
        gradient_accumulation_steps=config.data.grad_accum,
        train_batch_size=config.data.batch_size * config.data.grad_accum * world_size,
        gradient_clipping=config.optim.max_grad_norm,
    )
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def prepare_data(config: TrainConfig, ctx: DistributedContext, image_size: int) -> DrPoseDataset:
    data = config.data
    dataset = _synthesized_folder(Path(data.path), "data", data.synthesize_distribution, data.synthesize_num,
                                  data.synthesize_seed, data.synthesize_fps_pool, image_size, ctx)
    if data.synthesize_distribution is not None:
        check_synthesized(dataset, "data.path", data.synthesize_distribution, data.synthesize_num,
                          data.synthesize_seed, data.synthesize_fps_pool)
    if dataset.image_size != image_size:
        raise ConfigError(f"data.path: {dataset.root} holds {dataset.image_size}px images; the model takes "
                          f"{image_size}x{image_size}")
    return dataset


def _synthesized_folder(path: Path, section: str, distribution: str | None, num: int, seed: int,
                        fps_pool: int | None, image_size: int, ctx: DistributedContext) -> DrPoseDataset:
    """The dataset at ``path``; rank 0 synthesizes it first when it is missing and ``distribution`` is set."""
    if not (path / "manifest.jsonl").exists():
        if distribution is None:
            raise ConfigError(f"{section}.path: no dataset at {path}; create one with `python -m drpose.data.synthesize "
                              f"--out {path} --num 256 --distribution broad --seed 300`, or set "
                              f"{section}.{'synthesize_distribution' if section == 'data' else 'distribution'} to have "
                              f"the trainer create it")
        if ctx.is_main:
            picked = f" (the most diverse of {fps_pool}, farthest-point sampling)" if fps_pool is not None else ""
            print(f"[drpose] synthesizing {num} {distribution} poses{picked} into {path}", flush=True)
            synthesize(path, num, distribution, seed, image_size, progress=True, fps_pool=fps_pool)
        ctx.barrier()
    return DrPoseDataset(path)


def check_synthesized(dataset: DrPoseDataset, key: str, distribution: str, num: int, seed: int,
                      fps_pool: int | None) -> None:
    """A folder the trainer synthesized earlier must match what the config asks for now (a dataset of one's own,
    whose records are not all synthetic, is used as it is)."""
    sources = [record.source or "" for record in dataset.records]
    if not all(source.startswith("synthetic:") for source in sources):
        return
    pool = f"pool={fps_pool}:" if fps_pool is not None else ""
    expected = f"synthetic:{distribution}:seed={seed}:{pool}index="
    if len(sources) != num or not all(source.startswith(expected) for source in sources):
        found = sources[0].rsplit("index=", 1)[0] if sources else "nothing"
        raise ConfigError(
            f"{key}: {dataset.root} holds {len(sources)} synthetic records ({found}...), not the {num} the config "
            f"asks for ({expected}...); remove the folder to have it synthesized again, point {key} elsewhere, or "
            f"set the synthesis settings to null to train on it as it is")


def _lr_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def prepare_preservation(config: TrainConfig, bundle: ModelBundle, ctx: DistributedContext,
                         dtype: torch.dtype) -> PreservationSet | None:
    settings = config.preserve
    if settings.weight <= 0:
        return None
    dataset_path = Path(settings.path)
    _synthesized_folder(dataset_path, "preserve", settings.distribution, settings.num, settings.seed, None,
                        bundle.image_size, ctx)
    return PreservationSet.from_folder(dataset_path, bundle.pipeline, bundle.rig, settings.seed, ctx.device, dtype)


def train(config: TrainConfig, resume: str | None = None) -> dict:
    import deepspeed

    ctx = setup_distributed()
    torch.manual_seed(config.run.seed)
    dtype = run_dtype(config, ctx.device)
    bundle = load_bundle(config, ctx.device, dtype)
    pipeline, unet = bundle.pipeline, bundle.pipeline.unet
    reward_fn = PoseReward.from_bundle(bundle, config.reward.sigma, config.reward.backend, config.reward.include_bones)
    lora_params = add_lora(unet, config.lora)
    if config.sampling.unet_checkpointing:
        unet.enable_gradient_checkpointing()
    dataset = prepare_data(config, ctx, bundle.image_size)
    preserve = prepare_preservation(config, bundle, ctx, dtype)

    optimizer = torch.optim.AdamW(lora_params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.optim.warmup_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=unet, model_parameters=lora_params, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(config, ctx.world_size), dist_init_required=False,
    )

    start_step, last_checkpoint = 0, None
    if resume:
        root, tag = checkpoints.resolve_resume(config, resume)
        checkpoints.check_compatible(config, root / tag)
        _, client_state = engine.load_checkpoint(str(root), tag=tag, load_module_strict=False)
        if client_state is None:
            raise ConfigError(f"could not load {root / tag}; it may be incomplete: resume from an earlier checkpoint")
        start_step, last_checkpoint = int(client_state["step"]), root / tag
        if ctx.is_main:
            print(f"[drpose] resumed from {last_checkpoint} at step {start_step}", flush=True)

    output_dir = Path(config.run.output_dir)
    if ctx.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(resolved_yaml(config))
    log = MetricsLog(output_dir, ctx.is_main, start_step)
    layout = BatchLayout(config.data.batch_size, config.data.grad_accum, ctx.world_size)
    stream = SampleStream(len(dataset), config.run.seed)
    sampling = config.sampling
    sampler = DDIMSampler(pipeline.scheduler, sampling.num_steps, bundle.num_views, sampling.guidance_scale,
                          sampling.checkpointing, sampling.offload_activations, sampling.groups_per_call)
    policy = GradientPolicy(sampling.policy, sampling.num_grad_steps, sampling.early_stop_max)
    step_model = StepModel(pipeline, engine, unet, reward_fn, sampler, config.reward.kl_weight, config.run.seed,
                           preserve, config.preserve.weight, config.preserve.target, dtype)
    noise_shape = (2, bundle.num_views, *bundle.latent_shape)

    def stop_if_not_finite(result: StepResult) -> None:
        if ctx.any(not torch.isfinite(result.loss).item()):
            where = last_checkpoint or "none (no checkpoint was written yet)"
            raise TrainingStopped(
                f"non-finite loss at step {step + 1} (reward {result.reward.detach().float().mean().item()}, kl "
                f"{result.kl.item()}); stopped without updating the weights. Last good checkpoint: {where}. Fix the "
                f"cause (data, learning rate, precision) and continue with --resume latest")

    started = time.perf_counter()
    bar = tqdm(range(start_step, config.run.max_steps), initial=start_step, total=config.run.max_steps,
               desc="DrPose", disable=not ctx.is_main, mininterval=1)
    for step in bar:
        step_started = time.perf_counter()
        baseline = reset_peak(ctx.device)
        totals = [0.0, 0.0, 0.0, 0.0]
        for micro_step in range(config.data.grad_accum):
            positions = layout.positions(step, micro_step, ctx.rank)
            items = collate(dataset, [stream.index(p) for p in positions])
            batch = StepBatch(items["images"].to(ctx.device, dtype), items["joints"].to(ctx.device),
                              sample_noise(noise_shape, config.run.seed, step, positions).to(ctx.device, dtype),
                              positions, step)
            plan = make_plan(policy, sampling.num_steps, seeded_generator(config.run.seed, step, PLAN_STREAM + micro_step))
            result = train_step(step_model, batch, plan, backward=engine.backward, guard=stop_if_not_finite)
            engine.step()
            totals = [a + b for a, b in zip(totals, result.scalars())]
        step_time = time.perf_counter() - step_started
        peak, _ = read_peak(ctx.device, baseline)
        reward_mean, kl_mean, loss_mean, preserve_mean = ctx.mean([t / config.data.grad_accum for t in totals])
        grad_norm = engine.get_global_grad_norm()
        metrics = {
            "reward": reward_mean, "kl": kl_mean, "loss": loss_mean,
            **({"preserve_loss": preserve_mean} if preserve is not None else {}),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": scheduler.get_last_lr()[0], "step_time_s": step_time,
            "samples_per_s": layout.global_batch / step_time, "peak_memory_mb": peak / 2**20,
        }
        if (step + 1) % config.run.log_every == 0 or step + 1 == config.run.max_steps:
            log.log(step + 1, metrics)
        bar.set_postfix(reward=f"{reward_mean:.4f}", kl=f"{kl_mean:.2e}", refresh=False)
        if (step + 1) % config.run.checkpoint_every == 0 or step + 1 == config.run.max_steps:
            last_checkpoint = checkpoints.save(engine, config, step + 1, {"step": step + 1}, ctx.is_main, ctx.barrier)

    lora_path = export_lora(unet, output_dir / "lora", is_main_process=ctx.is_main)
    log.close()
    summary = {"steps": config.run.max_steps, "resumed_from_step": start_step, "world_size": ctx.world_size,
               "wall_s": time.perf_counter() - started, "lora": str(lora_path),
               "last_checkpoint": str(last_checkpoint) if last_checkpoint else None}
    if ctx.is_main:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ctx.barrier()
    return summary
