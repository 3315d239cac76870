"""The capsule renderer: outputs, occlusion, geometry against a ray marcher, palette."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.colors import rgb_to_hsv

from drpose.body import SMPLXParams, joints_from_params
from drpose.cameras import CameraRig
from drpose.poses import sample_poses
from drpose.render import (
    BONE_RADII, HEAD_OFFSET, HEAD_RADIUS, NORMAL_BACKGROUND, NUM_PARTS, PART_COLOURS, PART_HUE_SLOTS,
    PART_NAMES, RGB_BACKGROUND, body_capsules, render_bodies,
)
from drpose.skeleton import BODY22_BONES, BODY22_NAMES, REST_JOINTS

J = BODY22_NAMES.index


def part(parent: str, child: str) -> int:
    return BODY22_BONES.index((J(parent), J(child)))


@pytest.fixture(scope="module")
def hard_joints():
    return joints_from_params(sample_poses("hard", 24, seed=11))


@pytest.fixture(scope="module")
def hard_renders(hard_joints):
    return render_bodies(hard_joints)


def test_outputs_shapes_ranges_and_backgrounds(hard_renders):
    r = hard_renders
    assert r.rgb.shape == (24, 6, 3, 64, 64) and r.normal.shape == (24, 6, 3, 64, 64)
    assert r.mask.shape == (24, 6, 1, 64, 64) and r.part_id.shape == (24, 6, 64, 64)
    assert r.part_id.dtype == torch.long and r.rgb.dtype == torch.float32
    for image in (r.rgb, r.normal, r.mask):
        assert image.min() >= 0 and image.max() <= 1
    background = r.part_id == -1
    assert torch.equal(r.mask[:, :, 0] == 0, background)
    assert r.part_id.min() >= -1 and r.part_id.max() < NUM_PARTS
    rgb, normal = r.rgb.permute(0, 1, 3, 4, 2), r.normal.permute(0, 1, 3, 4, 2)
    assert bool((rgb[background] == torch.tensor(RGB_BACKGROUND)).all())
    assert bool((normal[background] == torch.tensor(NORMAL_BACKGROUND)).all())
    assert 0.02 < r.mask.mean() < 0.4


@pytest.mark.parametrize("rig", [None, CameraRig(projection="perspective", distance=1.5, elevation_deg=30.0)])
def test_whole_body_stays_in_frame(rig, hard_joints, hard_renders):
    """The framing's padding covers the head sphere and limb radii: no body pixel on the border."""
    mask = (hard_renders if rig is None else render_bodies(hard_joints, rig)).mask[:, :, 0]
    border = torch.cat([mask[..., 0, :], mask[..., -1, :], mask[..., :, 0], mask[..., :, -1]], -1)
    assert border.sum() == 0
    padding = CameraRig().padding
    assert HEAD_OFFSET + HEAD_RADIUS <= padding and max(BONE_RADII) <= padding


def test_nearer_arm_hides_the_farther_one_in_side_views():
    renders = render_bodies(REST_JOINTS[None], resolution=96)
    rig = CameraRig()
    pixels, _ = rig.project(REST_JOINTS[None], 96)
    right_view, left_view = 2, 4
    for view, winner, loser in ((right_view, "right", "left"), (left_view, "left", "right")):
        x, y = pixels[0, view, J(f"{winner}_wrist")].round().long().tolist()
        assert renders.part_id[0, view, y, x] == part(f"{winner}_elbow", f"{winner}_wrist")
        # Both wrists project to the same spot in a side view of the T-pose.
        torch.testing.assert_close(pixels[0, view, J(f"{loser}_wrist")], pixels[0, view, J(f"{winner}_wrist")],
                                   atol=0.5, rtol=0)


def test_arm_in_front_of_the_chest_is_seen_from_the_front_and_hidden_from_the_back():
    body_pose = torch.zeros(1, 21, 3)
    body_pose[0, J("left_shoulder") - 1] = torch.tensor([0.0, -math.radians(80), 0.0])  # arm forwards
    body_pose[0, J("left_elbow") - 1] = torch.tensor([0.0, -math.radians(100), 0.0])  # forearm inwards
    joints = joints_from_params(SMPLXParams(torch.zeros(1, 3), body_pose))
    wrist = joints[0, J("left_wrist")]
    assert abs(float(wrist[0])) < 0.12 and float(wrist[2]) > 0.2  # the hand is in front of the chest
    renders = render_bodies(joints, resolution=96)
    pixels, _ = CameraRig().project(joints, 96)
    front, back = 0, 3
    x, y = pixels[0, front, J("left_wrist")].round().long().tolist()
    assert renders.part_id[0, front, y, x] == part("left_elbow", "left_wrist")
    x, y = pixels[0, back, J("left_wrist")].round().long().tolist()
    torso = {part(a, b) for a, b in (("spine2", "spine3"), ("spine3", "neck"), ("spine1", "spine2"),
                                      ("spine3", "left_collar"), ("spine3", "right_collar"))}
    assert int(renders.part_id[0, back, y, x]) in torso


def _ray_march_part_ids(joints, rig, size, step=0.007):
    """Independent reference: walk each ray in small steps; the first capsule entered is seen.

    Everything framed lies within 1.4 half-extents of the ray origins (the rays' points nearest the
    framing centre), so the walk covers t in [-1.4, 1.4].
    """
    framing = rig.frame(joints)
    starts, ends, radii = body_capsules(joints)
    origins, directions, _ = rig.pixel_rays(size)
    steps = torch.arange(-1.4, 1.4, step)
    samples = origins[:, None] + steps[None, :, None] * directions[:, None]  # (P, S, 3)
    results = []
    for view in range(rig.num_views):
        cam_a = rig.to_camera(starts, framing)[0, view]
        cam_b = rig.to_camera(ends, framing)[0, view]
        radius = radii / framing.half_extent[0]
        axis = cam_b - cam_a
        along = ((samples[:, :, None] - cam_a) * axis).sum(-1) / (axis * axis).sum(-1).clamp_min(1e-12)
        closest = cam_a + along.clamp(0, 1)[..., None] * axis
        inside = (samples[:, :, None] - closest).norm(dim=-1) <= radius  # (P, S, K)
        entered = inside.any(-1)
        first_step = torch.where(entered.any(-1), entered.float().argmax(-1), -1)
        part_at_first = inside[torch.arange(len(first_step)), first_step.clamp_min(0)].float().argmax(-1)
        results.append(torch.where(first_step >= 0, part_at_first, -1).reshape(size, size))
    return torch.stack(results)


@pytest.mark.parametrize("rig", [CameraRig(azimuths_deg=(0.0, 90.0, 225.0)),
                                 CameraRig(azimuths_deg=(30.0, 180.0), elevation_deg=30.0,
                                           projection="perspective", distance=2.5)])
def test_renderer_agrees_with_a_ray_marcher(rig, hard_joints):
    size = 16
    mismatches = total = 0
    for sample in (0, 5):
        joints = hard_joints[sample:sample + 1]
        rendered = render_bodies(joints, rig, size).part_id[0]
        marched = _ray_march_part_ids(joints, rig, size)
        assert (rendered >= 0).sum() > 12
        mismatches += int((rendered != marched).sum())
        total += rendered.numel()
    print(f"ray marcher disagrees on {mismatches} of {total} pixels")
    assert mismatches / total < 0.01, (mismatches, total)


def test_projected_joints_land_on_the_rendered_body(hard_joints, hard_renders):
    pixels, _ = CameraRig().project(hard_joints, 64)
    column, row = pixels.round().long().unbind(-1)
    covered = hard_renders.mask[:, :, 0].flatten(-2).gather(-1, row * 64 + column)  # (B, V, 22)
    assert covered.mean() > 0.98


def test_normals_are_unit_and_face_the_camera(hard_renders):
    hit = hard_renders.mask[:, :, 0] > 0
    normals = (hard_renders.normal.permute(0, 1, 3, 4, 2)[hit] * 2 - 1)
    torch.testing.assert_close(normals.norm(dim=-1), torch.ones(len(normals)), atol=2e-3, rtol=0)
    assert normals[:, 2].min() > -0.05  # camera-space z points towards the camera


def test_colour_identifies_the_part(hard_renders):
    hit = hard_renders.mask[:, :, 0] > 0
    rgb = hard_renders.rgb.permute(0, 1, 3, 4, 2)[hit].numpy()
    hue_slot = np.round(rgb_to_hsv(rgb)[:, 0] * NUM_PARTS) % NUM_PARTS
    slot_to_part = {slot: index for index, slot in enumerate(PART_HUE_SLOTS)}
    classified = torch.tensor([slot_to_part[int(s)] for s in hue_slot])
    assert torch.equal(classified, hard_renders.part_id[hit])


def test_palette_separates_touching_and_mirrored_parts():
    assert len(PART_NAMES) == NUM_PARTS == 22 and PART_NAMES[-1] == "head"
    assert sorted(PART_HUE_SLOTS) == list(range(NUM_PARTS))
    hsv = rgb_to_hsv(PART_COLOURS.numpy())
    np.testing.assert_allclose(hsv[:, 1:], 1.0)
    joints_of = [set(bone) for bone in BODY22_BONES] + [{J("head")}]
    for a in range(NUM_PARTS):
        for b in range(a + 1, NUM_PARTS):
            name_a, name_b = PART_NAMES[a], PART_NAMES[b]
            mirrored = name_a.replace("left", "right") == name_b
            if joints_of[a] & joints_of[b] or mirrored:
                steps = abs(PART_HUE_SLOTS[a] - PART_HUE_SLOTS[b])
                assert min(steps, NUM_PARTS - steps) >= 5, (name_a, name_b)


def test_perspective_with_a_far_camera_looks_orthographic(hard_joints):
    joints = hard_joints[:4]
    framing = CameraRig().frame(joints)  # the same framing for both projections
    ortho = render_bodies(joints, CameraRig(), 48, framing).mask
    far = render_bodies(joints, CameraRig(projection="perspective", distance=200.0), 48, framing).mask
    intersection, union = (ortho * far).sum(), ((ortho + far) > 0).sum()
    assert intersection / union > 0.97


def test_render_rejects_other_joint_sets():
    with pytest.raises(ValueError, match=r"joints3d: expected body22 joints of shape \(B, 22, 3\)"):
        render_bodies(torch.zeros(1, 17, 3))
