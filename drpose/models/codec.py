"""Latent codec: a diffusers ``AutoencoderKL`` with its scaling factor handled in one place.

``encode`` maps images in [0, 1] to scaled latents (posterior mean, so encoding is deterministic);
``decode`` maps scaled latents back to images in [0, 1]. The trainer never decodes: decoding is for
pictures and evaluation only. ``tiny_codec_config`` is the embedded world's codec (64x64 images ->
4x16x16 latents); a real Stable-Diffusion VAE loads with ``LatentCodec.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from diffusers import AutoencoderKL


def tiny_codec_config(latent_channels: int = 4, image_size: int = 64) -> dict:
    """Three levels (16/32/64 channels): 4x downsampling, so 64x64 images become 16x16 latents."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=image_size,
        scaling_factor=1.0,
    )


class LatentCodec(nn.Module):
    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    @classmethod
    def from_config(cls, config: dict) -> "LatentCodec":
        return cls(AutoencoderKL(**config))

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs) -> "LatentCodec":
        folder = Path(folder)
        source = folder / "vae" if (folder / "vae" / "config.json").exists() else folder
        if not (source / "config.json").exists():
            raise FileNotFoundError(f"no diffusers AutoencoderKL in {folder}: expected {folder}/vae/config.json "
                                    f"or {folder}/config.json")
        return cls(AutoencoderKL.from_pretrained(source, **kwargs))

    def save_pretrained(self, folder: str | Path) -> None:
        self.vae.save_pretrained(Path(folder))

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def set_scaling_factor(self, value: float) -> None:
        """Store 1/std of the unscaled latents, so that scaled latents have unit variance (as SD does)."""
        self.vae.register_to_config(scaling_factor=float(value))

    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, c, H/d, W/d) scaled latents."""
        posterior = self.vae.encode(images * 2.0 - 1.0).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mean
        return latents * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (B, 3, H, W) images in [0, 1]."""
        images = self.vae.decode(latents / self.scaling_factor).sample
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0)
