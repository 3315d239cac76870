"""Evaluating a multi-view model on posed front images: generate, score, decode, read keypoints, compare.

For every sample: the front image is encoded, all views are generated (DDIM, no gradients, fixed seed),
the reward model's PoseScore is computed on the latents, the RGB views are decoded, and 2D keypoints
are read from the decoded images by the analytic estimator (``drpose.evaluation.keypoints``, which
does not use g_skel), then compared with the true projections (PCK, mean pixel error) and, after
triangulation through the rig, with the true 3D joints (root-aligned MPJPE and PA-MPJPE, in mm).

Each view is judged on what it shows: its own reading of a joint (``raw2d``), and only where the view
does not show the joint at all (occluded or missing) the joint triangulated from the other views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from drpose.metrics import keypoint_errors, mpjpe, pa_mpjpe, pck, PCK_THRESHOLDS
from drpose.models.multiview_unet import MultiViewUNet
from drpose.models.sampling import DDIMSampler
from drpose.reward import PoseReward
from drpose.skeleton import BODY22_NAMES
from drpose.world.assets import World
from drpose.world.quality import generate_views
from drpose.world.views import RGB, flatten_views

from .keypoints import estimate_keypoints

ROOT_JOINT = BODY22_NAMES.index("pelvis")


@dataclass
class EvaluationOutputs:
    """Everything measured on a set, kept per sample for figures and aggregation."""

    generated_rgb: torch.Tensor  # (B, V, 3, R, R) decoded generated views
    points2d: torch.Tensor  # (B, V, 22, 2) keypoints each view shows (reprojection where it shows none)
    truth2d: torch.Tensor  # (B, V, 22, 2)
    visible: torch.Tensor  # (B, V, 22) true joints inside the frame
    joints3d: torch.Tensor  # (B, 22, 3) triangulated estimate
    truth3d: torch.Tensor  # (B, 22, 3)
    pose_score: torch.Tensor  # (B,)

    def select(self, index: torch.Tensor) -> EvaluationOutputs:
        """The samples at ``index`` (a boolean mask or indices over B)."""
        return EvaluationOutputs(*(getattr(self, f)[index] for f in EvaluationOutputs.__dataclass_fields__))


@torch.no_grad()
def run_model(world: World, unet: MultiViewUNet, images: torch.Tensor, joints: torch.Tensor, num_steps: int,
              seed: int, chunk: int = 8, show_progress: bool = True) -> EvaluationOutputs:
    """Generate and measure ``unet`` on front images (B, 3, R, R) of bodies with joints (B, 22, 3)."""
    rig = world.rig
    resolution = world.settings.resolution
    sampler = DDIMSampler(world.scheduler, num_steps)
    reward = PoseReward(world.g_skel, rig, unet.config.num_domains, world.settings.sigma, backend="auto")
    parts = []
    starts = range(0, images.shape[0], chunk)
    for index, start in enumerate(tqdm(starts, desc="evaluating", disable=not show_progress, mininterval=2)):
        image, joint = images[start : start + chunk], joints[start : start + chunk]
        framing = rig.frame(joint)
        latents = generate_views(unet, sampler, world.codec.encode(image), seed=seed + index)
        score = reward(flatten_views(latents), joint, framing)
        rgb = world.codec.decode(flatten_views(latents[:, RGB : RGB + 1])).reshape(joint.shape[0], rig.num_views, 3,
                                                                                   resolution, resolution)
        estimate = estimate_keypoints(rgb, rig, framing)
        per_view = torch.where(torch.isfinite(estimate.raw2d), estimate.raw2d, estimate.reprojected2d)
        truth2d, depth = rig.project(joint, resolution, framing)
        parts.append(EvaluationOutputs(rgb, per_view, truth2d, rig.visible_in_frame(truth2d, depth, resolution),
                                       estimate.joints3d, joint, score))
    return EvaluationOutputs(*(torch.cat([getattr(p, f) for p in parts]) for f in EvaluationOutputs.__dataclass_fields__))


def summarize(outputs: EvaluationOutputs, image_size: int, view_names: tuple[str, ...]) -> dict:
    """Aggregate metrics (and per-view PCK) of one evaluated set."""
    errors = keypoint_errors(outputs.points2d, outputs.truth2d)
    visible = outputs.visible.bool()
    root = ROOT_JOINT
    aligned_pred = outputs.joints3d - outputs.joints3d[:, root : root + 1]
    aligned_truth = outputs.truth3d - outputs.truth3d[:, root : root + 1]
    finite = torch.isfinite(outputs.joints3d).all(-1)
    metrics = {f"pck@{t}": pck(errors, visible, image_size, t) for t in PCK_THRESHOLDS}
    metrics.update(
        mean_px_error=errors[visible].mean().item(),
        mpjpe=1000 * mpjpe(aligned_pred.nan_to_num(), aligned_truth, finite).mean().item(),
        pa_mpjpe=1000 * pa_mpjpe(outputs.joints3d.nan_to_num(), outputs.truth3d, finite).mean().item(),
        pose_score=outputs.pose_score.mean().item(),
        samples=int(outputs.truth3d.shape[0]),
    )
    metrics["per_view_pck@0.1"] = {
        name: pck(errors[:, v], visible[:, v], image_size, 0.1) for v, name in enumerate(view_names)
    }
    return metrics
