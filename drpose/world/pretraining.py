"""Pretraining the tiny world's base multi-view model: standard diffusion training on ``narrow`` poses.

Each sample is a front-view RGB latent (the condition) and the latents of its 6 views x 2 domains
(the target). All images of a sample share one timestep; the condition is dropped with probability
``cond_dropout`` so that classifier-free guidance is available. An exponential moving average of the
weights is what is kept.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from tqdm import tqdm

from drpose.models.diffusion import add_noise, training_target
from drpose.models.multiview_unet import MultiViewUNet

from .latents import LatentBatch
from .views import flatten_views


@dataclass
class Pretraining:
    steps: int = 4000
    batch_size: int = 4
    lr: float = 1e-3
    warmup_steps: int = 100
    cond_dropout: float = 0.1
    ema_decay: float = 0.995
    seed: int = 0


def diffusion_loss(unet: MultiViewUNet, scheduler: DDIMScheduler, latents: torch.Tensor, cond: torch.Tensor,
                   generator: torch.Generator, cond_dropout: float = 0.0) -> torch.Tensor:
    """Noise-prediction (or v) MSE for samples ``latents`` (B, D, V, c, h, w) conditioned on ``cond`` (B, c, h, w)."""
    samples = latents.shape[0]
    per_sample = latents.shape[1] * latents.shape[2]
    x0 = flatten_views(latents)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (samples,), generator=generator)
    timesteps = timesteps.repeat_interleave(per_sample).to(x0.device)
    keep = (torch.rand(samples, generator=generator) >= cond_dropout).float().to(x0.device)
    prediction = unet(add_noise(scheduler, x0, noise, timesteps), timesteps, cond, keep)
    return (prediction.float() - training_target(scheduler, x0, noise, timesteps).float()).pow(2).mean()


def pretrain_base(pool: LatentBatch, unet: MultiViewUNet, scheduler: DDIMScheduler, settings: Pretraining,
                  show_progress: bool = True) -> tuple[MultiViewUNet, list[float]]:
    """Train ``unet`` on ``pool``; returns the EMA copy and the loss curve."""
    torch.manual_seed(settings.seed)
    unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.lr, weight_decay=1e-4)

    def lr_factor(step: int) -> float:
        warm = min(1.0, (step + 1) / settings.warmup_steps)
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / settings.steps, 1.0))))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(settings.seed)
    losses = []
    bar = tqdm(range(settings.steps), desc="base model", disable=not show_progress, mininterval=2)
    for step in bar:
        index = torch.randint(0, len(pool), (settings.batch_size,), generator=generator)
        batch = pool.select(index)
        loss = diffusion_loss(unet, scheduler, batch.latents, batch.condition, generator, settings.cond_dropout)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_param, param in zip(ema.parameters(), unet.parameters()):
                ema_param.lerp_(param, 1 - decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return ema, losses
