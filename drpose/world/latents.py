"""Multi-view renders encoded into latents with a pipeline's VAE, with their conditioning and poses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drpose.cameras import Framing
from drpose.models.layout import grid_to_rows
from drpose.models.pipeline import Conditioning, MultiViewPipeline

from .views import ViewBatch


@dataclass
class LatentBatch:
    """Latents of multi-view renders with the conditioning and pose needed to train on and score them."""

    latents: torch.Tensor  # (B, 2, V, c, h, w)
    cond: Conditioning  # per object
    joints: torch.Tensor  # (B, 22, 3)
    framing: Framing

    def __len__(self) -> int:
        return self.latents.shape[0]

    def select(self, index) -> "LatentBatch":
        return LatentBatch(self.latents[index], self.cond.select(index), self.joints[index],
                           Framing(self.framing.centre[index], self.framing.half_extent[index]))

    @property
    def rows(self) -> torch.Tensor:
        """The latents as UNet rows (2 * B * V, c, h, w)."""
        return grid_to_rows(self.latents.transpose(0, 1))


@torch.no_grad()
def encode_images(pipeline: MultiViewPipeline, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(..., 3, R, R) in [0, 1] -> (..., c, R/d, R/d) scaled latents, in chunks."""
    flat = images.reshape(-1, *images.shape[-3:])
    out = torch.cat([pipeline.encode_images(flat[i : i + chunk]) for i in range(0, flat.shape[0], chunk)])
    return out.reshape(*images.shape[:-3], *out.shape[1:]).float()


@torch.no_grad()
def encode_views(pipeline: MultiViewPipeline, batch: ViewBatch, seed: int, chunk: int = 64) -> LatentBatch:
    """Encode every view and the conditioning (seeded unCLIP noise) of ``batch``."""
    generator = torch.Generator().manual_seed(seed)
    conds = [pipeline.condition(batch.condition[i : i + chunk], generator=generator).to(torch.float32)
             for i in range(0, len(batch), chunk)]
    return LatentBatch(encode_images(pipeline, batch.images), Conditioning.cat(conds), batch.joints, batch.framing)


def concat_latent_batches(batches: list[LatentBatch]) -> LatentBatch:
    return LatentBatch(
        torch.cat([b.latents for b in batches]),
        Conditioning.cat([b.cond for b in batches]),
        torch.cat([b.joints for b in batches]),
        Framing(torch.cat([b.framing.centre for b in batches]), torch.cat([b.framing.half_extent for b in batches])),
    )


def g_skel_inputs(latents: torch.Tensor) -> torch.Tensor:
    """(B, 2, V, c, h, w) -> (B * 6, 2 * c, h, w): each body view's normal and RGB latents on channels."""
    body = latents[:, :, :6]
    b, d, v, c, h, w = body.shape
    return body.permute(0, 2, 1, 3, 4, 5).reshape(b * v, d * c, h, w)
