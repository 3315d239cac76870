"""How well a multi-view model's generated views follow the true pose, as read by g_skel.

This is the reward model's view of quality (quick, used while building the world); the independent
evaluator in :mod:`drpose.evaluate` reads keypoints from decoded images instead.
"""

from __future__ import annotations

import torch

from drpose.cameras import CameraRig
from drpose.metrics import keypoint_metrics
from drpose.models.g_skel import GSkel
from drpose.models.multiview_unet import MultiViewUNet
from drpose.models.sampling import DDIMSampler, generate

from .g_skel_training import predicted_keypoints
from .latents import LatentBatch
from .views import RGB, ViewBatch, unflatten_views


@torch.no_grad()
def generate_views(unet: MultiViewUNet, sampler: DDIMSampler, cond: torch.Tensor, seed: int, chunk: int = 8) -> torch.Tensor:
    """Generated latents (B, D, V, c, h, w) for condition latents (B, c, h, w), deterministic by seed."""
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    out = [generate(unet, sampler, part, config.images_per_sample, generator) for part in cond.split(chunk)]
    return unflatten_views(torch.cat(out), config.num_domains, config.num_views)


def generated_pose_accuracy(unet: MultiViewUNet, sampler: DDIMSampler, g_skel: GSkel, batch: LatentBatch,
                            rig: CameraRig, image_size: int, seed: int) -> dict:
    """g_skel-read 2D joint accuracy of the views generated from ``batch``'s front images."""
    latents = generate_views(unet, sampler, batch.condition, seed)
    pred = predicted_keypoints(g_skel, latents, image_size)
    truth, depth = rig.project(batch.joints, image_size, batch.framing)
    return keypoint_metrics(pred, truth, rig.visible_in_frame(truth, depth, image_size), image_size)


@torch.no_grad()
def codec_keypoint_ceiling(codec, views: ViewBatch, rig: CameraRig) -> dict:
    """The independent evaluator's accuracy on codec round trips of true renders: the best that decoded
    generated views can score, since every evaluated image passes through the decoder."""
    from drpose.evaluation.keypoints import estimate_keypoints

    rgb = views.images[:, RGB]
    size = rgb.shape[-1]
    decoded = torch.cat([codec.decode(codec.encode(chunk)) for chunk in rgb.reshape(-1, 3, size, size).split(128)])
    estimate = estimate_keypoints(decoded.reshape(rgb.shape), rig, views.framing)
    per_view = torch.where(torch.isfinite(estimate.raw2d), estimate.raw2d, estimate.reprojected2d)
    truth, depth = rig.project(views.joints, size, views.framing)
    return keypoint_metrics(per_view, truth, rig.visible_in_frame(truth, depth, size), size)
