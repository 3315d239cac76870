"""How well a model's generated views follow the true pose, as read by g_skel, and the evaluator's ceiling.

The reward model's view of quality is quick and used while building the world; the independent evaluator
in :mod:`drpose.evaluate` reads keypoints from decoded images instead.
"""

from __future__ import annotations

import torch

from drpose.g_skel_train import ViewLatents, keypoint_accuracy
from drpose.models.layout import COLOR
from drpose.models.pipeline import MultiViewPipeline
from drpose.models.rig import ViewRig
from drpose.models.sampling import DDIMSampler, generate_views

from .latents import LatentBatch
from .views import ViewBatch


def generated_pose_accuracy(pipeline: MultiViewPipeline, sampler: DDIMSampler, g_skel, batch: LatentBatch,
                            rig: ViewRig, image_size: int, seed: int) -> dict:
    """g_skel-read 2D joint accuracy of the views generated from ``batch``'s conditioning."""
    latents = generate_views(pipeline, sampler, batch.cond, seed)
    return keypoint_accuracy(g_skel, ViewLatents(latents[:, :, :6], batch.joints, batch.framing), rig, image_size)


@torch.no_grad()
def codec_keypoint_ceiling(pipeline: MultiViewPipeline, views: ViewBatch, rig: ViewRig) -> dict:
    """The independent evaluator's accuracy on VAE round trips of true renders: the best that decoded
    generated views can score, since every evaluated image passes through the decoder."""
    from drpose.evaluation.keypoints import estimate_keypoints
    from drpose.metrics import keypoint_metrics

    rgb = views.images[:, COLOR, :6]
    size = rgb.shape[-1]
    decoded = torch.cat([pipeline.decode_latents(pipeline.encode_images(chunk))
                         for chunk in rgb.reshape(-1, 3, size, size).split(128)]).reshape(rgb.shape)
    estimate = estimate_keypoints(rig.unmirror(decoded), rig.cameras, views.framing)
    per_view = torch.where(torch.isfinite(estimate.raw2d), estimate.raw2d, estimate.reprojected2d)
    truth, depth = rig.cameras.project(views.joints, size, views.framing)
    return keypoint_metrics(per_view, truth, rig.cameras.visible_in_frame(truth, depth, size), size)
