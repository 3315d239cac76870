"""PoseScore as a reward module: generated latents + ground-truth joints -> one reward per sample.

g_skel reads each generated view's latents (normal and RGB stacked) as heatmap logits at latent
resolution; the true joints are projected through the rig into every view as joint and bone segments,
weighted 0 where they leave the frame; the fused op compares the two (see ``drpose_kernels``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from drpose.cameras import CameraRig, Framing
from drpose.models.g_skel import GSkel
from drpose.world.latents import g_skel_inputs
from drpose.world.views import unflatten_views
from drpose_kernels import pose_score


class PoseReward(nn.Module):
    def __init__(self, g_skel: GSkel, rig: CameraRig, num_domains: int, sigma: float, backend: str = "auto",
                 include_bones: bool = True):
        super().__init__()
        self.g_skel = g_skel.requires_grad_(False).eval()
        self.rig = rig
        self.num_domains = num_domains
        self.sigma = sigma
        self.backend = backend
        self.include_bones = include_bones

    def targets(self, joints: torch.Tensor, framing: Framing, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Segments (B * V, C, 2, 2) and weights (B, V, C) at heatmap side ``size``."""
        segments, weights = self.rig.segments_and_weights(joints, size, self.include_bones, framing)
        return segments.flatten(0, 1), weights

    def forward(self, x0: torch.Tensor, joints: torch.Tensor, framing: Framing) -> torch.Tensor:
        """x0: (B * D * V, c, h, w) generated latents, domain-major per sample; joints (B, 22, 3)."""
        views = self.rig.num_views
        latents = unflatten_views(x0, self.num_domains, views)
        logits = self.g_skel(g_skel_inputs(latents).to(next(self.g_skel.parameters()).dtype))
        segments, weights = self.targets(joints, framing, x0.shape[-1])
        return pose_score(logits, segments.to(logits.device), weights.to(logits.device), self.sigma, views,
                          backend=self.backend)
