"""Evaluating a multi-view model on posed front images: generate, score, decode, read keypoints, compare.

For every sample: the front image is conditioned on, all views are generated (DDIM, no gradients, fixed
seed), the reward model's PoseScore is computed on the latents, the RGB body views are decoded and
un-mirrored, and 2D keypoints are read from the decoded images by the analytic estimator
(``drpose.evaluation.keypoints``, which does not use g_skel and reads the tiny world's part colours),
then compared with the true projections (PCK, mean pixel error) and, after triangulation through the
rig, with the true 3D joints (root-aligned MPJPE and PA-MPJPE, in mm). On real data (``estimator=False``)
only what needs no part colours is measured: PoseScore, and g_skel's reading of the joints against the
data's poses (the reward model's own view, labelled as such).

Each view is judged on what it shows: its own reading of a joint (``raw2d``), and only where the view
does not show the joint at all (occluded or missing) the joint triangulated from the other views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from drpose.metrics import PCK_THRESHOLDS, keypoint_errors, mpjpe, pa_mpjpe, pck
from drpose.models.bundle import ModelBundle
from drpose.models.layout import COLOR, NORMAL, NUM_BODY_VIEWS, grid_to_rows
from drpose.models.sampling import DDIMSampler, generate_views
from drpose.reward import PoseReward
from drpose.skeleton import BODY22_NAMES

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
    generated_normal: torch.Tensor | None = None  # (B, V, 3, R, R) decoded normal views (camera images), on request
    # (NaN for the samples not requested)

    def select(self, index: torch.Tensor) -> EvaluationOutputs:
        """The samples at ``index`` (a boolean mask or indices over B)."""
        return EvaluationOutputs(*(None if getattr(self, f) is None else getattr(self, f)[index]
                                   for f in EvaluationOutputs.__dataclass_fields__))


@torch.no_grad()
def read_views(bundle: ModelBundle, latents: torch.Tensor, joints: torch.Tensor, reward: PoseReward,
               readers: tuple[str, ...] = ("estimator",)) -> dict[str, EvaluationOutputs]:
    """Measure the body views of multi-view latents (B, 2, V, c, h, w) of bodies with joints (B, 22, 3): per
    reader, ``estimator`` (the independent estimator on the decoded RGB views) or ``g_skel`` (g_skel's reading,
    un-mirrored into camera pixels and triangulated; no independent 3D estimate), the outputs without normals."""
    from drpose.g_skel_train import predicted_keypoints

    pipeline, rig = bundle.pipeline, bundle.rig
    size = pipeline.image_size
    framing = rig.frame(joints)
    score = reward(grid_to_rows(latents.transpose(0, 1)), joints, framing)
    body = latents[:, COLOR, :NUM_BODY_VIEWS]
    rgb = pipeline.decode_latents(body.flatten(0, 1)).view(*body.shape[:2], 3, size, size)
    rgb = rig.unmirror(rgb)  # camera images: what the estimator and the figures read
    truth2d, depth = rig.cameras.project(joints, size, framing)
    visible = rig.cameras.visible_in_frame(truth2d, depth, size)
    outputs = {}
    for reader in readers:
        if reader == "estimator":
            estimate = estimate_keypoints(rgb, rig.cameras, framing)
            per_view = torch.where(torch.isfinite(estimate.raw2d), estimate.raw2d, estimate.reprojected2d)
            joints3d = estimate.joints3d
        elif reader == "g_skel":
            per_view = rig.as_camera(predicted_keypoints(bundle.g_skel, latents[:, :, :NUM_BODY_VIEWS], size), size)
            joints3d = rig.cameras.triangulate(per_view, visible.float(), size, framing)
        else:
            raise ValueError(f"reader: expected 'estimator' or 'g_skel', got {reader!r}")
        outputs[reader] = EvaluationOutputs(rgb, per_view, truth2d, visible, joints3d, joints, score)
    return outputs


def run_model(bundle: ModelBundle, unet, images: torch.Tensor, joints: torch.Tensor, num_steps: int, seed: int,
              chunk: int = 8, show_progress: bool = True, estimator: bool = True,
              keep_normals: bool | list[int] = False) -> EvaluationOutputs:
    """Generate with ``unet`` (the bundle's, or one with adapters) from front images (B, 3, R, R) of bodies
    with joints (B, 22, 3) and measure the body views; ``keep_normals`` (True, or the indices of the samples
    wanted) also decodes the normal views, for the 3D reconstruction."""
    pipeline, rig = bundle.pipeline, bundle.rig
    size = pipeline.image_size
    sampler = DDIMSampler(pipeline.scheduler, num_steps, pipeline.num_views)
    reward = PoseReward.from_bundle(bundle, backend="auto")
    reader = "estimator" if estimator else "g_skel"
    parts = []
    starts = range(0, images.shape[0], chunk)
    wanted = set(range(images.shape[0])) if keep_normals is True else set(keep_normals or ())
    for index, start in enumerate(tqdm(starts, desc="evaluating", disable=not show_progress, mininterval=2)):
        image, joint = images[start : start + chunk], joints[start : start + chunk]
        generator = torch.Generator().manual_seed(seed + index)
        cond = pipeline.condition(image.to(next(unet.parameters()).dtype), generator=generator)
        latents = generate_views(pipeline, sampler, cond, seed=seed + index, unet=unet)  # (b, 2, V, c, h, w)
        part = read_views(bundle, latents, joint, reward, (reader,))[reader]
        if keep_normals is not False:
            part.generated_normal = torch.full_like(part.generated_rgb, float("nan"))
            local = [i for i in range(len(image)) if start + i in wanted]
            if local:
                body_normal = latents[local, NORMAL, :NUM_BODY_VIEWS]
                decoded = pipeline.decode_latents(body_normal.flatten(0, 1)).view(*body_normal.shape[:2], 3, size, size)
                part.generated_normal[local] = rig.unmirror(decoded).to(part.generated_normal.dtype)
        parts.append(part)
    return EvaluationOutputs(*(None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts])
                               for f in EvaluationOutputs.__dataclass_fields__))


def reconstruction_scores(outputs: EvaluationOutputs, rig, picked: list[int] | None = None, num_samples: int = 5000,
                          executor=None):
    """3D reconstruction of the generated views (run with ``keep_normals``) of the samples ``picked`` (indices;
    default all), scored against their true capsule bodies: :class:`~drpose.reconstruction.evaluation.BatchScores`
    (on ``executor``, a :func:`~drpose.reconstruction.reconstruct.reconstruction_pool`, when given)."""
    from drpose.reconstruction.evaluation import score_batch

    if outputs.generated_normal is None:
        raise ValueError("the evaluation kept no normal views: run the model with keep_normals=True")
    picked = list(range(len(outputs.truth3d))) if picked is None else list(picked)
    missing = [i for i in picked if not torch.isfinite(outputs.generated_normal[i]).all()]
    if missing:
        raise ValueError(f"samples {missing}: their normal views were not decoded (keep_normals named other samples)")
    # the outputs hold camera images; the reconstruction reads the model's layout (mirrored views as generated)
    return score_batch(rig.mirror(outputs.generated_rgb[picked]), rig.mirror(outputs.generated_normal[picked]),
                       outputs.truth3d[picked], rig, num_samples=num_samples, executor=executor)


def oracle_reconstruction_scores(joints: torch.Tensor, rig, size: int, num_samples: int = 5000, executor=None):
    """The same reconstruction from the true renders of the bodies: the ceiling of the reconstruction metrics."""
    from drpose.reconstruction import oracle_views
    from drpose.reconstruction.evaluation import score_batch

    rgb, normal = oracle_views(joints, rig, size)
    return score_batch(rgb, normal, joints, rig, num_samples=num_samples, executor=executor)


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
