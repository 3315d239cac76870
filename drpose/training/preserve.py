"""Prior preservation: keep the model where it already draws poses well, while the reward moves it elsewhere.

The reward only says where the joints are; it is blind to everything else an image must get right (in
the tiny world: each body part's colour). Adapters shared by all inputs drift on those things on every
input, including the scan-like poses that the base model was pretrained on, and the KL term on the
training inputs cannot stop that drift without also holding back the pose change the reward asks for
there. The preservation loss anchors the model where nothing should change instead: on complete
multi-view samples of the pretraining distribution, noised at a random timestep, the fine-tuned
prediction is pulled towards

* ``target: base`` (default): the base model's prediction on the same input (the same UNet with the
  adapters switched off): a KL to the base model on those poses, zero until the adapters move;
* ``target: data``: the pretraining target (the noise, or v), i.e. the standard diffusion loss, which
  also carries that loss's own sampling noise into every step.

It is added to the DrPose loss with weight ``preserve.weight``. Every training sample brings one
preservation sample, chosen with its timestep and noise from (seed, step, stream position), so a
resumed run repeats them exactly and 1 process with micro-batch 2 computes the same loss as 2
processes with micro-batch 1. The pool is rendered from the tiny world's bodies in every view and
domain (the scan-dataset analogue) and encoded with the run's codec.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from drpose.models.diffusion import add_noise, training_target
from drpose.world.assets import World, sample_latents
from drpose.world.views import FRONT_VIEW, RGB, flatten_views

from .config import ConfigError, PreserveConfig
from .data import seeded_generator

PRESERVE_STREAM = 2_000_003  # separates the preservation generators' seeds from the noise and plan streams


class PreservationSet:
    """Multi-view latents (N, D, V, c, h, w) of pretraining-distribution poses, with their conditions."""

    def __init__(self, latents: torch.Tensor, num_train_timesteps: int):
        if latents.ndim != 6 or latents.shape[0] < 1:
            raise ValueError(f"latents: expected (N >= 1, D, V, c, h, w), got {tuple(latents.shape)}")
        self.latents = latents
        self.num_train_timesteps = num_train_timesteps

    @classmethod
    def render(cls, world: World, settings: PreserveConfig, images_per_sample: int, latent_shape: tuple[int, ...],
               device: torch.device, dtype: torch.dtype) -> "PreservationSet":
        """Render and encode ``settings.num`` poses of ``settings.distribution`` with ``world``'s rig and codec.

        ``images_per_sample`` and ``latent_shape`` (c, h, w) are the fine-tuned model's; a model that does
        not generate the world's domains x views at the codec's latent shape cannot use this pool."""
        pool = sample_latents(world, [settings.distribution], settings.num, settings.seed)
        latents = pool.latents
        have = (latents.shape[1] * latents.shape[2], *latents.shape[3:])
        if have != (images_per_sample, *latent_shape):
            raise ConfigError(
                f"preserve.weight > 0: the preservation pool has {have[0]} images of latent shape {tuple(have[1:])} per "
                f"sample (the tiny world's domains x views), but the model generates {images_per_sample} of "
                f"{tuple(latent_shape)}; set preserve.weight: 0 for this model")
        return cls(latents.to(device, dtype), world.scheduler.config.num_train_timesteps)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def draw(self, seed: int, step: int, positions: list[int]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For each stream position: a pool sample, its noise and timestep. Returns clean latents
        (B * I, c, h, w), noise like them, timesteps (B * I,) shared by a sample's images, and the
        samples' conditions (B, c, h, w): their front-view RGB latents."""
        indices, noises, timesteps = [], [], []
        domains, views = self.latents.shape[1:3]
        for position in positions:
            generator = seeded_generator(seed, step, PRESERVE_STREAM, position)
            indices.append(int(torch.randint(len(self), (1,), generator=generator)))
            timesteps.append(int(torch.randint(self.num_train_timesteps, (1,), generator=generator)))
            noises.append(torch.randn((domains * views, *self.latents.shape[3:]), generator=generator))
        samples = self.latents[indices]
        x0 = flatten_views(samples)
        t = torch.tensor(timesteps).repeat_interleave(domains * views).to(x0.device)
        return x0, torch.cat(noises).to(x0), t, samples[:, RGB, FRONT_VIEW]

    def loss(self, model, scheduler, seed: int, step: int, positions: list[int], checkpointing: bool = True,
             frozen_model=None) -> torch.Tensor:
        """Mean squared error of ``model``'s prediction on the drawn samples (one per position).

        The target is the pretraining one (the noise, or v, that made the noisy input), or, with
        ``frozen_model`` (the base model: the same UNet with adapters disabled), that model's prediction
        on the same input: a KL to the base model on the pretraining distribution, zero until the
        adapters move and free of the denoising loss's own noise."""
        x0, noise, timesteps, cond = self.draw(seed, step, positions)
        noisy = add_noise(scheduler, x0, noise, timesteps)
        if frozen_model is not None:
            with torch.no_grad():
                target = frozen_model(noisy, timesteps, cond, None)
        else:
            target = training_target(scheduler, x0, noise, timesteps)
        if checkpointing:
            prediction = checkpoint(model, noisy, timesteps, cond, None, use_reentrant=False)
        else:
            prediction = model(noisy, timesteps, cond, None)
        return (prediction.float() - target.float()).pow(2).mean()
