"""The analytic keypoint estimator on the tiny world's renders: part maps, accuracy on clean, blurred
and perturbed renders of fresh poses, robustness, runtime and argument checks.

The measured figures are printed (``pytest -s`` shows them). Thresholds leave a margin over what
the estimator reaches, but each would fail if a stage broke: e.g. without the refinement step the
3D error on clean renders roughly doubles, and an estimator that ignored the image and returned the
framing's centre would miss every PCK threshold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch

from drpose.body import joints_from_params
from drpose.cameras import CameraRig, Framing
from drpose.evaluation.keypoints import estimate_keypoints, part_map
from drpose.poses import DISTRIBUTIONS, sample_poses
from drpose.render import PART_COLOURS, PART_HUE_SLOTS, render_bodies

RESOLUTION = 64
NUM_POSES = 16
SEED = 2024  # poses that no world asset was built from


@dataclass
class Scene:
    joints: torch.Tensor  # (B, 22, 3) metres
    framing: Framing
    rgb: torch.Tensor  # (B, V, 3, R, R)
    part_id: torch.Tensor  # (B, V, R, R)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread: the estimator's tensors are small, and on a shared CPU extra threads
    mostly wait for each other (ten times slower on a loaded two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rig() -> CameraRig:
    return CameraRig()


@pytest.fixture(scope="module")
def scenes(rig) -> dict[str, Scene]:
    result = {}
    for distribution in DISTRIBUTIONS:
        joints = joints_from_params(sample_poses(distribution, NUM_POSES, seed=SEED))
        framing = rig.frame(joints)
        renders = render_bodies(joints, rig, RESOLUTION, framing=framing)
        result[distribution] = Scene(joints, framing, renders.rgb, renders.part_id)
    return result


@pytest.fixture(scope="module")
def clean_figures(scenes, rig) -> dict[str, dict]:
    return {name: accuracy(estimate_keypoints(scene.rgb, rig, scene.framing), scene, rig)
            for name, scene in scenes.items()}


def accuracy(estimate, scene: Scene, rig: CameraRig) -> dict:
    """PCK at 5 % and 10 % of the image side and mean pixel error of ``points2d`` over joints inside
    the frame, and MPJPE (cm) of ``joints3d``, against ``scene``'s (unperturbed) joints."""
    truth2d, depth = rig.project(scene.joints, RESOLUTION, scene.framing)
    inside = rig.visible_in_frame(truth2d, depth, RESOLUTION)
    errors = (estimate.points2d - truth2d).norm(dim=-1)[inside]
    return {
        "pck@0.05": (errors <= 0.05 * RESOLUTION).float().mean().item(),
        "pck@0.1": (errors <= 0.1 * RESOLUTION).float().mean().item(),
        "mean_px": errors.mean().item(),
        "mpjpe_cm": 100 * (estimate.joints3d - scene.joints).norm(dim=-1).mean().item(),
    }


def describe(label: str, figures: dict) -> str:
    return (f"{label:28s} PCK@0.05 {figures['pck@0.05']:.3f}  PCK@0.1 {figures['pck@0.1']:.3f}  "
            f"mean {figures['mean_px']:.2f} px  MPJPE {figures['mpjpe_cm']:.2f} cm")


def box_blur(rgb: torch.Tensor) -> torch.Tensor:
    """3x3 box blur of images (..., 3, R, R), edges replicated."""
    flat = rgb.reshape(-1, 3, *rgb.shape[-2:])
    padded = torch.nn.functional.pad(flat, (1, 1, 1, 1), mode="replicate")
    return torch.nn.functional.avg_pool2d(padded, 3, 1).reshape(rgb.shape)


def degrade(rgb: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """What a small VAE does to a render, roughly: a 3x3 box blur, a per-image colour cast (each
    channel scaled by up to 3 %) and per-pixel colour noise (std 0.02)."""
    generator = torch.Generator().manual_seed(seed)
    cast = 1 + 0.03 * (2 * torch.rand(*rgb.shape[:-3], 3, 1, 1, generator=generator) - 1)
    noise = 0.02 * torch.randn(rgb.shape, generator=generator)
    return (box_blur(rgb) * cast + noise).clamp(0, 1)


# ------------------------------------------------------------------------------------ part map


def test_part_map_matches_rendered_part_ids(scenes):
    for name, scene in scenes.items():
        labels = part_map(scene.rgb)
        body = scene.part_id >= 0
        agreement = (labels[body] == scene.part_id[body]).float().mean().item()
        print(f"part map vs part ids, {name}: {agreement:.4f} of body pixels")
        assert agreement >= 0.98, name
        assert (labels[~body] == -1).all(), f"{name}: background pixels got a part"


def test_part_map_resolves_blends_of_two_parts():
    """Two parts side by side, blurred: the blended columns between them take one of the two parts
    (never a third whose hue lies in between), background and grey stay -1, and shading does not
    change the labels."""
    first, second = PART_HUE_SLOTS.index(0), PART_HUE_SLOTS.index(8)  # 8 slots apart: 7 hues between
    image = torch.ones(3, 16, 16)
    image[:, 4:12, 2:8] = PART_COLOURS[first][:, None, None] * 0.5  # shaded
    image[:, 4:12, 8:14] = PART_COLOURS[second][:, None, None]
    image[:, 13:16, 2:14] = 0.5  # grey: no hue
    labels = part_map(box_blur(image))
    body = labels[4:12, 2:14]
    assert set(body.unique().tolist()) <= {first, second, -1}
    assert (labels[5:11, 3:7] == first).all() and (labels[5:11, 9:13] == second).all()
    assert (labels[:3] == -1).all() and (labels[14:] == -1).all() and (labels[:, 15] == -1).all()
    assert torch.equal(part_map(image)[4:12, 2:14].unique(), torch.tensor(sorted([first, second])))


def test_part_map_rejects_wrong_input():
    with pytest.raises(ValueError, match="rgb"):
        part_map(torch.rand(4, 16, 16))
    with pytest.raises(TypeError, match="rgb"):
        part_map(torch.zeros(3, 16, 16, dtype=torch.uint8))


# ------------------------------------------------------------------------------------ accuracy


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_accuracy_on_clean_renders(clean_figures, distribution):
    figures = clean_figures[distribution]
    print(describe(f"clean {distribution}", figures))
    assert figures["pck@0.1"] >= 0.98
    assert figures["pck@0.05"] >= 0.95
    assert figures["mpjpe_cm"] < (2.0 if distribution != "hard" else 3.0)


def test_estimate_fields_are_consistent(scenes, rig):
    scene = scenes["broad"]
    estimate = estimate_keypoints(scene.rgb, rig, scene.framing)
    batch, views = scene.rgb.shape[:2]
    for points in (estimate.points2d, estimate.raw2d, estimate.reprojected2d):
        assert points.shape == (batch, views, 22, 2)
    assert estimate.confidence.shape == estimate.raw_confidence.shape == (batch, views, 22)
    assert estimate.joints3d.shape == (batch, 22, 3) and estimate.part_pixels.shape == (batch, views, 22)
    assert torch.isfinite(estimate.points2d).all() and torch.isfinite(estimate.joints3d).all()
    assert ((estimate.confidence >= 0) & (estimate.confidence <= estimate.raw_confidence)).all()
    assert (estimate.raw_confidence <= 1).all()
    seen = estimate.raw_confidence > 0
    assert torch.isfinite(estimate.raw2d[seen]).all() and torch.isnan(estimate.raw2d[~seen]).all()
    reprojected, _ = rig.project(estimate.joints3d, RESOLUTION, scene.framing)
    torch.testing.assert_close(estimate.reprojected2d, reprojected)
    # Per view, the views' own estimates are accurate where they see a joint well.
    truth2d, _ = rig.project(scene.joints, RESOLUTION, scene.framing)
    well_seen = estimate.raw_confidence >= 0.5
    raw_error = (estimate.raw2d - truth2d).norm(dim=-1)[well_seen]
    print(f"raw per-view estimates, broad: {well_seen.float().mean():.3f} of joints seen well, "
          f"mean error {raw_error.mean():.2f} px, 95th percentile {raw_error.quantile(0.95):.2f} px")
    assert raw_error.mean() < 1.5 and raw_error.quantile(0.95) < 3.2


def test_refinement_by_rerendering_helps(scenes, rig, clean_figures):
    scene = scenes["broad"]
    unrefined = accuracy(estimate_keypoints(scene.rgb, rig, scene.framing, refinement_steps=0), scene, rig)
    print(describe("broad, no refinement", unrefined))
    assert unrefined["mpjpe_cm"] > 1.5 * clean_figures["broad"]["mpjpe_cm"]


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_accuracy_on_blurred_noisy_renders_stays_close(scenes, rig, clean_figures, distribution):
    scene = scenes[distribution]
    figures = accuracy(estimate_keypoints(degrade(scene.rgb), rig, scene.framing), scene, rig)
    clean = clean_figures[distribution]
    print(describe(f"blurred+noisy {distribution}", figures))
    assert figures["pck@0.1"] >= clean["pck@0.1"] - 0.03
    assert figures["pck@0.05"] >= clean["pck@0.05"] - 0.08
    assert figures["mpjpe_cm"] < (3.0 if distribution != "hard" else 6.0)


def test_accuracy_degrades_with_perturbed_joints(scenes, rig, clean_figures):
    """Renders of joints moved by Gaussian noise (per axis) against the unmoved joints: the further
    the images are from the truth, the worse every figure; the 3D error follows the noise (about
    1.6 sigma for isotropic noise), so the estimator reads the images, not the framing."""
    scene = scenes["broad"]
    noise = torch.randn(scene.joints.shape, generator=torch.Generator().manual_seed(1))
    results = [clean_figures["broad"]]
    print(describe("perturbed broad, 0 cm", results[0]))
    for sigma_cm in (2, 5, 10):
        moved = scene.joints + sigma_cm / 100 * noise
        rgb = render_bodies(moved, rig, RESOLUTION, framing=scene.framing).rgb
        estimate = estimate_keypoints(rgb, rig, scene.framing)
        figures = accuracy(estimate, scene, rig)
        print(describe(f"perturbed broad, {sigma_cm} cm", figures))
        results.append(figures)
        assert 1.2 * sigma_cm < figures["mpjpe_cm"] < 2.2 * sigma_cm + 2
    for better, worse in zip(results, results[1:]):
        assert worse["mpjpe_cm"] > better["mpjpe_cm"]
        assert worse["pck@0.05"] <= better["pck@0.05"] and worse["pck@0.1"] <= better["pck@0.1"]
    assert results[-1]["pck@0.05"] < results[0]["pck@0.05"] - 0.3


# ---------------------------------------------------------------------------------- robustness


def test_a_blank_view_is_not_seen_and_costs_little(scenes, rig, clean_figures):
    scene = scenes["narrow"]
    rgb = scene.rgb.clone()
    rgb[:, 2] = 1.0  # the right view shows nothing
    estimate = estimate_keypoints(rgb, rig, scene.framing)
    figures = accuracy(estimate, scene, rig)
    print(describe("narrow, right view blank", figures))
    assert (estimate.confidence[:, 2] == 0).all() and torch.isnan(estimate.raw2d[:, 2]).all()
    assert figures["mpjpe_cm"] < clean_figures["narrow"]["mpjpe_cm"] + 1.0


def test_every_joint_is_finite_without_a_body(rig):
    framing = rig.frame(joints_from_params(sample_poses("narrow", 2, seed=SEED)))
    estimate = estimate_keypoints(torch.ones(2, rig.num_views, 3, 32, 32), rig, framing)
    assert torch.isfinite(estimate.joints3d).all() and torch.isfinite(estimate.points2d).all()
    assert (estimate.confidence == 0).all() and (estimate.part_pixels == 0).all()


def test_runtime_per_sample(scenes, rig):
    scene = scenes["broad"]
    estimate_keypoints(scene.rgb[:2], rig, Framing(scene.framing.centre[:2], scene.framing.half_extent[:2]))
    # CPU time of this process (not wall time, which other jobs on the machine stretch): a guard against an
    # estimator too slow to run inside every evaluation (about 0.06 s per sample measured on one thread), not
    # a benchmark.
    start = time.process_time()
    estimate_keypoints(scene.rgb, rig, scene.framing)
    per_sample = (time.process_time() - start) / NUM_POSES
    print(f"runtime: {1000 * per_sample:.1f} ms CPU per sample ({rig.num_views} views at "
          f"{RESOLUTION}x{RESOLUTION}, {torch.get_num_threads()} thread)")
    assert per_sample < 0.25


def test_argument_errors_name_the_argument(scenes, rig):
    scene = scenes["narrow"]
    with pytest.raises(ValueError, match="rgb"):
        estimate_keypoints(scene.rgb[:, :, 0], rig, scene.framing)
    with pytest.raises(ValueError, match="rgb: expected the rig's 6 views"):
        estimate_keypoints(scene.rgb[:, :4], rig, scene.framing)
    with pytest.raises(TypeError, match="rgb"):
        estimate_keypoints((scene.rgb * 255).to(torch.uint8), rig, scene.framing)
    with pytest.raises(ValueError, match="framing"):
        estimate_keypoints(scene.rgb[:3], rig, scene.framing)
    with pytest.raises(TypeError, match="rig"):
        estimate_keypoints(scene.rgb, "rig", scene.framing)
    with pytest.raises(ValueError, match="refinement_steps"):
        estimate_keypoints(scene.rgb, rig, scene.framing, refinement_steps=-1)
    with pytest.raises(ValueError, match="consistency_px"):
        estimate_keypoints(scene.rgb, rig, scene.framing, consistency_px=0.0)
