"""The camera rig: view directions, framing, pixel convention, segments, triangulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from drpose.body import joints_from_params
from drpose.cameras import CameraRig, Framing, rescale_pixels
from drpose.poses import sample_poses
from drpose.skeleton import BODY22_BONES, BODY22_NAMES, REST_JOINTS

J = BODY22_NAMES.index


@pytest.fixture(scope="module")
def hard_joints():
    return joints_from_params(sample_poses("hard", 256, seed=3))


def test_default_rig_sees_the_documented_sides():
    rig = CameraRig()
    assert rig.azimuths_deg == (0.0, 45.0, 90.0, 180.0, 270.0, 315.0)
    assert rig.view_names == ("front", "front_right", "right", "back", "left", "front_left")
    joints = REST_JOINTS[None].clone()
    joints[0, J("left_foot"), 2] += 0.3  # a foot well forward (+z)
    pixels, depth = rig.project(joints, 64)
    x, centre = pixels[0, :, :, 0], 31.5
    front, right, back, left = 0, 2, 3, 4
    # Front: the person's left (+x) on the image's right; back: mirrored.
    assert x[front, J("left_wrist")] > centre > x[front, J("right_wrist")]
    assert x[back, J("left_wrist")] < centre < x[back, J("right_wrist")]
    # Front view: the forward foot is nearer than the heel-side ankle; back view: farther.
    assert depth[0, front, J("left_foot")] < depth[0, front, J("left_ankle")]
    assert depth[0, back, J("left_foot")] > depth[0, back, J("left_ankle")]
    # Right view (90): the right side is nearer and the person's front is on the image's right.
    assert depth[0, right, J("right_hip")] < depth[0, right, J("left_hip")]
    assert x[right, J("left_foot")] > x[right, J("left_ankle")]
    assert depth[0, left, J("left_hip")] < depth[0, left, J("right_hip")]
    assert x[left, J("left_foot")] < x[left, J("left_ankle")]
    # y up: rows grow downwards.
    assert (pixels[0, :, J("head"), 1] < pixels[0, :, J("left_ankle"), 1]).all()


def test_pixel_convention_and_resolution_independence():
    rig = CameraRig()
    joints = REST_JOINTS[None]
    framing = rig.frame(joints)
    half = float(framing.half_extent[0])
    # Points at the centre, and on the frame's left and top edges at the centre plane.
    probes = framing.centre[:, None] + torch.tensor([[[0.0, 0.0, 0.0], [-half, 0.0, 0.0], [0.0, half, 0.0]]])
    pixels, _ = rig.project(probes, 8, framing)
    torch.testing.assert_close(pixels[0, 0], torch.tensor([[3.5, 3.5], [-0.5, 3.5], [3.5, -0.5]]))
    small, _ = rig.project(joints, 64)
    large, _ = rig.project(joints, 96)
    torch.testing.assert_close(rescale_pixels(small, 64, 96), large, atol=1e-4, rtol=0)
    torch.testing.assert_close(rescale_pixels(large, 96, 64), small, atol=1e-4, rtol=0)


def test_framing_is_shared_by_all_views_and_blind_to_heading(hard_joints):
    rig = CameraRig()
    framing = rig.frame(hard_joints)
    # Turning every body about the vertical axis through its framing centre changes nothing.
    angle = torch.rand(len(hard_joints), generator=torch.Generator().manual_seed(0)) * 2 * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    turned = hard_joints - framing.centre[:, None]
    turned = torch.stack([cos[:, None] * turned[..., 0] + sin[:, None] * turned[..., 2], turned[..., 1],
                          -sin[:, None] * turned[..., 0] + cos[:, None] * turned[..., 2]], -1)
    turned_framing = rig.frame(turned + framing.centre[:, None])
    torch.testing.assert_close(turned_framing.half_extent, framing.half_extent, atol=1e-5, rtol=0)
    torch.testing.assert_close(turned_framing.centre, framing.centre, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rig", [CameraRig(), CameraRig(elevation_deg=35.0),
                                 CameraRig(elevation_deg=-20.0, azimuths_deg=(10.0, 100.0, 200.0)),
                                 CameraRig(margin=0.0, padding=0.0),
                                 CameraRig(projection="perspective", distance=1.2, padding=0.0),
                                 CameraRig(projection="perspective", elevation_deg=40.0)])
def test_every_joint_of_hard_poses_is_in_frame_in_every_view(rig, hard_joints):
    pixels, _ = rig.project(hard_joints, 64)
    assert pixels.min() >= -0.5 and pixels.max() <= 63.5
    _, weights = rig.segments_and_weights(hard_joints, 64)
    assert bool((weights == 1).all())


def _least_squares_by_hand(rig: CameraRig, pixels: np.ndarray, size: int) -> np.ndarray:
    """Each orthographic view gives u = R[0] . X and v = R[1] . X (normalised frame coordinates)."""
    rotations = rig.rotations(torch.float64).numpy()
    u = (pixels[..., 0] + 0.5) * 2 / size - 1
    v = 1 - (pixels[..., 1] + 0.5) * 2 / size
    design = np.concatenate([rotations[:, 0], rotations[:, 1]])  # (2V, 3)
    recovered = []
    for point in range(pixels.shape[1]):
        target = np.concatenate([u[:, point], v[:, point]])
        recovered.append(np.linalg.lstsq(design, target, rcond=None)[0])
    return np.stack(recovered)


def test_projection_round_trip_by_least_squares_from_six_orthographic_views():
    rig = CameraRig()
    points = torch.randn(1, 40, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    framing = rig.frame(points)
    pixels, _ = rig.project(points, 96, framing)
    normalised = _least_squares_by_hand(rig, pixels[0].numpy(), 96)
    recovered = normalised * framing.half_extent.item() + framing.centre[0].numpy()
    np.testing.assert_allclose(recovered, points[0].numpy(), atol=1e-9)
    # The rig's own triangulation gives the same, in world metres or in frame units.
    weights = torch.ones(1, 6, 40, dtype=torch.float64)
    torch.testing.assert_close(rig.triangulate(pixels, weights, 96, framing), points)
    np.testing.assert_allclose(rig.triangulate(pixels, weights, 96)[0].numpy(), normalised, atol=1e-9)


@pytest.mark.parametrize("rig", [CameraRig(projection="perspective"),
                                 CameraRig(projection="perspective", distance=1.8, elevation_deg=25.0)])
def test_perspective_round_trip(rig, hard_joints):
    joints = hard_joints[:16].double()
    pixels, depth = rig.project(joints, 64)
    assert bool((depth > 0).all())
    recovered = rig.triangulate(pixels, torch.ones(pixels.shape[:-1], dtype=torch.float64), 64,
                                rig.frame(joints))
    torch.testing.assert_close(recovered, joints, atol=1e-8, rtol=0)


def test_perspective_matches_orthographic_on_the_centre_plane_and_magnifies_near_points():
    ortho, persp = CameraRig(azimuths_deg=(0.0,)), CameraRig(azimuths_deg=(0.0,), projection="perspective")
    framing = Framing(centre=torch.zeros(1, 3), half_extent=torch.ones(1))
    plane = torch.tensor([[[0.5, -0.3, 0.0], [-0.9, 0.9, 0.0]]])
    torch.testing.assert_close(ortho.project(plane, 64, framing)[0], persp.project(plane, 64, framing)[0])
    near, far = torch.tensor([[[0.5, 0.0, 0.5]]]), torch.tensor([[[0.5, 0.0, -0.5]]])
    offset = lambda p: (persp.project(p, 64, framing)[0][..., 0] - 31.5).abs().item()  # noqa: E731
    assert offset(near) > offset(plane[:, :1]) > offset(far)


def test_segments_channels_and_out_of_frame_weights():
    rig = CameraRig()
    joints = REST_JOINTS[None].clone()
    segments, weights = rig.segments_and_weights(joints, 32)
    assert segments.shape == (1, 6, 43, 2, 2) and segments.dtype == torch.float32
    assert weights.shape == (1, 6, 43) and weights.dtype == torch.float32
    pixels, _ = rig.project(joints, 32)
    torch.testing.assert_close(segments[:, :, :22, 0], pixels)
    torch.testing.assert_close(segments[:, :, :22, 1], pixels)
    for channel, (parent, child) in enumerate(BODY22_BONES, start=22):
        torch.testing.assert_close(segments[:, :, channel, 0], pixels[:, :, parent])
        torch.testing.assert_close(segments[:, :, channel, 1], pixels[:, :, child])
    # Frame the body as if it were smaller: the left wrist (at x = 0.68 m) falls out of frame in
    # views that see it sideways-on, and with it the forearm bone.
    tight = Framing(centre=torch.tensor([[0.0, -0.1, 0.0]]), half_extent=torch.tensor([0.6]))
    _, weights = rig.segments_and_weights(joints, 32, framing=tight)
    wrist, forearm = J("left_wrist"), 22 + J("left_wrist") - 1
    front, right = 0, 2
    assert weights[0, front, wrist] == 0 and weights[0, front, forearm] == 0
    assert weights[0, right, wrist] == 1 and weights[0, right, forearm] == 1
    elbow_bone = 22 + J("left_elbow") - 1
    assert weights[0, front, elbow_bone] == 1  # both ends of the upper arm are still in frame
    joints_only, joint_weights = rig.segments_and_weights(joints, 32, include_bones=False)
    assert joints_only.shape == (1, 6, 22, 2, 2) and joint_weights.shape == (1, 6, 22)


def test_triangulation_uses_weights_and_flags_undetermined_points():
    rig = CameraRig()
    joints = REST_JOINTS[None].double()
    pixels, _ = rig.project(joints, 64)
    corrupted = pixels.clone()
    corrupted[0, 1] += 7.0  # view 1 is wrong, but weighted 0
    weights = torch.ones(1, 6, 22, dtype=torch.float64)
    weights[0, 1] = 0
    weights[0, :, 5] = 0
    weights[0, 0, 5] = 1  # joint 5 is seen by one view only: depth unknown
    result = rig.triangulate(corrupted, weights, 64, rig.frame(joints))
    known = [j for j in range(22) if j != 5]
    torch.testing.assert_close(result[0, known], joints[0, known])
    assert torch.isnan(result[0, 5]).all()


@pytest.mark.parametrize("call, error, message", [
    (lambda: CameraRig(projection="fisheye"), ValueError, "projection: expected one of"),
    (lambda: CameraRig(elevation_deg=90.0), ValueError, "elevation_deg"),
    (lambda: CameraRig(projection="perspective", distance=0.5), ValueError, "distance: expected > 1"),
    (lambda: CameraRig(azimuths_deg=()), ValueError, "at least one view"),
    (lambda: CameraRig.from_dict({"azimuth": [0]}), ValueError, r"unknown keys \['azimuth'\]"),
    (lambda: CameraRig().project(torch.zeros(2, 22), 64), ValueError,
     r"joints3d: expected a tensor of shape \(B, J, 3\)"),
    (lambda: CameraRig().project(torch.full((1, 22, 3), math.nan), 64), ValueError, "NaN"),
    (lambda: CameraRig().project(REST_JOINTS[None], 0), ValueError, "size: expected a positive int"),
    (lambda: CameraRig().segments_and_weights(torch.zeros(1, 17, 3), 64), ValueError, "bones are defined"),
    (lambda: CameraRig().triangulate(torch.zeros(1, 5, 22, 2), torch.ones(1, 5, 22), 64), ValueError,
     r"points2d: expected shape \(B, 6, J, 2\)"),
    (lambda: CameraRig().triangulate(torch.zeros(1, 6, 22, 2), -torch.ones(1, 6, 22), 64), ValueError,
     "weights: expected finite values >= 0"),
])
def test_bad_input_is_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_settings_round_trip_through_a_dict():
    rig = CameraRig(azimuths_deg=(0, 120, 240), elevation_deg=10.0, projection="perspective", distance=4.0)
    assert CameraRig.from_dict(rig.to_dict()) == rig
