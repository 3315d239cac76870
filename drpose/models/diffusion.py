"""Noise schedule helpers shared by pretraining and sampling.

The schedule (betas, timestep spacing, prediction type) comes from a diffusers ``DDIMScheduler``; the
conversions between a model prediction and (x0, eps) are written out here because the sampler needs
them differentiable and explicit about which tensors carry gradients.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler


def make_scheduler(prediction_type: str = "epsilon", **overrides) -> DDIMScheduler:
    """Stable-Diffusion betas with trailing timestep spacing (the first step starts from t = 999)."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    settings = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        prediction_type=prediction_type,
    )
    settings.update(overrides)
    return DDIMScheduler(**settings)


def alphas_at(scheduler: DDIMScheduler, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar(t) broadcastable against ``like`` (rows first)."""
    alphas = scheduler.alphas_cumprod.to(device=like.device, dtype=torch.float32)[timesteps.long().to(like.device)]
    return alphas.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def prediction_to_x0_eps(scheduler: DDIMScheduler, prediction: torch.Tensor, x_t: torch.Tensor,
                         alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) implied by a model prediction at a noisy sample with alpha_bar = ``alpha``."""
    sqrt_a, sqrt_1ma = alpha.sqrt(), (1 - alpha).sqrt()
    if scheduler.config.prediction_type == "epsilon":
        eps = prediction
        x0 = (x_t - sqrt_1ma * eps) / sqrt_a
    else:  # v_prediction
        x0 = sqrt_a * x_t - sqrt_1ma * prediction
        eps = sqrt_a * prediction + sqrt_1ma * x_t
    return x0, eps


def training_target(scheduler: DDIMScheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the model is trained to predict for ``x0`` noised with ``noise`` at ``timesteps``."""
    if scheduler.config.prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(x0, noise, timesteps)


def add_noise(scheduler: DDIMScheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    alpha = alphas_at(scheduler, timesteps, x0)
    return alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
