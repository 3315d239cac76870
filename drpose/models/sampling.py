"""DDIM sampling of the multi-view model with gradient policies.

A policy decides which denoising steps carry gradients to the model's weights and how:

* ``drtune`` (the paper's default): the denoiser's input is detached at every step (stop-gradient), so
  gradients flow from the reward back through the DDIM updates' linear terms to the K training steps'
  predictions, never through the UNet's Jacobian with respect to its input; sampling stops early at a
  random number of skipped final steps <= m, and the reward reads that step's x0 prediction;
* ``draft`` (DRaFT-K): full backpropagation through the last K steps;
* ``alignprop``: a random truncation point k ~ U{1..K}; full backpropagation through the last k steps;
* ``none``: no gradients (evaluation).

Every gradient-carrying model call is activation-checkpointed (non-reentrant, so it also works when no
input requires grad, as under DRTune), optionally with its saved tensors offloaded to CPU memory. The
reward input is always the x0 prediction of the last executed step (with ``set_alpha_to_one`` this is
the final sample when no step is skipped).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers import DDIMScheduler
from torch.utils.checkpoint import checkpoint

from .diffusion import alphas_at, prediction_to_x0_eps
from .layout import grid_to_rows, rows_to_grid
from .pipeline import Conditioning, MultiViewPipeline

POLICIES = ("drtune", "draft", "alignprop", "none")

Denoiser = Callable[[torch.Tensor, torch.Tensor, Conditioning, torch.Tensor], torch.Tensor]
"""model(noisy rows (2 * G * V, c, S, S), timestep (0-dim), conditioning of the G groups, keep (G,) 0/1)
-> the prediction for the rows; ``keep`` 0 drops a group's conditioning (the unconditional half of
classifier-free guidance). :meth:`MultiViewPipeline.predict` has this signature."""


@dataclass(frozen=True)
class GradientPolicy:
    name: str = "drtune"
    num_grad_steps: int = 2  # K
    early_stop_max: int = 8  # m (drtune)

    def __post_init__(self):
        if self.name not in POLICIES:
            raise ValueError(f"gradient policy must be one of {POLICIES}, got {self.name!r}")
        if self.name != "none" and self.num_grad_steps < 1:
            raise ValueError(f"num_grad_steps (K) must be >= 1 for policy {self.name!r}, got {self.num_grad_steps}")
        if self.early_stop_max < 0:
            raise ValueError(f"early_stop_max (m) must be >= 0, got {self.early_stop_max}")


@dataclass(frozen=True)
class SamplingPlan:
    """What one rollout does: how many steps run, which carry gradients, and whether inputs are detached."""

    num_steps_run: int
    grad_steps: tuple[int, ...]
    detach_inputs: bool


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def make_plan(policy: GradientPolicy, num_steps: int, generator: torch.Generator | None = None) -> SamplingPlan:
    if policy.name == "none":
        return SamplingPlan(num_steps, (), False)
    if policy.name == "drtune":
        skipped = _randint(0, min(policy.early_stop_max, num_steps - 1), generator)
        run = num_steps - skipped
        k = min(policy.num_grad_steps, run)
        interval = run // k
        offset = _randint(0, interval - 1, generator)
        return SamplingPlan(run, tuple(offset + j * interval for j in range(k)), True)
    k = min(policy.num_grad_steps, num_steps)
    if policy.name == "alignprop":
        k = _randint(1, k, generator)
    return SamplingPlan(num_steps, tuple(range(num_steps - k, num_steps)), False)


@dataclass
class StepTrace:
    index: int
    timestep: int
    carries_grad: bool
    input_requires_grad: bool


@dataclass
class SampleResult:
    x0: torch.Tensor  # (B*I, c, h, w) x0 prediction of the last executed step: the reward input
    predictions: list[torch.Tensor] = field(default_factory=list)  # gradient-carrying predictions
    frozen_predictions: list[torch.Tensor] = field(default_factory=list)  # same inputs, frozen model
    plan: SamplingPlan | None = None
    trace: list[StepTrace] = field(default_factory=list)

    def kl(self) -> torch.Tensor:
        """Mean squared distance between fine-tuned and frozen predictions at the training steps."""
        if not self.frozen_predictions:
            return self.x0.new_zeros(())
        terms = [(p.float() - f.float()).pow(2).mean() for p, f in zip(self.predictions, self.frozen_predictions)]
        return torch.stack(terms).mean()


class DDIMSampler:
    """Deterministic DDIM (eta = 0) over ``num_steps`` with classifier-free guidance, in the multi-view layout.

    A batch of B objects is 2 x B x V rows (:mod:`drpose.models.layout`). With guidance each object is two
    groups (unconditional, conditional). ``groups_per_call`` > 0 splits every UNet call into calls of at
    most that many groups; groups never interact in the model, so the result is the same, while a
    checkpointed call's backward then recomputes one chunk at a time: the peak activation memory of a
    gradient-carrying step is that of ``groups_per_call`` groups, not of the whole batch.
    """

    def __init__(self, scheduler: DDIMScheduler, num_steps: int, num_views: int, guidance_scale: float = 1.0,
                 checkpointing: bool = True, offload_activations: bool = False, groups_per_call: int = 0):
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if groups_per_call < 0:
            raise ValueError(f"groups_per_call must be >= 0 (0 = all groups in one call), got {groups_per_call}")
        self.scheduler = scheduler
        self.num_steps = num_steps
        self.num_views = num_views
        self.guidance_scale = guidance_scale
        self.checkpointing = checkpointing
        self.offload_activations = offload_activations
        self.groups_per_call = groups_per_call
        scheduler.set_timesteps(num_steps)
        self.timesteps = scheduler.timesteps.clone().long()
        # as Python numbers too: the step loop reads them without a host sync (and works on fake tensors)
        self.timestep_values = [int(t) for t in self.timesteps]
        self.final_alpha = float(scheduler.final_alpha_cumprod)

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    def calls(self, objects: int) -> list[tuple[list[int], list[int]]]:
        """The UNet calls for ``objects`` objects: (object index, keep flag) per group, chunked."""
        keeps = (0, 1) if self.guided else (1,)
        groups = [(o, k) for k in keeps for o in range(objects)]
        size = self.groups_per_call or len(groups)
        return [([o for o, _ in groups[i : i + size]], [k for _, k in groups[i : i + size]])
                for i in range(0, len(groups), size)]

    def predict(self, model: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                with_grad: bool = False) -> torch.Tensor:
        """The (guided) prediction for rows ``x`` of ``len(cond)`` objects; ``with_grad`` checkpoints every
        call (and offloads its saved tensors when configured)."""
        grid = rows_to_grid(x, self.num_views)  # (2, B, V, c, S, S)
        objects = grid.shape[1]
        outputs = {}
        for chunk, keep in self.calls(objects):
            rows = grid_to_rows(grid[:, chunk])
            keep_tensor = torch.tensor(keep, device=x.device)
            cond_chunk = cond.select(chunk)
            if with_grad and self.checkpointing:
                out = checkpoint(model, rows, t, cond_chunk, keep_tensor, use_reentrant=False)
            else:
                out = model(rows, t, cond_chunk, keep_tensor)
            out_grid = rows_to_grid(out, self.num_views)
            for index, (o, k) in enumerate(zip(chunk, keep)):
                outputs[(o, k)] = out_grid[:, index]
        if self.guided:
            pred = [outputs[(o, 0)] + self.guidance_scale * (outputs[(o, 1)] - outputs[(o, 0)]) for o in range(objects)]
        else:
            pred = [outputs[(o, 1)] for o in range(objects)]
        return grid_to_rows(torch.stack(pred, dim=1))

    def _grad_call(self, model: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        offload = (torch.autograd.graph.save_on_cpu(pin_memory=x.is_cuda) if self.offload_activations
                   else contextlib.nullcontext())
        with offload:
            return self.predict(model, x, t, cond, with_grad=True)

    def sample(self, model: Denoiser, cond: Conditioning, noise: torch.Tensor, plan: SamplingPlan,
               frozen_model: Denoiser | None = None) -> SampleResult:
        """Run ``plan`` from ``noise`` (2 * B * V, c, S, S); gradients reach ``model``'s weights only at
        ``plan.grad_steps``. ``frozen_model`` (e.g. the same UNet with adapters disabled) is evaluated
        on the same inputs at those steps for the KL term."""
        if plan.num_steps_run > self.num_steps:
            raise ValueError(f"plan runs {plan.num_steps_run} steps but the sampler has {self.num_steps}")
        result = SampleResult(x0=noise, plan=plan)
        x = noise
        grad_steps = set(plan.grad_steps)
        for index in range(plan.num_steps_run):
            t = self.timesteps[index].to(noise.device)
            carries_grad = index in grad_steps and torch.is_grad_enabled()
            model_input = x.detach() if plan.detach_inputs else x
            if carries_grad:
                prediction = self._grad_call(model, model_input, t, cond)
                result.predictions.append(prediction)
                if frozen_model is not None:
                    with torch.no_grad():
                        result.frozen_predictions.append(self.predict(frozen_model, model_input.detach(), t, cond))
            else:
                with torch.no_grad():
                    prediction = self.predict(model, model_input, t, cond)
            result.trace.append(StepTrace(index, self.timestep_values[index], carries_grad, model_input.requires_grad))
            # the update in fp32, stored back in the latents' dtype: in bf16, alpha_bar(t) of a low-noise step
            # (0.998 at t = 1) rounds to 1, which would drop the prediction (and its gradient) from x0
            x32 = x.float()
            alpha = alphas_at(self.scheduler, t.view(1), x32)
            x0, eps = prediction_to_x0_eps(self.scheduler, prediction.float(), x32, alpha)
            result.x0 = x0.to(noise.dtype)
            if index + 1 < self.num_steps:
                alpha_prev = alphas_at(self.scheduler, self.timesteps[index + 1].view(1), x32)
            else:
                alpha_prev = torch.full_like(alpha, self.final_alpha)
            x = (alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps).to(noise.dtype)
        return result


@torch.no_grad()
def generate(model: Denoiser, sampler: DDIMSampler, cond: Conditioning, latent_shape: tuple[int, int, int],
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample every view of each object of ``cond`` without gradients: rows (2 * B * V, c, S, S).

    Noise is drawn on the CPU from ``generator`` so results do not depend on the device."""
    rows = 2 * len(cond) * sampler.num_views
    noise = torch.randn((rows, *latent_shape), generator=generator).to(cond.latents)
    plan = SamplingPlan(sampler.num_steps, (), False)
    return sampler.sample(model, cond, noise, plan).x0


@torch.no_grad()
def generate_views(pipeline: MultiViewPipeline, sampler: DDIMSampler, cond: Conditioning, seed: int,
                   chunk: int = 8, unet=None) -> torch.Tensor:
    """Generated latents (B, 2, V, c, h, w) for the conditioning of B objects, deterministic by seed;
    ``unet`` replaces the pipeline's (e.g. one with adapters loaded)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (pipeline.latent_channels, pipeline.latent_size, pipeline.latent_size)

    def model(x, t, c, keep):
        return pipeline.predict(x, t, c, keep, unet=unet)

    out = []
    for start in range(0, len(cond), chunk):
        rows = generate(model, sampler, cond.select(slice(start, start + chunk)), shape, generator)
        out.append(rows_to_grid(rows, pipeline.num_views).transpose(0, 1))
    return torch.cat(out)
