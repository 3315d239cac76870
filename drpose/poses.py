"""Joint limits, procedural pose distributions, and farthest-point pose selection.

Joint limits. Each body joint's local rotation (relative to its parent, SMPL axes: x = the body's
left, y = up, z = forward at rest) is read as three Euler angles composed in a per-joint order:
``order = "xzy"`` means ``R = R_x(theta_x) @ R_z(theta_z) @ R_y(theta_y)``. Every order keeps a
small-range axis in the middle, whose range stays inside (-90, 90) degrees, so a rotation has exactly
one angle triple in range and :func:`joint_angles` can check any axis-angle pose. Ranges (degrees)
for the left side and the spine are in :data:`_LEFT_AND_CENTRE_LIMITS`; the right side mirrors them
(mirroring x -> -x keeps theta_x and negates theta_y, theta_z). Sign conventions at rest:

- hips: theta_x < 0 swings the thigh forward (flexion, to 125), theta_z > 0 moves the left thigh out
  (abduction, to 85: a side split), theta_y twists the thigh;
- knees: theta_x > 0 folds the shin backwards (to 150); no other motion beyond a few degrees;
- spine1..3, neck, head: theta_x > 0 bends forwards; theta_y turns; theta_z bends sideways;
- shoulders (order "yzx", arm along x at rest): theta_z is the arm's elevation above the horizontal
  (-85 = hanging, 80 = almost overhead), theta_y its swing forwards (< 0) or back, theta_x the twist;
- elbows: theta_y < 0 folds the left forearm forwards (to 145), theta_x turns the forearm;
- ankles, toes, wrists, collars: small ranges around rest.

Distributions (all deterministic by seed, all within limits):

- ``narrow``: scan-like. Upright (tilt within a few degrees, yaw within +-20), A-pose arms, every
  angle a small Gaussian perturbation of that rest pose (sigma 6 % of its range, cut at 2 sigma).
- ``broad``: dance-like. Any heading, tilts up to 25 degrees, every angle drawn over its whole range
  with a Beta(2, 2) density (large limb and torso motion, extremes less often); a share
  (:data:`BREAKING_SHARE`) are breaking moves (freezes, flips, windmills: any global orientation), as the
  Break genre of a dance corpus holds them.
- ``hard``: acrobatic. An equal mix of inversions (upside down, arms overhead), splits (front or
  side), strong spine bends (forward folds with flexed hips, backbends), and tumbles (uniformly random
  global rotation); every angle not set by the family is uniform over its whole range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from smplx.lbs import batch_rodrigues

from drpose.body import SMPLXParams
from drpose.skeleton import BODY22_NAMES

DISTRIBUTIONS = ("narrow", "broad", "hard")
_AXES = "xyz"


@dataclass(frozen=True)
class JointLimit:
    """Euler-angle ranges (degrees) of one joint, as ``(low, high)`` for the x, y and z angles."""

    joint: str
    order: str
    x: tuple[float, float]
    y: tuple[float, float]
    z: tuple[float, float]

    @property
    def ranges(self) -> tuple[tuple[float, float], ...]:
        return (self.x, self.y, self.z)

    def mirrored(self, joint: str) -> JointLimit:
        """The limit of the opposite side's joint: theta_x kept, theta_y and theta_z negated."""
        return JointLimit(joint, self.order, self.x, (-self.y[1], -self.y[0]), (-self.z[1], -self.z[0]))


# joint: (order, x range, y range, z range), degrees; right-side joints mirror the left ones.
_LEFT_AND_CENTRE_LIMITS = {
    "left_hip": ("xzy", (-125, 35), (-40, 40), (-30, 85)),
    "spine1": ("xzy", (-25, 45), (-30, 30), (-25, 25)),
    "left_knee": ("xyz", (0, 150), (-10, 10), (-5, 5)),
    "spine2": ("xzy", (-20, 35), (-25, 25), (-20, 20)),
    "left_ankle": ("xyz", (-25, 50), (-20, 20), (-25, 25)),
    "spine3": ("xzy", (-15, 25), (-20, 20), (-15, 15)),
    "left_foot": ("xyz", (-45, 20), (-5, 5), (-10, 10)),
    "neck": ("xzy", (-40, 45), (-45, 45), (-30, 30)),
    "left_collar": ("xzy", (-10, 10), (-20, 20), (-15, 30)),
    "head": ("xzy", (-35, 35), (-35, 35), (-20, 20)),
    "left_shoulder": ("yzx", (-70, 70), (-110, 45), (-85, 80)),
    "left_elbow": ("yzx", (-60, 60), (-145, 0), (-10, 10)),
    "left_wrist": ("zyx", (-15, 15), (-25, 35), (-70, 70)),
}


def _build_limits() -> tuple[JointLimit, ...]:
    limits = []
    for name in BODY22_NAMES[1:]:
        if name.startswith("right_"):
            left = _LEFT_AND_CENTRE_LIMITS["left_" + name[len("right_"):]]
            limits.append(JointLimit(name, *left).mirrored(name))
        else:
            limits.append(JointLimit(name, *_LEFT_AND_CENTRE_LIMITS[name]))
    return tuple(limits)


JOINT_LIMITS: tuple[JointLimit, ...] = _build_limits()
"""Limits of body joints 1..21 (the rows of ``body_pose``), in ``BODY22_NAMES[1:]`` order."""


def _axis_rotation(axis: str, angle: torch.Tensor) -> torch.Tensor:
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero, one = torch.zeros_like(angle), torch.ones_like(angle)
    rows = {
        "x": ((one, zero, zero), (zero, cos, -sin), (zero, sin, cos)),
        "y": ((cos, zero, sin), (zero, one, zero), (-sin, zero, cos)),
        "z": ((cos, -sin, zero), (sin, cos, zero), (zero, zero, one)),
    }[axis]
    return torch.stack([torch.stack(row, -1) for row in rows], -2)


def euler_to_matrix(angles_deg: torch.Tensor, order: str) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) from angles (..., 3) in degrees, stored as (x, y, z)."""
    radians = torch.deg2rad(angles_deg)
    first, middle, last = (_axis_rotation(a, radians[..., _AXES.index(a)]) for a in order)
    return first @ middle @ last


def matrix_to_euler(matrices: torch.Tensor, order: str) -> torch.Tensor:
    """Angles (..., 3) in degrees, stored as (x, y, z), with ``R = R_i @ R_j @ R_k`` for ``order``.

    The middle angle is in [-90, 90] and the outer ones in (-180, 180]: the unique such triple.
    """
    i, j, k = (_AXES.index(a) for a in order)
    parity = 1.0 if (j - i) % 3 == 1 else -1.0
    middle = torch.asin((parity * matrices[..., i, k]).clamp(-1.0, 1.0))
    first = torch.atan2(-parity * matrices[..., j, k], matrices[..., k, k])
    last = torch.atan2(-parity * matrices[..., i, j], matrices[..., i, i])
    angles = torch.empty(*matrices.shape[:-2], 3, dtype=matrices.dtype, device=matrices.device)
    angles[..., i], angles[..., j], angles[..., k] = first, middle, last
    return torch.rad2deg(angles)


def matrix_to_axis_angle(matrices: torch.Tensor) -> torch.Tensor:
    """Axis-angle vectors (..., 3) of rotation matrices (..., 3, 3), stable up to 180 degrees."""
    m = matrices
    diagonal = torch.stack([m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]], -1)
    trace = diagonal.sum(-1)
    # Four ways to recover the quaternion (w, x, y, z); use the one with the largest pivot.
    pivots = torch.stack([1 + trace, 1 + 2 * diagonal[..., 0] - trace,
                          1 + 2 * diagonal[..., 1] - trace, 1 + 2 * diagonal[..., 2] - trace], -1)
    skew = torch.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0],
                        m[..., 1, 0] - m[..., 0, 1]], -1)
    sym = torch.stack([m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0],
                       m[..., 1, 2] + m[..., 2, 1]], -1)
    root = pivots.clamp_min(0).sqrt()  # 2 * |q component|
    candidates = torch.stack([
        torch.stack([root[..., 0], skew[..., 0] / root[..., 0], skew[..., 1] / root[..., 0],
                     skew[..., 2] / root[..., 0]], -1),
        torch.stack([skew[..., 0] / root[..., 1], root[..., 1], sym[..., 0] / root[..., 1],
                     sym[..., 1] / root[..., 1]], -1),
        torch.stack([skew[..., 1] / root[..., 2], sym[..., 0] / root[..., 2], root[..., 2],
                     sym[..., 2] / root[..., 2]], -1),
        torch.stack([skew[..., 2] / root[..., 3], sym[..., 1] / root[..., 3],
                     sym[..., 2] / root[..., 3], root[..., 3]], -1),
    ], -2) / 2
    best = pivots.argmax(-1)
    quaternion = torch.gather(candidates, -2, best[..., None, None].expand(*best.shape, 1, 4))[..., 0, :]
    quaternion = quaternion * torch.where(quaternion[..., :1] < 0, -1.0, 1.0)
    w, vector = quaternion[..., 0], quaternion[..., 1:]
    sine = vector.norm(dim=-1)
    angle = 2 * torch.atan2(sine, w)
    scale = torch.where(sine > 1e-8, angle / sine.clamp_min(1e-8), 2 / w.clamp_min(1e-8))
    return vector * scale[..., None]


def joint_angles(body_pose: torch.Tensor) -> torch.Tensor:
    """Euler angles (N, 21, 3), degrees, (x, y, z), of each joint in its limit's order."""
    if body_pose.shape[-2:] != (21, 3) or body_pose.ndim != 3:
        raise ValueError(f"body_pose: expected shape (N, 21, 3), got {tuple(body_pose.shape)}")
    matrices = batch_rodrigues(body_pose.double().reshape(-1, 3)).reshape(-1, 21, 3, 3)
    return torch.stack(
        [matrix_to_euler(matrices[:, index], limit.order) for index, limit in enumerate(JOINT_LIMITS)],
        1,
    )


def _limit_bounds(dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    bounds = torch.tensor([limit.ranges for limit in JOINT_LIMITS], dtype=dtype)  # (21, 3, 2)
    return bounds[..., 0], bounds[..., 1]


def within_limits(body_pose: torch.Tensor, tolerance_deg: float = 0.01) -> torch.Tensor:
    """Boolean (N,): every joint of the pose is within :data:`JOINT_LIMITS` (up to a tolerance)."""
    angles = joint_angles(body_pose)
    low, high = _limit_bounds()
    inside = (angles >= low - tolerance_deg) & (angles <= high + tolerance_deg)
    return inside.all(-1).all(-1)


def check_limits(body_pose: torch.Tensor, tolerance_deg: float = 0.01) -> None:
    """Raise a ``ValueError`` naming the first sample, joint and angle outside the limits."""
    angles = joint_angles(body_pose)
    low, high = _limit_bounds()
    outside = (angles < low - tolerance_deg) | (angles > high + tolerance_deg)
    if outside.any():
        sample, joint, axis = (int(i) for i in outside.nonzero()[0])
        limit = JOINT_LIMITS[joint]
        raise ValueError(
            f"body_pose[{sample}]: joint {limit.joint!r} angle theta_{_AXES[axis]} = "
            f"{angles[sample, joint, axis]:.2f} deg is outside {limit.ranges[axis]} (order {limit.order})"
        )


def _angles_to_body_pose(angles_deg: torch.Tensor) -> torch.Tensor:
    matrices = torch.stack(
        [euler_to_matrix(angles_deg[:, index], limit.order) for index, limit in enumerate(JOINT_LIMITS)],
        1,
    )
    return matrix_to_axis_angle(matrices)


def _uniform(generator: torch.Generator, shape, low, high) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def _heading_and_tilt(yaw: torch.Tensor, pitch: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """Global rotations ``R_y(yaw) @ R_x(pitch) @ R_z(roll)``, angles in degrees: tilt, then turn."""
    return euler_to_matrix(torch.stack([pitch, yaw, roll], -1), "yxz")


def _uniform_rotations(generator: torch.Generator, num: int) -> torch.Tensor:
    """Rotations drawn uniformly over SO(3) (from normalised Gaussian quaternions)."""
    quaternion = torch.randn(num, 4, generator=generator, dtype=torch.float64)
    w, x, y, z = (quaternion / quaternion.norm(dim=-1, keepdim=True)).unbind(-1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def _row(name: str) -> int:
    """Row of ``body_pose`` holding joint ``name``."""
    return BODY22_NAMES.index(name) - 1


def _set_mirrored(angles, mask, joint: str, axis: str, left_values: torch.Tensor) -> None:
    """Set ``left_<joint>`` to ``left_values`` and ``right_<joint>`` to its mirror where ``mask``."""
    a = _AXES.index(axis)
    sign = 1.0 if axis == "x" else -1.0
    angles[:, _row("left_" + joint), a] = torch.where(mask, left_values, angles[:, _row("left_" + joint), a])
    angles[:, _row("right_" + joint), a] = torch.where(
        mask, sign * left_values, angles[:, _row("right_" + joint), a]
    )


# Samplers: (generator, num, breaking_share) -> (global rotations (N, 3, 3), joint angles (N, 21, 3) in degrees,
# family index (N,) into FAMILIES[distribution]). Only ``broad`` has breaking moves; the others ignore the share.


def _narrow(generator: torch.Generator, num: int, breaking_share: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    low, high = _limit_bounds()
    angles = torch.zeros(num, 21, 3, dtype=torch.float64)
    everyone = torch.ones(num, dtype=torch.bool)
    _set_mirrored(angles, everyone, "shoulder", "z", torch.full((num,), -65.0, dtype=torch.float64))
    _set_mirrored(angles, everyone, "elbow", "y", torch.full((num,), -10.0, dtype=torch.float64))
    _set_mirrored(angles, everyone, "knee", "x", torch.full((num,), 5.0, dtype=torch.float64))
    noise = torch.randn(num, 21, 3, generator=generator, dtype=torch.float64).clamp(-2.0, 2.0)
    angles = torch.minimum(torch.maximum(angles + 0.06 * (high - low) * noise, low), high)
    yaw = _uniform(generator, num, -20.0, 20.0)
    tilt = (3.0 * torch.randn(num, 2, generator=generator, dtype=torch.float64)).clamp(-6.0, 6.0)
    return _heading_and_tilt(yaw, tilt[:, 0], tilt[:, 1]), angles, torch.zeros(num, dtype=torch.long)


BREAKING_SHARE = 0.25
"""Share of ``broad`` poses in breaking moves: any global orientation (the rest stand within 25 degrees)."""


def _broad(generator: torch.Generator, num: int, breaking_share: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    low, high = _limit_bounds()
    # The median of three uniform numbers is Beta(2, 2) distributed.
    unit = torch.rand(num, 21, 3, 3, generator=generator, dtype=torch.float64).median(-1).values
    angles = low + (high - low) * unit
    yaw = _uniform(generator, num, -180.0, 180.0)
    tilt = (10.0 * torch.randn(num, 2, generator=generator, dtype=torch.float64)).clamp(-25.0, 25.0)
    upright = _heading_and_tilt(yaw, tilt[:, 0], tilt[:, 1])
    # Breaking moves (freezes, flips, windmills): a share of the dancers in any orientation at all.
    breaking = torch.rand(num, generator=generator) < breaking_share
    return torch.where(breaking[:, None, None], _uniform_rotations(generator, num), upright), angles, breaking.long()


_HARD_FAMILIES = ("inversion", "split", "bend", "tumble")


def _hard(generator: torch.Generator, num: int, breaking_share: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    low, high = _limit_bounds()
    angles = _uniform(generator, (num, 21, 3), low, high)
    family = torch.randint(0, len(_HARD_FAMILIES), (num,), generator=generator)
    inversion, split, bend = (family == _HARD_FAMILIES.index(f) for f in ("inversion", "split", "bend"))
    yaw = _uniform(generator, num, -180.0, 180.0)

    # Inversions: upside down (pitch near 180), arms raised overhead as in a handstand.
    inverted = _heading_and_tilt(yaw, _uniform(generator, num, 145.0, 215.0),
                                 _uniform(generator, num, -20.0, 20.0))
    _set_mirrored(angles, inversion, "shoulder", "z", _uniform(generator, num, 40.0, 80.0))
    _set_mirrored(angles, inversion, "shoulder", "y", _uniform(generator, num, -40.0, 20.0))

    # Splits: front (one thigh fully forward, the other back) or side (both thighs out).
    front = torch.rand(num, generator=generator) < 0.5
    left_leads = torch.rand(num, generator=generator) < 0.5
    lead, trail = _uniform(generator, num, -125.0, -95.0), _uniform(generator, num, 15.0, 35.0)
    front_split = split & front
    for side, values in (("left_hip", torch.where(left_leads, lead, trail)),
                         ("right_hip", torch.where(left_leads, trail, lead))):
        angles[:, _row(side), 0] = torch.where(front_split, values, angles[:, _row(side), 0])
    _set_mirrored(angles, front_split, "hip", "z", _uniform(generator, num, -10.0, 10.0))
    side_split = split & ~front
    _set_mirrored(angles, side_split, "hip", "z", _uniform(generator, num, 65.0, 85.0))
    _set_mirrored(angles, side_split, "hip", "x", _uniform(generator, num, -20.0, 10.0))
    _set_mirrored(angles, split, "knee", "x", _uniform(generator, num, 0.0, 10.0))
    split_tilt = _heading_and_tilt(yaw, _uniform(generator, num, -45.0, 45.0),
                                   _uniform(generator, num, -45.0, 45.0))

    # Strong bends: the whole spine near its forward limit with flexed hips, or near its back limit.
    forward = torch.rand(num, generator=generator) < 0.5
    depth = _uniform(generator, (num, 3), 0.6, 1.0)
    for column, spine in enumerate(("spine1", "spine2", "spine3")):
        limit = torch.where(forward, high[_row(spine), 0], low[_row(spine), 0])
        angles[:, _row(spine), 0] = torch.where(bend, depth[:, column] * limit, angles[:, _row(spine), 0])
    hip_flexion = torch.where(forward, _uniform(generator, num, -125.0, -70.0),
                              _uniform(generator, num, 0.0, 35.0))
    _set_mirrored(angles, bend, "hip", "x", hip_flexion)
    _set_mirrored(angles, bend, "knee", "x", _uniform(generator, num, 0.0, 30.0))
    bend_tilt = _heading_and_tilt(yaw, _uniform(generator, num, -20.0, 20.0),
                                  _uniform(generator, num, -20.0, 20.0))

    # Tumbles: any global rotation at all.
    global_rotation = _uniform_rotations(generator, num)
    for members, rotation in ((inversion, inverted), (split, split_tilt), (bend, bend_tilt)):
        global_rotation = torch.where(members[:, None, None], rotation, global_rotation)
    return global_rotation, angles, family


_SAMPLERS = {"narrow": _narrow, "broad": _broad, "hard": _hard}
FAMILIES = {"narrow": ("scan",), "broad": ("dance", "breaking"), "hard": _HARD_FAMILIES}
"""The kinds of pose each distribution mixes (:func:`pose_families` says which each sample is)."""


def sample_poses(distribution: str, num: int, seed: int = 0, *, breaking_share: float | None = None) -> SMPLXParams:
    """``num`` poses from ``distribution`` (``narrow`` | ``broad`` | ``hard``), deterministic by seed.

    ``breaking_share``: the share of ``broad`` poses in breaking moves (None: :data:`BREAKING_SHARE`;
    the other distributions ignore it).

    Returns :class:`~drpose.body.SMPLXParams` with ``global_orient`` (N, 3) and ``body_pose``
    (N, 21, 3) in float32 (no betas, translation or hands). Every pose is within
    :data:`JOINT_LIMITS`.
    """
    global_rotation, angles, _ = _sample(distribution, num, seed, breaking_share)
    return SMPLXParams(
        global_orient=matrix_to_axis_angle(global_rotation).float(),
        body_pose=_angles_to_body_pose(angles).float(),
    )


def pose_families(distribution: str, num: int, seed: int = 0, *, breaking_share: float | None = None) -> list[str]:
    """Which of :data:`FAMILIES` each pose of ``sample_poses(distribution, num, seed, ...)`` belongs to."""
    _, _, family = _sample(distribution, num, seed, breaking_share)
    names = FAMILIES[distribution]
    return [names[i] for i in family.tolist()]


def _sample(distribution: str, num: int, seed: int, breaking_share: float | None):
    if distribution not in _SAMPLERS:
        raise ValueError(f"distribution: expected one of {DISTRIBUTIONS}, got {distribution!r}")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num: expected a positive int, got {num!r}")
    share = BREAKING_SHARE if breaking_share is None else breaking_share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        raise ValueError(f"breaking_share: expected a number in [0, 1], got {breaking_share!r}")
    generator = torch.Generator().manual_seed(int(seed))
    return _SAMPLERS[distribution](generator, num, float(share))


def position_spread(joints: torch.Tensor) -> float:
    """Spread of root-relative joint positions over a set of poses (metres).

    The root mean square, over joints, of the positions' standard deviation (all three axes
    together): how far a joint typically is from its mean position across the set.
    """
    relative = joints - joints[:, :1]
    return float(relative.var(0, unbiased=False).sum(-1).mean().sqrt())


def remove_heading(joints: torch.Tensor) -> torch.Tensor:
    """Poses (N, 22, 3) turned about the vertical through the pelvis to face a common way.

    After the turn the hips' right-to-left direction points along +x, so the same pose facing
    different ways compares as equal.
    """
    hips = joints[:, BODY22_NAMES.index("left_hip")] - joints[:, BODY22_NAMES.index("right_hip")]
    heading = torch.atan2(-hips[:, 2], hips[:, 0])  # rotation about +y that takes +x to the hips
    cos, sin = torch.cos(-heading), torch.sin(-heading)
    zero, one = torch.zeros_like(cos), torch.ones_like(cos)
    undo = torch.stack([torch.stack([cos, zero, sin], -1), torch.stack([zero, one, zero], -1),
                        torch.stack([-sin, zero, cos], -1)], -2)
    root = joints[:, :1]
    return torch.einsum("nij,nkj->nki", undo, joints - root) + root


def farthest_point_sampling(joints: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Indices (k,) of ``k`` diverse poses among N, by greedy farthest-point sampling.

    Poses (N, J, 3) are compared by their root-relative joints, with the distance between two poses
    the mean per-joint Euclidean distance (MPJPE). The first pose is drawn by ``seed``; each next one
    is the pose farthest from all chosen so far (ties: the lowest index). Indices never repeat.
    """
    if joints.ndim != 3 or joints.shape[-1] != 3:
        raise ValueError(f"joints: expected shape (N, J, 3), got {tuple(joints.shape)}")
    num = joints.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num:
        raise ValueError(f"k: expected an int in [1, {num}] (the number of poses), got {k!r}")
    relative = (joints - joints[:, :1]).double()
    generator = torch.Generator().manual_seed(int(seed))
    chosen = [int(torch.randint(0, num, (1,), generator=generator))]
    nearest = torch.full((num,), math.inf, dtype=torch.float64)
    for _ in range(k - 1):
        distance = (relative - relative[chosen[-1]]).norm(dim=-1).mean(-1)
        nearest = torch.minimum(nearest, distance)
        nearest[chosen[-1]] = -1.0  # chosen poses are never picked again, even among duplicates
        chosen.append(int(nearest.argmax()))
    return torch.tensor(chosen, dtype=torch.long)
