"""Pretraining the tiny world's base model: PSHuman's multi-view UNet on ``narrow`` (scan-like) poses.

Standard diffusion training in PSHuman's batch layout: each object's 7 views x 2 domains are one group,
each (domain, group) gets its own timestep (PSHuman's training does the same), and the condition (the
condition latents and unCLIP class labels) is dropped with probability ``cond_dropout`` so that
classifier-free guidance is available. The fixed prompt embeddings train with the UNet (they start from a
small CLIP text model's encoding of PSHuman's prompts). An exponential moving average of both is kept.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

from drpose.models.diffusion import add_noise, training_target
from drpose.models.pipeline import MultiViewPipeline
from drpose.training.schedule import half_cosine

from .latents import LatentBatch


@dataclass
class Pretraining:
    steps: int = 3000
    batch_size: int = 4
    lr: float = 1e-3
    prompt_lr: float = 1e-2
    warmup_steps: int = 100
    cond_dropout: float = 0.1
    ema_decay: float = 0.995
    seed: int = 0


class Trainable(nn.Module):
    """The parts pretraining updates: the UNet and the prompt embeddings."""

    def __init__(self, unet: nn.Module, prompt_embeds: torch.Tensor):
        super().__init__()
        self.unet = unet
        self.prompt_embeds = nn.Parameter(prompt_embeds.detach().clone().float())


def diffusion_loss(pipeline: MultiViewPipeline, batch: LatentBatch, generator: torch.Generator,
                   cond_dropout: float = 0.0) -> torch.Tensor:
    """Noise-prediction (or v) MSE of ``pipeline``'s UNet on ``batch``: one timestep per (domain, object)."""
    scheduler = pipeline.scheduler
    objects, views = len(batch), pipeline.num_views
    x0 = batch.rows
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    per_group = torch.randint(0, scheduler.config.num_train_timesteps, (2, objects), generator=generator)
    timesteps = per_group[:, :, None].expand(2, objects, views).reshape(-1).to(x0.device)
    keep = (torch.rand(objects, generator=generator) >= cond_dropout).float().to(x0.device)
    prediction = pipeline.predict(add_noise(scheduler, x0, noise, timesteps), timesteps, batch.cond, keep)
    return (prediction.float() - training_target(scheduler, x0, noise, timesteps).float()).pow(2).mean()


def pretrain_base(pool: LatentBatch, pipeline: MultiViewPipeline, settings: Pretraining, show_progress: bool = True
                  ) -> list[float]:
    """Train ``pipeline``'s UNet and prompt embeddings on ``pool``; leaves their EMA in ``pipeline``. Returns
    the loss curve."""
    torch.manual_seed(settings.seed)
    trainable = Trainable(pipeline.unet.train().requires_grad_(True), pipeline.prompt_embeds)
    ema = copy.deepcopy(trainable).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW([
        {"params": list(trainable.unet.parameters()), "lr": settings.lr, "weight_decay": 1e-4},
        {"params": [trainable.prompt_embeds], "lr": settings.prompt_lr, "weight_decay": 0.0},
    ])

    def lr_factor(step: int) -> float:
        warm = min(1.0, (step + 1) / settings.warmup_steps)
        return warm * half_cosine(step / settings.steps, floor=0.1)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(settings.seed)
    losses = []
    bar = tqdm(range(settings.steps), desc="base model", disable=not show_progress, mininterval=2)
    for step in bar:
        index = torch.randint(0, len(pool), (settings.batch_size,), generator=generator)
        pipeline.prompt_embeds = trainable.prompt_embeds
        loss = diffusion_loss(pipeline, pool.select(index), generator, settings.cond_dropout)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_param, param in zip(ema.parameters(), trainable.parameters()):
                ema_param.lerp_(param, 1 - decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    pipeline.unet = ema.unet.eval()
    pipeline.prompt_embeds = ema.prompt_embeds.detach().clone()
    return losses
