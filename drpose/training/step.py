"""One DrPose training step, the single implementation the trainer, the trainer benchmark and the dry run use.

    condition the front images -> sample the multi-view latents with the gradient policy
    -> PoseScore of the body views -> KL to the frozen model at the trained steps
    -> preservation loss -> loss = -PoseScore + w_KL * KL + w_pres * preservation -> backward

Everything random in a step (the initial noise, the unCLIP noise of the image embedding, the gradient
plan, the preservation draws) comes from (seed, step, stream position), so that a resumed run repeats
its steps exactly and 1 process with micro-batch 2 computes what 2 processes with micro-batch 1 do.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from drpose.models.pipeline import MultiViewPipeline
from drpose.models.sampling import DDIMSampler, SampleResult, SamplingPlan
from drpose.reward import PoseReward

from .data import seeded_generator
from .lora import adapters_disabled
from .preserve import PreservationSet

CONDITION_STREAM = 3_000_017  # separates the unCLIP-noise generators' seeds from the other streams


@dataclass
class StepBatch:
    """One micro-batch: front images (B, 3, R, R) in [0, 1], true joints (B, 22, 3), initial noise rows
    (2 * B * V, c, S, S), and the stream positions and step that seed everything else."""

    images: torch.Tensor
    joints: torch.Tensor
    noise: torch.Tensor
    positions: list[int]
    step: int


@dataclass
class StepModel:
    """What a step runs: the pipeline (conditioning, scheduler), the module that predicts (the UNet, or the
    DeepSpeed engine wrapping it), the UNet that carries the LoRA adapters (switched off for the frozen
    model), the reward, the sampler and, when on, the preservation pool."""

    pipeline: MultiViewPipeline
    predictor: torch.nn.Module
    adapted_unet: torch.nn.Module
    reward: PoseReward
    sampler: DDIMSampler
    kl_weight: float
    seed: int
    preserve: PreservationSet | None = None
    preserve_weight: float = 0.0
    preserve_target: str = "base"
    dtype: torch.dtype = torch.float32

    def denoiser(self, x, t, cond, keep):
        return self.pipeline.predict(x, t, cond, keep, unet=self.predictor)

    def frozen_denoiser(self, x, t, cond, keep):
        with adapters_disabled(self.adapted_unet):
            return self.pipeline.predict(x, t, cond, keep, unet=self.predictor)

    def autocast(self):
        """bf16/fp16 autocast around the step (frozen weights are stored in that dtype, LoRA in fp32)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        device = next(self.adapted_unet.parameters()).device
        return torch.autocast(device.type, dtype=self.dtype)


@dataclass
class StepResult:
    loss: torch.Tensor
    reward: torch.Tensor  # (B,)
    kl: torch.Tensor
    preserve_loss: torch.Tensor
    sample: SampleResult

    def scalars(self) -> tuple[float, float, float, float]:
        """(reward mean, KL, loss, preservation loss) as floats (one device sync)."""
        values = torch.stack([self.reward.detach().float().mean(), self.kl.detach().float(),
                              self.loss.detach().float(), self.preserve_loss.detach().float().to(self.loss.device)])
        return tuple(values.tolist())


def condition_noise(seed: int, step: int, positions: list[int], dim: int) -> torch.Tensor:
    """The unCLIP augmentation noise (B, dim) of each sample, from (seed, step, its position)."""
    return torch.stack([torch.randn(dim, generator=seeded_generator(seed, step, CONDITION_STREAM, p))
                        for p in positions])


def train_step(model: StepModel, batch: StepBatch, plan: SamplingPlan,
               backward: Callable[[torch.Tensor], None] | None = None,
               guard: Callable[[StepResult], None] | None = None) -> StepResult:
    """Compute one micro-batch's DrPose loss; ``guard`` may refuse it (e.g. a non-finite loss) before
    ``backward`` (e.g. ``engine.backward`` or ``Tensor.backward``) runs."""
    pipeline = model.pipeline
    with model.autocast():
        noise = condition_noise(model.seed, batch.step, batch.positions, pipeline.embedding_dim)
        cond = pipeline.condition(batch.images, noise=noise)
        frozen = model.frozen_denoiser if model.kl_weight > 0 else None
        sample = model.sampler.sample(model.denoiser, cond, batch.noise, plan, frozen_model=frozen)
        framing = model.reward.rig.frame(batch.joints)
        reward = model.reward(sample.x0, batch.joints, framing)
        kl = sample.kl()
        loss = -reward.mean() + model.kl_weight * kl
        preserve_loss = torch.zeros((), device=loss.device)
        if model.preserve is not None and model.preserve_weight > 0:
            preserve_loss = model.preserve.loss(
                model.denoiser, pipeline.scheduler, model.seed, batch.step, batch.positions,
                model.sampler.checkpointing, model.frozen_denoiser if model.preserve_target == "base" else None)
            loss = loss + model.preserve_weight * preserve_loss
    result = StepResult(loss, reward, kl, preserve_loss, sample)
    if guard is not None:
        guard(result)
    if backward is not None:
        backward(loss)
    return result
