"""3D reconstruction from the six body views, and its metrics against exactly known surfaces."""

import math
import os

import numpy as np
import pytest
import torch
import trimesh
from matplotlib.path import Path as PolygonPath

from drpose.body import joints_from_params
from drpose.models.rig import ViewRig
from drpose.poses import sample_poses
from drpose.reconstruction import CapsuleSurface, ReconstructionSettings, oracle_views, reconstruct, reconstruct_and_score
from drpose.reconstruction.metrics import closest_on_mesh, psnr, ssim, surface_metrics
from drpose.reconstruction.raster import rasterize

R_SPHERE = 0.3


def sphere_truth(radius=R_SPHERE) -> CapsuleSurface:
    return CapsuleSurface(np.zeros((1, 3)), np.zeros((1, 3)), [radius])


def sphere_mesh(radius, centre=(0.0, 0.0, 0.0)) -> trimesh.Trimesh:
    mesh = trimesh.creation.icosphere(subdivisions=5, radius=radius)
    mesh.apply_translation(centre)
    return mesh


def shifted_sphere_fraction_within(radius, shift, threshold):
    """Share of a sphere's area within ``threshold`` of the same sphere shifted by ``shift``: the distance from
    a point at cos(angle) = u to the shifted sphere is |sqrt(r^2 + d^2 - 2 r d u) - r|, u uniform on [-1, 1]."""
    low = (radius ** 2 + shift ** 2 - (radius + threshold) ** 2) / (2 * radius * shift)
    high = (radius ** 2 + shift ** 2 - (radius - threshold) ** 2) / (2 * radius * shift)
    return (min(high, 1.0) - max(low, -1.0)) / 2


def test_chamfer_of_a_shifted_sphere_is_half_the_shift():
    # Mean distance from a sphere to its copy shifted by d <= r: (1 / 2r d) * int_{r-d}^{r+d} |s - r| s ds = d / 2.
    shift = 0.05
    metrics = surface_metrics(sphere_mesh(R_SPHERE, (shift, 0.0, 0.0)), sphere_truth())
    assert metrics["p2s"] == pytest.approx(100 * shift / 2, abs=0.05)
    assert metrics["s2p"] == pytest.approx(100 * shift / 2, abs=0.05)
    assert metrics["chamfer"] == pytest.approx(100 * shift / 2, abs=0.04)
    for threshold_cm in (1, 2):
        share = shifted_sphere_fraction_within(R_SPHERE, shift, threshold_cm / 100)
        assert metrics[f"fscore@{threshold_cm}cm"] == pytest.approx(share, abs=0.02)


def test_concentric_spheres_and_offset_capsules_are_their_radius_gap_apart():
    metrics = surface_metrics(sphere_mesh(R_SPHERE + 0.015), sphere_truth(), num_samples=3000)
    assert metrics["chamfer"] == pytest.approx(1.5, abs=0.01)
    assert metrics["normal_consistency"] == pytest.approx(1.0, abs=1e-3)
    assert metrics["fscore@1cm"] == 0.0 and metrics["fscore@2cm"] == 1.0
    # A capsule from (0, -0.2, 0) to (0, 0.2, 0), radius 0.08, against a mesh of radius 0.09 (the offset surface).
    truth = CapsuleSurface([[0.0, -0.2, 0.0]], [[0.0, 0.2, 0.0]], [0.08])
    mesh = trimesh.creation.capsule(height=0.4, radius=0.09, count=[64, 64])
    mesh.apply_transform(trimesh.transformations.rotation_matrix(math.pi / 2, [1, 0, 0]))  # its axis z -> y
    metrics = surface_metrics(mesh, truth, num_samples=3000)
    assert metrics["chamfer"] == pytest.approx(1.0, abs=0.02)
    assert metrics["normal_consistency"] == pytest.approx(1.0, abs=2e-3)


def test_capsule_union_surface_is_sampled_on_its_boundary_only():
    # A capsule A (axis y = 0..0.8, radius r = 0.1) and a ball B (centre y = 0.9, radius r) overlapping A's top
    # cap: the two spheres' surfaces cross at y = 0.85, so the union's surface is A's side (2 pi r 0.8), its
    # bottom half-sphere (2 pi r^2), the zone of A's top sphere at 0.8 <= y < 0.85 (2 pi r 0.05) and B's
    # cap above 0.85 (2 pi r 0.15).
    r = 0.1
    union = CapsuleSurface([[0.0, 0.0, 0.0], [0.0, 0.9, 0.0]], [[0.0, 0.8, 0.0], [0.0, 0.9, 0.0]], [r, r])
    area = 2 * math.pi * r * 0.8 + 2 * math.pi * r ** 2 + 2 * math.pi * r * 0.2
    assert union.area() == pytest.approx(area, rel=0.01)
    points, normals = union.sample(20000, seed=1)
    # On the boundary (the union's signed distance is the smaller of the two), none of them inside.
    assert np.abs(union.signed_distances(points).min(-1)).max() < 1e-9
    # Uniform by area: B's cap above y = 0.85 holds 2 pi r 0.15 of it; normals are those of the owning part.
    on_b = points[:, 1] > 0.85
    assert on_b.mean() == pytest.approx(2 * math.pi * r * 0.15 / area, abs=0.01)
    assert np.allclose(normals[on_b], (points[on_b] - [0.0, 0.9, 0.0]) / r, atol=1e-9)
    # Distances: inside to the nearest boundary point (not to the hidden parts of the spheres), outside exact.
    distance, _ = union.distance(np.array([[0.0, 0.4, 0.0], [0.03, 0.4, 0.0], [0.0, 0.9, 0.0], [0.0, 0.4, 0.5],
                                           [0.0, 1.1, 0.0]]))
    assert distance == pytest.approx([0.1, 0.07, 0.1, 0.4, 0.1], abs=1e-9)


@pytest.mark.parametrize("shape", ["ellipsoid", "capsule"])  # the capsule's side triangles are long and thin
def test_mesh_distances_match_brute_force(shape):
    if shape == "ellipsoid":
        mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.3)
        mesh.vertices *= [1.0, 1.6, 0.7]
    else:
        mesh = trimesh.creation.capsule(height=0.6, radius=0.1, count=[8, 8])
    points = np.random.default_rng(0).normal(scale=0.4, size=(300, 3))
    distance, normal = closest_on_mesh(mesh, points, candidates=2)
    gaps = np.stack([np.linalg.norm(trimesh.triangles.closest_point(mesh.triangles, np.repeat(p[None], len(mesh.faces), 0))
                                    - p, axis=-1) for p in points])
    assert np.allclose(distance, gaps.min(-1), atol=1e-12)
    # The normal is that of a nearest triangle (ties between triangles sharing the nearest point allowed).
    nearest_normals = mesh.face_normals[None]
    tied = np.abs(gaps - gaps.min(-1, keepdims=True)) < 1e-12
    assert all(np.isclose(nearest_normals[0][tied[i]] @ normal[i], 1.0).any() for i in range(len(points)))


def test_rasterised_triangle_covers_the_pixel_centres_inside_it():
    size = 24
    corners = np.array([[-0.83, -0.71, 0.0], [0.9, -0.2, 0.5], [-0.1, 0.77, 1.0]])
    raster = rasterize(corners, np.array([[0, 1, 2]]), size)
    centres = (np.arange(size) + 0.5) * 2 / size - 1
    xs, ys = np.meshgrid(centres, -centres)
    inside = PolygonPath(corners[:, :2]).contains_points(np.stack([xs.ravel(), ys.ravel()], -1)).reshape(size, size)
    assert (raster.mask == inside).all()
    # Depth interpolates z = 0.5 (x - x0) ... linearly: check against the plane through the corners.
    plane = np.linalg.solve(np.c_[corners[:, :2], np.ones(3)], corners[:, 2])
    expected = plane[0] * xs + plane[1] * ys + plane[2]
    assert np.allclose(raster.depth[inside], expected[inside], atol=1e-9)


def test_psnr_and_ssim_of_known_images():
    image = np.random.default_rng(0).random((32, 32, 3))
    assert psnr(image, image) == math.inf and ssim(image, image) == pytest.approx(1.0)
    assert psnr(np.clip(image + 0.1, None, None), image) == pytest.approx(20.0, abs=1e-9)  # MSE 0.01


@pytest.fixture(scope="module")
def narrow_bodies():
    joints = joints_from_params(sample_poses("narrow", 2, 4343))
    rig = ViewRig()
    rgb, normal = oracle_views(joints, rig, 72)
    return joints, rig, rgb, normal


ORACLE_BOUND_CM = 0.9  # measured 0.57-0.76 cm on the first 6 held-out narrow bodies at 72 px (README, "3D reconstruction")


def test_reconstruction_of_true_renders_is_within_the_oracle_bound(narrow_bodies):
    joints, rig, rgb, normal = narrow_bodies
    scores = reconstruct_and_score(rgb, normal, joints, rig)
    for score in scores:
        assert score.error is None and score.reconstruction.mesh.is_watertight
        assert score.metrics["chamfer"] < ORACLE_BOUND_CM, score.metrics
        # Normal consistency measured 0.900 and 0.914 on these two bodies (the hull alone: 0.862, 0.864); the
        # first one moves by about 1e-3 between CPUs, so the bound sits between the two reconstructions.
        assert score.metrics["normal_consistency"] > 0.88 and score.metrics["fscore@2cm"] > 0.9
        assert score.metrics["psnr_normal"] > 20
    # The carving with the normal maps must pay: the hull alone is further off.
    [hull] = reconstruct_and_score(rgb[:1], normal[:1], joints[:1], rig,
                                   settings=ReconstructionSettings(normal_carving=False))
    assert hull.metrics["chamfer"] > scores[0].metrics["chamfer"] + 0.1


def test_mirrored_views_and_normal_frames_are_read_as_the_rig_says(narrow_bodies):
    from drpose.render import render_bodies

    joints, rig, rgb, normal = narrow_bodies
    joints, rgb, normal = joints[:1], rgb[:1], normal[:1]
    truth = CapsuleSurface.from_joints(joints[0])
    # Views handed over in camera layout (back/left not mirrored) must reconstruct worse: the flip matters. An
    # acrobatic pose, as a near-symmetric standing body looks alike mirrored.
    hard = joints_from_params(sample_poses("hard", 1, 4242))
    hard_rgb, hard_normal = oracle_views(hard, rig, 72)
    hull_only = ReconstructionSettings(normal_carving=False)
    [wrong] = reconstruct(rig.unmirror(hard_rgb), rig.unmirror(hard_normal), rig, joints=hard, settings=hull_only)
    [right] = reconstruct(hard_rgb, hard_normal, rig, joints=hard, settings=hull_only)
    hard_truth = CapsuleSurface.from_joints(hard[0])
    assert surface_metrics(wrong.mesh, hard_truth, 3000)["s2p"] > 2 * surface_metrics(right.mesh, hard_truth, 3000)["s2p"]
    # Normals in each view's own frame (as the renderer makes them), mirrored as generated, read with "view".
    renders = render_bodies(joints, rig.cameras, 72, framing=rig.frame(joints))
    [own_frame] = reconstruct(rgb, rig.mirror(renders.normal), rig, joints=joints, normal_frame="view")
    assert surface_metrics(own_frame.mesh, truth)["chamfer"] < ORACLE_BOUND_CM


def test_soft_edges_and_background_noise_do_not_move_the_silhouettes(narrow_bodies):
    joints, rig, rgb, normal = narrow_bodies
    joints, rgb, normal = joints[:1], rgb[:1], normal[:1]
    # As decoded images look: edges blurred over about a pixel, faint noise on the background.
    kernel = torch.tensor([0.25, 0.5, 0.25])
    kernel = (kernel[:, None] * kernel[None]).expand(3, 1, 3, 3)

    def decoded(images):
        flat = images.flatten(0, 1)
        blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(flat, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
        noise = 0.03 * torch.randn(blurred.shape, generator=torch.Generator().manual_seed(0))
        return (blurred + noise).clamp(0, 1).view(images.shape)

    [score] = reconstruct_and_score(decoded(rgb), decoded(normal), joints, rig)
    assert score.metrics["chamfer"] < 1.2, score.metrics


def test_views_without_a_body_fail_by_name(narrow_bodies):
    joints, rig, rgb, normal = narrow_bodies
    [score] = reconstruct_and_score(torch.ones_like(rgb[:1]), torch.zeros_like(normal[:1]), joints[:1], rig)
    assert score.reconstruction is None and "no body" in score.error
    assert math.isnan(score.metrics["chamfer"])
    with pytest.raises(ValueError, match="orthographic"):
        from drpose.cameras import CameraRig
        from drpose.models.layout import BODY_VIEW_AZIMUTHS

        reconstruct(rgb, normal, ViewRig(CameraRig(azimuths_deg=BODY_VIEW_AZIMUTHS, projection="perspective")))


def test_a_process_pool_gives_what_one_process_gives(narrow_bodies):
    from drpose.reconstruction.reconstruct import reconstruction_pool

    joints, rig, rgb, normal = narrow_bodies
    # two bodies and a sample without one (its error must come back from the worker as it is)
    rgb3 = torch.cat([rgb, torch.ones_like(rgb[:1])])
    normal3 = torch.cat([normal, torch.zeros_like(normal[:1])])
    joints3 = torch.cat([joints, joints[:1]])
    serial = reconstruct_and_score(rgb3, normal3, joints3, rig, num_samples=2000)
    with reconstruction_pool(len(rgb3), workers=2) as pool:
        parallel = reconstruct_and_score(rgb3, normal3, joints3, rig, num_samples=2000, executor=pool)
    assert [s.error for s in parallel] == [s.error for s in serial] and "no body" in parallel[2].error
    for one, other in zip(serial, parallel):
        assert {k: v for k, v in one.metrics.items() if k != "seconds"} == pytest.approx(
            {k: v for k, v in other.metrics.items() if k != "seconds"}, nan_ok=True)
    assert np.array_equal(serial[0].reconstruction.mesh.vertices, parallel[0].reconstruction.mesh.vertices)
    with reconstruction_pool(1) as pool:
        assert pool is None  # one job: no pool


def test_the_pool_size_comes_from_the_environment_when_set(monkeypatch):
    from drpose.reconstruction.reconstruct import WORKERS_VARIABLE, default_workers, reconstruction_pool

    monkeypatch.setenv(WORKERS_VARIABLE, "1")
    with reconstruction_pool(8) as pool:
        assert pool is None  # one worker: the jobs run in this process
    monkeypatch.setenv(WORKERS_VARIABLE, "3")
    assert default_workers() == 3
    monkeypatch.delenv(WORKERS_VARIABLE)
    assert default_workers() == len(os.sched_getaffinity(0))
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(WORKERS_VARIABLE, bad)
        with pytest.raises(ValueError, match=f"{WORKERS_VARIABLE}='{bad}'"):
            default_workers()


def test_pshuman_layout_unmirrors_and_pastes_the_face_normal():
    from drpose.generate import pshuman_layout

    size = 12
    views = torch.rand(2, 7, 3, size, size, generator=torch.Generator().manual_seed(0))
    image = torch.rand(3, size, size)
    out = pshuman_layout(views, image, ViewRig())
    for view, name in enumerate(("front", "front_right", "right", "back", "left", "front_left")):
        flipped = view in (3, 4)
        expected = views[1, view].flip(-1) if flipped else views[1, view]
        if name != "front":
            assert torch.equal(out[f"color_{name}"], expected) and torch.equal(out[f"normals_{name}"],
                                                                                 views[0, view].flip(-1) if flipped else views[0, view])
    assert torch.equal(out["color_front"], image)  # PSHuman's front colour is the input photo
    front = out["normals_front"]
    face = torch.nn.functional.interpolate(views[0, 6][None], size=(4, 4), mode="bilinear", align_corners=False)[0]
    assert torch.equal(front[:, :4, 4:8], face)
    untouched = torch.ones(size, size, dtype=torch.bool)
    untouched[:4, 4:8] = False
    assert torch.equal(front[:, untouched], views[0, 0][:, untouched])


def test_generate_command_writes_pshuman_views_and_a_mesh(tmp_path):
    import json
    import subprocess
    import sys

    from PIL import Image

    from tests.pshuman_fixtures import write_bundle

    write_bundle(tmp_path / "bundle", latent_size=24)
    joints = joints_from_params(sample_poses("narrow", 1, 4343))
    rgb, _ = oracle_views(joints, ViewRig(), 48)
    Image.fromarray((rgb[0, 0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / "photo.png")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "drpose.generate", "--bundle", str(tmp_path / "bundle"), "--image",
                             str(tmp_path / "photo.png"), "--out", str(out), "--steps", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("front", "front_right", "right", "back", "left", "front_left"):
        for domain in ("color", "normals"):
            with Image.open(out / f"{domain}_{name}_masked.png") as png:
                assert png.size == (48, 48) and png.mode == "RGBA"
    summary = json.loads((out / "generate.json").read_text())
    # Random weights make noise, which may or may not carve into a mesh; either way the outcome is recorded.
    if "files" in summary["mesh"]:
        assert trimesh.load(out / "mesh.ply").is_watertight and (out / "mesh_preview.png").stat().st_size > 0
    else:
        assert summary["mesh"]["error"]


def test_reconstruction_scores_read_the_evaluators_camera_images_as_the_oracle_does(narrow_bodies):
    from drpose.evaluation.metrics_run import EvaluationOutputs, oracle_reconstruction_scores, reconstruction_scores

    joints, rig, rgb, normal = narrow_bodies
    # What run_model keeps: camera images (the mirrored views flipped back); the keypoint fields are not read.
    unused = torch.zeros(len(joints))
    outputs = EvaluationOutputs(rig.unmirror(rgb), unused, unused, unused, unused, joints, unused, rig.unmirror(normal))
    [scored] = reconstruction_scores(outputs, rig, [1]).samples
    [oracle] = oracle_reconstruction_scores(joints[1:], rig, 72).samples
    # The true renders handed over as the evaluator holds them give the oracle's mesh and metrics exactly.
    assert {k: v for k, v in scored.metrics.items() if k != "seconds"} == {
        k: v for k, v in oracle.metrics.items() if k != "seconds"}
    assert scored.metrics["chamfer"] < ORACLE_BOUND_CM
    outputs.generated_normal[0] = math.nan  # as run_model leaves the samples whose normals it was not asked for
    with pytest.raises(ValueError, match=r"samples \[0\]: their normal views were not decoded"):
        reconstruction_scores(outputs, rig, [0, 1])


def test_evaluate_command_scores_reconstructions_against_the_oracle(tmp_path, capsys):
    import json

    from drpose.evaluate import main
    from drpose.reconstruction import METRICS
    from tests.pshuman_fixtures import write_bundle

    with pytest.raises(SystemExit):
        main(["--checkpoint", "base", "--data", "builtin:narrow", "--out", str(tmp_path), "--reconstruction-num", "0"])
    assert "--reconstruction-num 0" in capsys.readouterr().err
    pipeline, g_skel = write_bundle(tmp_path / "bundle", latent_size=36)  # random weights, 72 px views
    out = tmp_path / "eval"
    assert main(["--checkpoint", "base", "--pipeline", str(pipeline), "--g-skel", str(g_skel), "--data", "builtin:narrow",
                 "--num", "2", "--steps", "2", "--reconstruction-num", "1", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["narrow"]["base"]
    generated, oracle = metrics["reconstruction"], metrics["reconstruction_oracle"]
    assert set(METRICS) <= set(generated) and set(METRICS) <= set(oracle)
    assert generated["samples"] == oracle["samples"] == 1 and oracle["failures"] == 0
    # The oracle on the held-out narrow set's first body (the fixture's too) at the bundle's 72 px.
    assert oracle["chamfer"] < ORACLE_BOUND_CM and oracle["fscore@2cm"] > 0.9
    # Random weights draw noise: a poor mesh with finite metrics, or a failure that is counted.
    assert generated["failures"] == 1 or math.isfinite(generated["chamfer"]) and generated["chamfer"] > oracle["chamfer"]
    assert metrics["samples"] == 2 and math.isfinite(metrics["pose_score"])
    assert (out / "meshes.png").stat().st_size > 0
    assert "| narrow | oracle (true renders) |" in (out / "metrics.md").read_text()


def test_report_reconstructs_samples_of_every_kind_of_pose():
    from drpose.report import spread_over_families

    families = ["split", "split", "tumble", "split", "bend", "tumble", "split"]
    assert spread_over_families(families, 3) == [0, 2, 4]
    assert spread_over_families(families, 5) == [0, 1, 2, 4, 5]
    assert spread_over_families(families, 20) == list(range(7))
    assert spread_over_families(["scan"] * 4, 2) == [0, 1]
