"""Multi-view images of posed bodies, as the models see them.

A sample's views are held as (D, V, 3, R, R): D = 2 domains (``DOMAINS``: normal map, RGB image) by
V rig views. Flattened for the multi-view UNet they are domain-major (row ``d * V + v``), which is
``MultiViewUNet``'s layout. The condition image of a sample is its front (view 0) RGB render.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drpose.body import joints_from_params
from drpose.cameras import CameraRig, Framing
from drpose.poses import sample_poses
from drpose.render import render_bodies

DOMAINS = ("normal", "rgb")
RGB = DOMAINS.index("rgb")
FRONT_VIEW = 0


@dataclass
class ViewBatch:
    images: torch.Tensor  # (B, D, V, 3, R, R) in [0, 1]
    joints: torch.Tensor  # (B, 22, 3) world joints, metres
    framing: Framing

    @property
    def condition(self) -> torch.Tensor:
        """(B, 3, R, R) front-view RGB images: what the model is conditioned on."""
        return self.images[:, RGB, FRONT_VIEW]


def render_views(joints: torch.Tensor, rig: CameraRig, resolution: int) -> ViewBatch:
    framing = rig.frame(joints)
    renders = render_bodies(joints, rig, resolution, framing=framing)
    return ViewBatch(torch.stack([renders.normal, renders.rgb], dim=1), joints, framing)


def sample_views(distribution: str, num: int, seed: int, rig: CameraRig, resolution: int) -> ViewBatch:
    """Render ``num`` fresh poses of ``distribution`` (deterministic by seed) in every view."""
    joints = joints_from_params(sample_poses(distribution, num, seed))
    return render_views(joints, rig, resolution)


def flatten_views(x: torch.Tensor) -> torch.Tensor:
    """(B, D, V, ...) -> (B * D * V, ...), domain-major per sample."""
    return x.reshape(-1, *x.shape[3:])


def unflatten_views(x: torch.Tensor, domains: int, views: int) -> torch.Tensor:
    """(B * D * V, ...) -> (B, D, V, ...)."""
    return x.reshape(-1, domains, views, *x.shape[1:])
