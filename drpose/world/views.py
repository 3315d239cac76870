"""Multi-view images of posed bodies, as a PSHuman-style model generates them.

A sample's views are held as (2, V, 3, R, R) per object, i.e. (B, 2, V, 3, R, R) for a batch: domain 0
the normal maps, domain 1 the RGB images (:mod:`drpose.models.layout`), V = 7 views: the 6 body views of
the rig (back and left mirrored, normals in the input camera's frame; :class:`~drpose.models.rig.ViewRig`)
and the face view, the top-centre third of the front image upsampled 3x. The condition image of a sample
is its front RGB render (the input photo's analogue).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drpose.body import joints_from_params
from drpose.cameras import Framing
from drpose.models.layout import COLOR
from drpose.models.rig import ViewRig
from drpose.poses import sample_poses
from drpose.render import render_bodies

FRONT_VIEW = 0


@dataclass
class ViewBatch:
    images: torch.Tensor  # (B, 2, V, 3, R, R) in [0, 1], the model's layout
    joints: torch.Tensor  # (B, 22, 3) world joints, metres
    framing: Framing

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def condition(self) -> torch.Tensor:
        """(B, 3, R, R) front-view RGB images: what the model is conditioned on."""
        return self.images[:, COLOR, FRONT_VIEW]


def render_views(joints: torch.Tensor, rig: ViewRig, resolution: int) -> ViewBatch:
    framing = rig.frame(joints)
    renders = render_bodies(joints, rig.cameras, resolution, framing=framing)
    return ViewBatch(rig.model_views(renders.rgb, renders.normal, renders.mask), joints, framing)


def sample_views(distribution: str, num: int, seed: int, rig: ViewRig, resolution: int,
                 breaking_share: float | None = None) -> ViewBatch:
    """Render ``num`` fresh poses of ``distribution`` (deterministic by seed) in every view."""
    joints = joints_from_params(sample_poses(distribution, num, seed, breaking_share=breaking_share))
    return render_views(joints, rig, resolution)
