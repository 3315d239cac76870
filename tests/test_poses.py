"""Joint limits, pose distributions and farthest-point sampling."""

from __future__ import annotations

import math

import pytest
import torch
from smplx.lbs import batch_rodrigues

from drpose.body import joints_from_params
from drpose.poses import (
    BREAKING_SHARE, DISTRIBUTIONS, JOINT_LIMITS, check_limits, euler_to_matrix, farthest_point_sampling,
    joint_angles, matrix_to_axis_angle, matrix_to_euler, pose_families, position_spread, remove_heading,
    sample_poses, within_limits,
)
from drpose.skeleton import BODY22_NAMES

J = BODY22_NAMES.index


@pytest.fixture(scope="module")
def samples():
    return {name: sample_poses(name, 1500, seed=7) for name in DISTRIBUTIONS}


@pytest.mark.parametrize("order", sorted({limit.order for limit in JOINT_LIMITS} | {"xyz", "zxy"}))
def test_euler_angles_round_trip(order):
    generator = torch.Generator().manual_seed(0)
    angles = (torch.rand(500, 3, generator=generator, dtype=torch.float64) * 2 - 1) * 179
    middle = "xyz".index(order[1])
    angles[:, middle] = (torch.rand(500, generator=generator, dtype=torch.float64) * 2 - 1) * 89
    matrices = euler_to_matrix(angles, order)
    # Composed one axis at a time: R = R_first @ R_middle @ R_last.
    first, second, third = (euler_to_matrix(_single_axis(angles, axis), order) for axis in order)
    torch.testing.assert_close(matrices, first @ second @ third)
    torch.testing.assert_close(matrix_to_euler(matrices, order), angles)


def _single_axis(angles: torch.Tensor, axis: str) -> torch.Tensor:
    """Angles with every axis but ``axis`` set to zero."""
    only = torch.zeros_like(angles)
    only[:, "xyz".index(axis)] = angles[:, "xyz".index(axis)]
    return only


def test_axis_angle_conversion_is_stable_up_to_half_turns():
    generator = torch.Generator().manual_seed(1)
    axes = torch.nn.functional.normalize(torch.randn(300, 3, generator=generator, dtype=torch.float64), dim=-1)
    angles = torch.cat([torch.rand(100, dtype=torch.float64, generator=generator) * math.pi,
                        torch.full((100,), math.pi - 1e-9, dtype=torch.float64),
                        torch.full((100,), 1e-10, dtype=torch.float64)])
    vectors = axes * angles[:, None]
    recovered = matrix_to_axis_angle(batch_rodrigues(vectors))
    torch.testing.assert_close(batch_rodrigues(recovered), batch_rodrigues(vectors), atol=1e-7, rtol=0)
    torch.testing.assert_close(recovered[:100], vectors[:100], atol=1e-7, rtol=0)


def test_limits_are_well_formed_and_mirrored():
    assert [limit.joint for limit in JOINT_LIMITS] == list(BODY22_NAMES[1:])
    for limit in JOINT_LIMITS:
        assert sorted(limit.order) == ["x", "y", "z"]
        middle_low, middle_high = limit.ranges["xyz".index(limit.order[1])]
        assert -90 < middle_low and middle_high < 90, limit  # unique Euler decomposition
        for low, high in limit.ranges:
            assert -180 < low <= high <= 180
        if limit.joint.startswith("right_"):
            left = JOINT_LIMITS[J("left_" + limit.joint[6:]) - 1]
            assert limit.x == left.x and limit.order == left.order
            assert limit.y == (-left.y[1], -left.y[0]) and limit.z == (-left.z[1], -left.z[0])
    knee = JOINT_LIMITS[J("left_knee") - 1]
    assert knee.x[0] == 0 and knee.x[1] >= 140  # knees bend one way only


def test_every_distribution_stays_within_the_limits(samples):
    for name, params in samples.items():
        assert params.global_orient.shape == (1500, 3) and params.body_pose.shape == (1500, 21, 3)
        assert bool(within_limits(params.body_pose).all()), name
        check_limits(params.body_pose)


def test_limits_catch_an_impossible_pose():
    pose = torch.zeros(2, 21, 3)
    pose[1, J("right_knee") - 1, 0] = math.radians(-30)  # knee bent forwards
    assert within_limits(pose).tolist() == [True, False]
    with pytest.raises(ValueError, match=r"body_pose\[1\]: joint 'right_knee' angle theta_x = -30.00"):
        check_limits(pose)
    angles = joint_angles(pose)
    assert angles[1, J("right_knee") - 1].tolist() == pytest.approx([-30.0, 0.0, 0.0], abs=1e-5)


def test_sampling_is_reproducible_by_seed():
    for name in DISTRIBUTIONS:
        first, again, other = (sample_poses(name, 64, seed) for seed in (3, 3, 4))
        assert torch.equal(first.body_pose, again.body_pose)
        assert torch.equal(first.global_orient, again.global_orient)
        assert not torch.equal(first.body_pose, other.body_pose)


def test_hard_poses_spread_wider_than_narrow_ones(samples):
    spread = {name: position_spread(joints_from_params(params)) for name, params in samples.items()}
    ratio = spread["hard"] / spread["narrow"]
    print(f"\njoint position spread (m): {spread}; hard / narrow = {ratio:.2f}")
    assert spread["narrow"] < spread["broad"] < spread["hard"]
    assert ratio > 3.0


def test_narrow_is_upright_and_hard_has_inversions(samples):
    def head_above_pelvis(params):
        joints = joints_from_params(params)
        return joints[:, J("head"), 1] > joints[:, J("pelvis"), 1]

    assert bool(head_above_pelvis(samples["narrow"]).all())
    inverted = (~head_above_pelvis(samples["hard"])).float().mean()
    assert 0.25 < inverted < 0.75
    families = pose_families("hard", 1500, seed=7)
    assert set(families) == {"inversion", "split", "bend", "tumble"}
    inverted_family = torch.tensor([f == "inversion" for f in families])
    assert float((~head_above_pelvis(samples["hard"].select(inverted_family))).float().mean()) > 0.9
    # Splits: some hard poses have the thighs more than 120 degrees apart.
    joints = joints_from_params(samples["hard"])
    left = joints[:, J("left_knee")] - joints[:, J("left_hip")]
    right = joints[:, J("right_knee")] - joints[:, J("right_hip")]
    cosine = torch.nn.functional.cosine_similarity(left, right, dim=-1)
    assert (cosine < math.cos(math.radians(120))).float().mean() > 0.1
    narrow = joints_from_params(samples["narrow"])
    narrow_cos = torch.nn.functional.cosine_similarity(
        narrow[:, J("left_knee")] - narrow[:, J("left_hip")],
        narrow[:, J("right_knee")] - narrow[:, J("right_hip")], dim=-1)
    assert bool((narrow_cos > math.cos(math.radians(60))).all())


def _upright_share(params) -> float:
    joints = joints_from_params(params)
    trunk = joints[:, J("neck")] - joints[:, J("pelvis")]
    return float((trunk[:, 1] / trunk.norm(dim=-1) > math.cos(math.radians(60))).float().mean())


def test_broad_holds_a_share_of_breaking_moves_in_any_orientation(samples):
    # Upright dancers tilt 25 degrees at most; breaking moves (a BREAKING_SHARE of them) turn any way, so
    # three quarters of those lean more than 60 degrees (a uniform rotation's up axis is uniform on the
    # sphere, and the cap within 60 degrees of the vertical is a quarter of it).
    assert 0.0 < BREAKING_SHARE < 0.5
    upright = sample_poses("broad", 1500, seed=7, breaking_share=0.0)
    assert _upright_share(upright) > 0.98
    leaning = 1.0 - _upright_share(samples["broad"])
    assert abs(leaning - BREAKING_SHARE * 0.75) < 0.04, leaning
    assert 1.0 - _upright_share(sample_poses("broad", 1500, seed=7, breaking_share=1.0)) > 0.65
    # The share changes the orientations only: the joint angles are the same draws.
    assert torch.equal(upright.body_pose, samples["broad"].body_pose)
    assert not torch.equal(upright.global_orient, samples["broad"].global_orient)
    # pose_families names the breaking ones: only those lean, and there are about BREAKING_SHARE of them.
    families = pose_families("broad", 1500, seed=7)
    breaking = torch.tensor([f == "breaking" for f in families])
    assert set(families) == {"dance", "breaking"} and abs(float(breaking.float().mean()) - BREAKING_SHARE) < 0.04
    assert _upright_share(samples["broad"].select(~breaking)) > 0.98
    assert _upright_share(samples["broad"].select(breaking)) < 0.4
    assert set(pose_families("broad", 200, seed=7, breaking_share=0.0)) == {"dance"}
    # Other distributions ignore it.
    assert torch.equal(sample_poses("hard", 8, seed=1, breaking_share=1.0).global_orient,
                       sample_poses("hard", 8, seed=1).global_orient)


def test_sample_poses_rejects_bad_arguments():
    with pytest.raises(ValueError, match="distribution: expected one of"):
        sample_poses("wild", 4)
    with pytest.raises(ValueError, match="num: expected a positive int"):
        sample_poses("hard", 0)
    for share in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match=r"breaking_share: expected a number in \[0, 1\]"):
            sample_poses("broad", 4, breaking_share=share)


def test_farthest_point_sampling_picks_every_cluster_first():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 1, 22, 3, generator=generator)
    poses = (centres + 0.01 * torch.randn(4, 50, 22, 3, generator=generator)).reshape(200, 22, 3)
    poses[:, 0] = 0  # root at the origin
    chosen = farthest_point_sampling(poses + torch.randn(200, 1, 3), 4, seed=3)  # root offsets ignored
    assert sorted((chosen // 50).tolist()) == [0, 1, 2, 3]
    assert torch.equal(chosen, farthest_point_sampling(poses, 4, seed=3))
    assert not torch.equal(chosen, farthest_point_sampling(poses, 4, seed=5))


def test_farthest_point_sampling_is_more_diverse_than_random(samples):
    joints = joints_from_params(samples["broad"])

    def min_pairwise(indices):
        subset = joints[indices] - joints[indices][:, :1]
        distance = (subset[:, None] - subset[None]).norm(dim=-1).mean(-1)
        return distance[~torch.eye(len(indices), dtype=torch.bool)].min()

    chosen = farthest_point_sampling(joints, 30, seed=0)
    assert len(set(chosen.tolist())) == 30
    random = torch.randperm(len(joints), generator=torch.Generator().manual_seed(0))[:30]
    assert min_pairwise(chosen) > 1.5 * min_pairwise(random)
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, 1500\]"):
        farthest_point_sampling(joints, 1501)


def test_remove_heading_ignores_the_direction_faced(samples):
    params = samples["broad"]
    joints = joints_from_params(params)
    turn = torch.tensor([0.0, 1.3, 0.0]).expand(len(params), 3)
    turned_orient = matrix_to_axis_angle(batch_rodrigues(turn) @ batch_rodrigues(params.global_orient))
    turned = joints_from_params(type(params)(turned_orient, params.body_pose))
    torch.testing.assert_close(remove_heading(turned), remove_heading(joints), atol=1e-5, rtol=0)
    canonical = remove_heading(joints)
    hips = canonical[:, J("left_hip")] - canonical[:, J("right_hip")]
    assert bool((hips[:, 0] > 0).all()) and hips[:, 2].abs().max() < 1e-5
