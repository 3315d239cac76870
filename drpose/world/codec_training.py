"""Training the tiny world's VAE (a small diffusers AutoencoderKL) on multi-view renders."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from diffusers import AutoencoderKL

from drpose.training.schedule import half_cosine


def tiny_vae_config(latent_channels: int = 4, image_size: int = 72) -> dict:
    """Three levels (16/32/64 channels): 4x downsampling, so 72x72 images become 18x18 latents."""
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=image_size, scaling_factor=1.0,
    )  # fmt: skip


@dataclass
class CodecTraining:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    kl_weight: float = 1e-6  # a whisper of KL keeps the latent scale tame, as in SD's VAE
    edge_weight: float = 0.5  # L1 on image gradients: keeps part boundaries sharp
    body_weight: float = 10.0  # body pixels count this much more than background ones (see body_mask)
    seed: int = 0


def _image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def body_mask(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, R, R) 1 on the body: not the white RGB background and not the black normal-map background."""
    not_white = images.amin(dim=1, keepdim=True) < 0.98
    not_black = images.amax(dim=1, keepdim=True) > 0.02
    return (not_white & not_black).float()


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, edge_weight: float,
                        body_weight: float = 1.0) -> torch.Tensor:
    """Weighted L1 on pixels and on image gradients. Bodies cover a small part of each image, so with an
    unweighted loss the codec can blur the part colours into a few averages at little cost; weighting
    body pixels makes it keep every part's hue, which the colour-based evaluator reads."""
    weight = 1.0 + (body_weight - 1.0) * body_mask(target)
    weight = weight / weight.mean()
    loss = ((reconstruction - target).abs() * weight).mean()
    for axis, (rec_grad, target_grad) in enumerate(zip(_image_gradients(reconstruction), _image_gradients(target))):
        pair_weight = torch.maximum(weight[..., 1:, :], weight[..., :-1, :]) if axis == 0 else \
            torch.maximum(weight[..., :, 1:], weight[..., :, :-1])
        loss = loss + edge_weight * ((rec_grad - target_grad).abs() * pair_weight).mean()
    return loss


def train_codec(images: torch.Tensor, settings: CodecTraining, latent_channels: int = 4, show_progress: bool = True
                ) -> tuple[AutoencoderKL, list[float]]:
    """Train a VAE on ``images`` (N, 3, R, R) uint8; sets the scaling factor so scaled latents have unit std."""
    torch.manual_seed(settings.seed)
    vae = AutoencoderKL(**tiny_vae_config(latent_channels, images.shape[-1]))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 50) * half_cosine(step / settings.steps))
    generator = torch.Generator().manual_seed(settings.seed)
    losses = []
    bar = tqdm(range(settings.steps), desc="codec", disable=not show_progress, mininterval=2)
    for _ in bar:
        index = torch.randint(0, images.shape[0], (settings.batch_size,), generator=generator)
        target = images[index].float() / 255.0
        posterior = vae.encode(target * 2 - 1).latent_dist
        reconstruction = (vae.decode(posterior.sample(generator)).sample + 1) / 2
        loss = reconstruction_loss(reconstruction, target, settings.edge_weight, settings.body_weight)
        total = loss + settings.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    vae.eval()
    with torch.no_grad():
        sample = images[torch.randperm(images.shape[0], generator=generator)[:512]].float() / 255.0
        latents = torch.cat([vae.encode(chunk * 2 - 1).latent_dist.mean for chunk in sample.split(128)])
    vae.register_to_config(scaling_factor=1.0 / latents.std().item())
    return vae, losses


@torch.no_grad()
def reconstruction_error(pipeline, images: torch.Tensor) -> float:
    """Mean absolute error of encode -> decode through ``pipeline``'s VAE on ``images`` (N, 3, R, R) uint8."""
    target = images.float() / 255.0
    errors = [(pipeline.decode_latents(pipeline.encode_images(chunk)) - chunk).abs().mean() * chunk.shape[0]
              for chunk in target.split(128)]
    return (torch.stack(errors).sum() / target.shape[0]).item()
