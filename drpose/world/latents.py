"""Encoding multi-view renders into latents and deriving g_skel inputs and heatmap targets from them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drpose.cameras import CameraRig, Framing
from drpose.models.codec import LatentCodec

from .views import FRONT_VIEW, RGB, ViewBatch


@dataclass
class LatentBatch:
    """Latents of multi-view renders with the pose information needed to score them."""

    latents: torch.Tensor  # (B, D, V, c, h, w)
    joints: torch.Tensor  # (B, 22, 3)
    framing: Framing

    def __len__(self) -> int:
        return self.latents.shape[0]

    def select(self, index) -> "LatentBatch":
        return LatentBatch(self.latents[index], self.joints[index],
                           Framing(self.framing.centre[index], self.framing.half_extent[index]))

    @property
    def condition(self) -> torch.Tensor:
        """(B, c, h, w) latent of the front-view RGB image."""
        return self.latents[:, RGB, FRONT_VIEW]


@torch.no_grad()
def encode_images(codec: LatentCodec, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(..., 3, R, R) in [0, 1] -> (..., c, R/d, R/d) scaled latents, in chunks."""
    flat = images.reshape(-1, *images.shape[-3:])
    out = torch.cat([codec.encode(flat[i : i + chunk]) for i in range(0, flat.shape[0], chunk)])
    return out.reshape(*images.shape[:-3], *out.shape[1:])


def encode_views(codec: LatentCodec, batch: ViewBatch) -> LatentBatch:
    return LatentBatch(encode_images(codec, batch.images), batch.joints, batch.framing)


def concat_latent_batches(batches: list[LatentBatch]) -> LatentBatch:
    return LatentBatch(
        torch.cat([b.latents for b in batches]),
        torch.cat([b.joints for b in batches]),
        Framing(torch.cat([b.framing.centre for b in batches]), torch.cat([b.framing.half_extent for b in batches])),
    )


def g_skel_inputs(latents: torch.Tensor) -> torch.Tensor:
    """(B, D, V, c, h, w) -> (B * V, D * c, h, w): each view's normal and RGB latents on channels."""
    b, d, v, c, h, w = latents.shape
    return latents.permute(0, 2, 1, 3, 4, 5).reshape(b * v, d * c, h, w)


def heatmap_targets(rig: CameraRig, joints: torch.Tensor, framing: Framing, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segments (B * V, C, 2, 2) and weights (B * V, C) at heatmap side ``size`` (joints, then bones)."""
    segments, weights = rig.segments_and_weights(joints, size, include_bones=True, framing=framing)
    return segments.flatten(0, 1), weights.flatten(0, 1)
