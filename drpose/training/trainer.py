"""The DrPose training loop on DeepSpeed.

One optimizer step: for each micro-batch of (front image, pose), :func:`~drpose.training.step.train_step`
(condition -> sample the multi-view latents with the gradient policy -> g_skel -> PoseScore (fused op on
GPU, reference on CPU) -> loss = -PoseScore + w_KL * KL (+ w_pres * the preservation loss,
:mod:`drpose.training.preserve`) -> DeepSpeed backward); then DeepSpeed's optimizer step, logging and
checkpointing. Only LoRA adapters train. The model is a bundle (:mod:`drpose.models.bundle`): the tiny
world's by default, or a PSHuman folder plus a g_skel folder.

Before any work, rank 0 locks ``run.output_dir`` and checks what it holds and what ``--resume`` names
(:mod:`drpose.training.run_folder`, :mod:`drpose.training.checkpoints`); every rank then starts, or stops
with the same error.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from drpose.data.dataset import DatasetError, DrPoseDataset
from drpose.data.synthesize import source_prefix, synthesize
from drpose.memory import read_peak, reset_peak
from drpose.models.bundle import ModelBundle
from drpose.models.sampling import DDIMSampler, GradientPolicy, make_plan
from drpose.reward import PoseReward

from . import checkpoints, run_folder
from .config import ConfigError, TrainConfig, check_files, read_deepspeed_config, resolved_yaml
from .data import BatchLayout, SampleStream, collate, sample_noise, seeded_generator
from .ema import AdapterEMA
from .lora import add_lora, export_lora, local_tensor
from .metrics_log import MetricsLog
from .preserve import PreservationSet
from .rendezvous import free_port
from .schedule import half_cosine
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

    def share(self, value):
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if dist.is_initialized() and self.world_size > 1:
            box = [value]
            dist.broadcast_object_list(box, src=0)
            return box[0]
        return value

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


def deepspeed_config(config: TrainConfig, world_size: int, dtype: torch.dtype = torch.float32) -> dict:
    """The DeepSpeed JSON of the run, with the settings the trainer owns.

    ``torch_autocast``: the step runs under ``torch.autocast`` in the run dtype (``StepModel.autocast``), and
    the UNet's gradient-carrying calls go through the engine. DeepSpeed's engine switches a CUDA autocast
    that is active around its forward *off* inside it unless its own ``torch_autocast`` is enabled, so
    without this section every gradient-carrying UNet call on a GPU would run in plain bf16 (normalisation
    and softmax included) while the frozen calls ran under autocast. Enabled with the run's dtype, the
    engine keeps the same autocast; ``lower_precision_safe_modules: []`` marks no parameter for reduced-
    precision communication, so the LoRA gradients are reduced in fp32 as before."""
    ds = read_deepspeed_config(config.run.deepspeed_config)
    ds.update(
        train_micro_batch_size_per_gpu=config.data.batch_size,
        gradient_accumulation_steps=config.data.grad_accum,
        train_batch_size=config.data.batch_size * config.data.grad_accum * world_size,
        gradient_clipping=config.optim.max_grad_norm,
    )
    if dtype != torch.float32:
        ds["torch_autocast"] = {"enabled": True, "dtype": str(dtype).removeprefix("torch."),
                                "lower_precision_safe_modules": []}
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def prepare_data(config: TrainConfig, ctx: DistributedContext, image_size: int) -> DrPoseDataset:
    data = config.data
    dataset = _synthesized_folder(Path(data.path), "data", data.synthesize_distribution, data.synthesize_num,
                                  data.synthesize_seed, data.synthesize_fps_pool, image_size, ctx,
                                  data.synthesize_breaking_share)
    if data.synthesize_distribution is not None:
        check_synthesized(dataset, "data.path", data.synthesize_distribution, data.synthesize_num,
                          data.synthesize_seed, data.synthesize_fps_pool, data.synthesize_breaking_share)
    if dataset.image_size != image_size:
        raise ConfigError(f"data.path: {dataset.root} holds {dataset.image_size}px images; the model takes "
                          f"{image_size}x{image_size}")
    return dataset


def _synthesized_folder(path: Path, section: str, distribution: str | None, num: int, seed: int,
                        fps_pool: int | None, image_size: int, ctx: DistributedContext,
                        breaking_share: float | None = None) -> DrPoseDataset:
    """The dataset at ``path``; rank 0 synthesizes it first when it is missing and ``distribution`` is set."""
    if not (path / "manifest.jsonl").exists():
        if distribution is None:
            raise ConfigError(f"{section}.path: no dataset at {path}; create one with `python -m drpose.data.synthesize "
                              f"--out {path} --num 256 --distribution broad --seed 300`, or set "
                              f"{section}.{'synthesize_distribution' if section == 'data' else 'distribution'} to have "
                              f"the trainer create it")
        if ctx.is_main:
            picked = f" (the most diverse of {fps_pool}, farthest-point sampling)" if fps_pool is not None else ""
            share = f", {breaking_share:g} of them breaking moves" if breaking_share is not None else ""
            print(f"[drpose] synthesizing {num} {distribution} poses{picked}{share} into {path}", flush=True)
            synthesize(path, num, distribution, seed, image_size, progress=True, fps_pool=fps_pool,
                       breaking_share=breaking_share)
        ctx.barrier()
    try:
        return DrPoseDataset(path)
    except DatasetError as error:
        raise ConfigError(f"{section}.path: {path}: {error}") from error


def check_synthesized(dataset: DrPoseDataset, key: str, distribution: str, num: int, seed: int,
                      fps_pool: int | None, breaking_share: float | None = None) -> None:
    """A folder the trainer synthesized earlier must match what the config asks for now (a dataset of one's own,
    whose records are not all synthetic, is used as it is)."""
    sources = [record.source or "" for record in dataset.records]
    if not all(source.startswith("synthetic:") for source in sources):
        return
    expected = source_prefix(distribution, seed, fps_pool, breaking_share)
    if len(sources) != num or not all(source.startswith(expected) for source in sources):
        found = sources[0].rsplit("index=", 1)[0] if sources else "nothing"
        raise ConfigError(
            f"{key}: {dataset.root} holds {len(sources)} synthetic records ({found}...), not the {num} the config "
            f"asks for ({expected}...); remove the folder to have it synthesized again, point {key} elsewhere, or "
            f"set the synthesis settings to null to train on it as it is")


def _lr_lambda(warmup_steps: int, schedule: str = "constant", max_steps: int = 0, min_lr_ratio: float = 0.0):
    """The learning rate's factor at optimizer step ``step`` (0-based): a linear warm-up over
    ``warmup_steps``, then constant, or a half cosine from 1 to ``min_lr_ratio`` at step ``max_steps - 1``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(max_steps - 1 - warmup_steps, 1)
        return half_cosine(max(step - warmup_steps, 0) / span, min_lr_ratio)

    return factor


def prepare_preservation(config: TrainConfig, bundle: ModelBundle, ctx: DistributedContext,
                         dtype: torch.dtype) -> PreservationSet | None:
    settings = config.preserve
    if settings.weight <= 0:
        return None
    dataset_path = Path(settings.path)
    _synthesized_folder(dataset_path, "preserve", settings.distribution, settings.num, settings.seed, None,
                        bundle.image_size, ctx)
    return PreservationSet.from_folder(dataset_path, bundle.pipeline, bundle.rig, settings.seed, ctx.device, dtype,
                                       cache=settings.cache, max_timestep=settings.max_timestep)


def claim_output(config: TrainConfig, ctx: DistributedContext, resume: str | None,
                 overwrite: bool) -> tuple[run_folder.RunLock | None, Path | None, dict]:
    """Rank 0 locks ``run.output_dir``, checks what it holds and the checkpoint ``--resume`` names, and writes the
    run's config.yaml; every rank gets (rank 0's lock, the checkpoint to resume from or None, the settings changed
    since it) or rank 0's error."""
    lock, result, error = None, (None, {}), None
    if ctx.is_main:
        try:
            lock, contents = run_folder.claim(config.run.output_dir, resume is not None, overwrite)
            if lock.note:
                print(f"[drpose] {lock.note}", flush=True)
            if resume:
                folder = checkpoints.resolve_resume(config, resume, run_started=bool(contents or lock.stale))
                if folder is None:
                    print(f"[drpose] --resume {resume}: no checkpoint yet in {config.run.output_dir}; starting "
                          f"again at step 0", flush=True)
                else:
                    step = checkpoints.read_info(folder)["step"]
                    if step > config.run.max_steps:
                        raise ConfigError(f"run.max_steps={config.run.max_steps} is below the step of {folder} "
                                          f"({step}); raise run.max_steps to continue that run")
                    result = (folder, checkpoints.changed_settings(config, folder))
                (Path(config.run.output_dir) / "summary.json").unlink(missing_ok=True)
            (Path(config.run.output_dir) / "config.yaml").write_text(resolved_yaml(config))
        except ConfigError as caught:
            error = caught
            if lock is not None:
                lock.release()
                lock = None
    if ctx.any(error is not None):
        raise error if error is not None else ConfigError("rank 0 could not start the run (see its message)")
    folder, changes = ctx.share(result)
    return lock, folder, changes


def describe_resume(folder: Path, step: int, config: TrainConfig, changes: dict) -> str:
    """What a resumed run takes from the checkpoint and what from the config."""
    changed = [f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items()]
    return (f"[drpose] resumed from {folder} at step {step} of {config.run.max_steps}\n"
            f"[drpose]   from the checkpoint: the LoRA weights, the optimizer moments"
            + (", the adapters' average (optim.ema_decay)" if config.optim.ema_decay is not None else "")
            + f" and the step (data order, noise "
            f"and plans follow from run.seed and the step)\n"
            f"[drpose]   from the config: every setting, learning rate, warm-up, weight decay and run.max_steps "
            f"included; " + (f"changed since the checkpoint, applied from step {step + 1}: {'; '.join(changed)}"
                             if changed else "none changed since the checkpoint"))


def train(config: TrainConfig, resume: str | None = None, overwrite: bool = False) -> dict:
    """Train with ``config``; ``resume``: continue the run in ``run.output_dir`` ("latest", a step or a
    checkpoint folder); ``overwrite``: delete the run there and start again."""
    ctx = setup_distributed()
    check_files(config)
    lock, resume_from, changes = claim_output(config, ctx, resume, overwrite)
    try:
        return _train(config, ctx, resume_from, changes)
    finally:
        if lock is not None:
            lock.release()


def _train(config: TrainConfig, ctx: DistributedContext, resume_from: Path | None, changes: dict) -> dict:
    import deepspeed

    torch.manual_seed(config.run.seed)
    dtype = run_dtype(config, ctx.device)
    bundle = load_bundle(config, ctx.device, dtype)
    pipeline, unet = bundle.pipeline, bundle.pipeline.unet
    reward_fn = PoseReward.from_bundle(bundle, config.reward.sigma, config.reward.backend, config.reward.include_bones,
                                    config.reward.bone_weight)
    lora_params = add_lora(unet, config.lora)
    if config.sampling.unet_checkpointing:
        unet.enable_gradient_checkpointing()
    dataset = prepare_data(config, ctx, bundle.image_size)
    preserve = prepare_preservation(config, bundle, ctx, dtype)

    optim = config.optim
    optimizer = torch.optim.AdamW(lora_params, lr=optim.lr, weight_decay=optim.weight_decay)
    schedule = _lr_lambda(optim.warmup_steps, optim.schedule, config.run.max_steps, optim.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=unet, model_parameters=lora_params, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(config, ctx.world_size, dtype), dist_init_required=False,
    )

    start_step, last_checkpoint = 0, None
    if resume_from is not None:
        client_state = checkpoints.load(engine, resume_from)
        checkpoints.apply_optimizer_settings(scheduler, config)
        start_step, last_checkpoint = int(client_state["step"]), resume_from
        if ctx.is_main:
            moved = checkpoints.supersede_later(resume_from.parent, start_step)
            if moved:
                print(f"[drpose] moved the checkpoints after step {start_step} (of the run's abandoned later steps) "
                      f"to {moved[0].parent}", flush=True)
            print(describe_resume(resume_from, start_step, config, changes), flush=True)
    # the checkpoint of the weights the next step starts from, until that step's loss is known to be finite
    pending = last_checkpoint
    ema = None
    if optim.ema_decay is not None:
        ema = AdapterEMA(lora_params, optim.ema_decay)
        if resume_from is not None and not ema.load(resume_from, ctx.rank) and ctx.is_main:
            print(f"[drpose] {resume_from} holds no average of the adapters (its run had no optim.ema_decay): "
                  f"the average starts from its weights", flush=True)

    output_dir = Path(config.run.output_dir)
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

    def last_good_advice() -> str:
        good = checkpoints.last_good(checkpoints.checkpoint_root(config))
        if good is None:
            return ("Last good checkpoint: none (no checkpoint's weights were followed by a finite loss). Fix the "
                    "cause (e.g. a smaller optim.lr) and start again with --overwrite")
        return (f"Last good checkpoint: {good}. Fix the cause (e.g. a smaller optim.lr, the data, the precision) and "
                f"continue from it with --resume {checkpoints.read_info(good)['step']}")

    def stop_if_not_finite(result: StepResult) -> None:
        if ctx.any(not torch.isfinite(result.loss).item()):
            if ctx.is_main and pending is not None and checkpoints.read_info(pending)["step"] == step:
                checkpoints.record_next_loss(pending, False)
            ctx.barrier()
            raise TrainingStopped(
                f"non-finite loss at step {step + 1} (reward {result.reward.detach().float().mean().item()}, kl "
                f"{result.kl.item()}); stopped without updating the weights. {last_good_advice()}")

    def weights_finite() -> bool:
        return not ctx.any(not all(torch.isfinite(local_tensor(p)).all().item() for p in lora_params))

    started = time.perf_counter()
    bar = tqdm(range(start_step, config.run.max_steps), initial=start_step, total=config.run.max_steps,
               desc="DrPose", disable=not ctx.is_main, mininterval=1)
    for step in bar:
        step_started = time.perf_counter()
        baseline = reset_peak(ctx.device)
        totals = [0.0, 0.0, 0.0, 0.0]
        lr = scheduler.optimizer.param_groups[0]["lr"]  # the learning rate this step's update uses
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
        if ema is not None:
            ema.update(step + 1)
        if pending is not None:  # this step's loss, from the weights of ``pending``, was finite
            if ctx.is_main and checkpoints.read_info(pending)["step"] == step:
                checkpoints.record_next_loss(pending, True)
            pending = None
        step_time = time.perf_counter() - step_started
        peak, _ = read_peak(ctx.device, baseline)
        reward_mean, kl_mean, loss_mean, preserve_mean = ctx.mean([t / config.data.grad_accum for t in totals])
        grad_norm = engine.get_global_grad_norm()
        metrics = {
            "reward": reward_mean, "kl": kl_mean, "loss": loss_mean,
            **({"preserve_loss": preserve_mean} if preserve is not None else {}),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": lr, "step_time_s": step_time,
            "samples_per_s": layout.global_batch / step_time, "peak_memory_mb": peak / 2**20,
        }
        if (step + 1) % config.run.log_every == 0 or step + 1 == config.run.max_steps:
            log.log(step + 1, metrics)
        bar.set_postfix(reward=f"{reward_mean:.4f}", kl=f"{kl_mean:.2e}", refresh=False)
        if (step + 1) % config.run.checkpoint_every == 0 or step + 1 == config.run.max_steps:
            finite = weights_finite()
            last_checkpoint = checkpoints.save(engine, config, step + 1, {"step": step + 1}, finite, ctx.is_main,
                                               ctx.barrier, (lambda folder: ema.save(folder, ctx.rank)) if ema else
                                               None)
            pending = last_checkpoint
            if not finite:
                raise TrainingStopped(f"the weights after step {step + 1} are not finite (saved, marked so, in "
                                      f"{last_checkpoint}). {last_good_advice()}")

    # lora/: what evaluation and generation read (the average, with optim.ema_decay); lora_last/: the last step's
    last_path = export_lora(unet, output_dir / "lora_last", is_main_process=ctx.is_main) if ema else None
    with ema.applied() if ema else contextlib.nullcontext():
        lora_path = export_lora(unet, output_dir / "lora", is_main_process=ctx.is_main)
    log.close()
    summary = {"steps": config.run.max_steps, "resumed_from_step": start_step, "world_size": ctx.world_size,
               "wall_s": time.perf_counter() - started, "lora": str(lora_path),
               **({"lora_last": str(last_path)} if last_path is not None else {}),
               "last_checkpoint": str(last_checkpoint) if last_checkpoint else None}
    if ctx.is_main:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ctx.barrier()
    return summary
