"""PoseScore as a reward module: generated latents + ground-truth joints -> one reward per object.

g_skel reads each generated body view's latents (normal and RGB stacked on channels) as heatmap logits at
latent resolution; the true joints are projected through the bundle's rig into every body view as joint
and bone segments, where the model draws them (mirrored views flipped), weighted 0 where they leave the
frame; the fused op compares the two (see ``drpose_kernels``). The face view is never scored. The op's
value checks (finite segments, non-negative weights) cost a host synchronisation, so they run on the
first call only (or on every call with ``validate_every_call``); later calls cost three kernel launches.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from drpose.cameras import Framing
from drpose.models.g_skel import GSkel
from drpose.models.layout import NUM_BODY_VIEWS, body_views
from drpose.models.rig import ViewRig
from drpose.skeleton import NUM_BODY_JOINTS
from drpose_kernels import pose_score


class PoseReward(nn.Module):
    def __init__(self, g_skel: GSkel, rig: ViewRig, num_views: int, sigma: float, backend: str = "auto",
                 include_bones: bool = True, validate_every_call: bool = False, bone_weight: float = 1.0):
        super().__init__()
        self.g_skel = g_skel.requires_grad_(False).eval()
        self.rig = rig
        self.num_views = num_views
        self.sigma = float(sigma)
        self.backend = backend
        self.include_bones = include_bones
        if bone_weight < 0:
            raise ValueError(f"bone_weight must be >= 0, got {bone_weight}")
        self.bone_weight = float(bone_weight)
        self.validate_every_call = validate_every_call
        self.values_checked = False

    @classmethod
    def from_bundle(cls, bundle, sigma: float | None = None, backend: str = "auto",
                    include_bones: bool = True, bone_weight: float = 1.0) -> "PoseReward":
        return cls(bundle.g_skel, bundle.rig, bundle.num_views, bundle.sigma if sigma is None else sigma, backend,
                   include_bones, bone_weight=bone_weight)

    def targets(self, joints: torch.Tensor, framing: Framing, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Segments (B * 6, C, 2, 2) and weights (B, 6, C) at heatmap side ``size``, as generated."""
        segments, weights = self.rig.segments_and_weights(joints, size, self.include_bones, framing)
        if self.include_bones and self.bone_weight != 1.0:
            weights = torch.cat([weights[..., :NUM_BODY_JOINTS], self.bone_weight * weights[..., NUM_BODY_JOINTS:]], -1)
        return segments.flatten(0, 1), weights

    def logits(self, x0: torch.Tensor) -> torch.Tensor:
        """g_skel's heatmap logits (B * 6, C, h, w) of generated rows (2 * B * V, c, h, w)."""
        views = body_views(x0, self.num_views).flatten(0, 1)
        return self.g_skel(views.to(next(self.g_skel.parameters()).dtype))

    def forward(self, x0: torch.Tensor, joints: torch.Tensor, framing: Framing) -> torch.Tensor:
        """x0: generated rows (2 * B * V, c, h, w) in the multi-view layout; joints (B, 22, 3). Returns (B,)."""
        logits = self.logits(x0)
        segments, weights = self.targets(joints, framing, x0.shape[-1])
        score = pose_score(logits, segments.to(logits.device), weights.to(logits.device), self.sigma, NUM_BODY_VIEWS,
                           backend=self.backend, validate=self.validate_every_call or not self.values_checked)
        self.values_checked = True
        return score
