"""Joint sets, kinematic trees and forward kinematics of the body.

World frame (shared by the whole project, as in SMPL): metres, +y up, the body at rest faces +z and
the person's left is +x. Three joint sets are defined:

- ``smpl24``: the 24 SMPL joints (``pelvis`` ... ``right_hand``).
- ``body22``: the 22 SMPL-X body joints, identical to the first 22 SMPL joints (SMPL-X replaces
  SMPL's two hand-tip joints by finger joints). This is the project's working joint set: the reward,
  the cameras and the renderer all speak ``body22``.
- ``coco17``: the 17 COCO keypoints (face points, shoulders ... ankles), for 2D keypoint tools.

Index mappings (see :data:`BODY22_FROM_SMPL24` and :data:`COCO17_FROM_BODY22`):

- ``smpl24 -> body22`` is exact: body joint ``i`` is SMPL joint ``i`` for ``i < 22``. SMPL's
  ``left_hand`` (22) and ``right_hand`` (23) have no ``body22`` counterpart and are dropped.
- ``body22 -> coco17`` is an approximation. The 12 limb keypoints take the matching joint centres
  (COCO annotates surface landmarks, so e.g. COCO hips sit a few centimetres away from SMPL hip
  centres). The five face points (nose, eyes, ears) have no body-joint counterpart: all five are
  approximated by the ``head`` joint (:data:`COCO17_APPROXIMATED` lists them). No mapping exists
  from ``coco17`` back to the body sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from smplx.lbs import batch_rigid_transform, batch_rodrigues

SMPL24_NAMES: tuple[str, ...] = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2",
    "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar",
    "right_collar", "head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hand", "right_hand",
)
SMPL24_PARENTS: tuple[int, ...] = (
    -1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21,
)

BODY22_NAMES: tuple[str, ...] = SMPL24_NAMES[:22]
BODY22_PARENTS: tuple[int, ...] = SMPL24_PARENTS[:22]
# One bone per non-root joint, (parent, child), ordered by child index 1..21.
BODY22_BONES: tuple[tuple[int, int], ...] = tuple(
    (BODY22_PARENTS[child], child) for child in range(1, len(BODY22_NAMES))
)
NUM_BODY_JOINTS = len(BODY22_NAMES)

COCO17_NAMES: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
# The usual COCO limb graph, for drawing (COCO keypoints have no kinematic tree).
COCO17_EDGES: tuple[tuple[int, int], ...] = (
    (0, 1), (0, 2), (1, 3), (2, 4), (5, 6), (5, 7), (7, 9), (6, 8), (8, 10), (5, 11), (6, 12),
    (11, 12), (11, 13), (13, 15), (12, 14), (14, 16),
)

BODY22_FROM_SMPL24: tuple[int, ...] = tuple(range(22))
_HEAD = BODY22_NAMES.index("head")
COCO17_FROM_BODY22: tuple[int, ...] = (_HEAD,) * 5 + tuple(
    BODY22_NAMES.index(name) for name in COCO17_NAMES[5:]
)
COCO17_APPROXIMATED: tuple[str, ...] = COCO17_NAMES[:5]


@dataclass(frozen=True)
class JointSet:
    """A named joint set: joint names, and parents (``None`` for sets without a kinematic tree)."""

    name: str
    names: tuple[str, ...]
    parents: tuple[int, ...] | None

    @property
    def num_joints(self) -> int:
        return len(self.names)


JOINT_SETS: dict[str, JointSet] = {
    "smpl24": JointSet("smpl24", SMPL24_NAMES, SMPL24_PARENTS),
    "body22": JointSet("body22", BODY22_NAMES, BODY22_PARENTS),
    "coco17": JointSet("coco17", COCO17_NAMES, None),
}

# Defined conversions as index lists into the source set; composed where needed.
_CONVERSIONS: dict[tuple[str, str], tuple[int, ...]] = {
    ("smpl24", "body22"): BODY22_FROM_SMPL24,
    ("body22", "coco17"): COCO17_FROM_BODY22,
    ("smpl24", "coco17"): tuple(BODY22_FROM_SMPL24[i] for i in COCO17_FROM_BODY22),
}


def joint_set(name: str) -> JointSet:
    """Look up a joint set by name; unknown names raise a ``ValueError`` listing the known ones."""
    if name not in JOINT_SETS:
        raise ValueError(f"unknown joint set {name!r}; known joint sets: {sorted(JOINT_SETS)}")
    return JOINT_SETS[name]


def can_convert(source: str, target: str) -> bool:
    """Whether :func:`convert_joints` maps joint set ``source`` onto ``target``."""
    for name in (source, target):
        joint_set(name)  # unknown names raise
    return source == target or (source, target) in _CONVERSIONS


def convert_joints(joints: torch.Tensor, source: str, target: str) -> torch.Tensor:
    """Map joints ``(..., J_source, 3 or 2)`` of joint set ``source`` to joint set ``target``.

    Only the mappings documented in the module docstring exist (``coco17`` is approximate and has
    no inverse); anything else raises a ``ValueError``.
    """
    source_set = joint_set(source)
    if joints.shape[-2] != source_set.num_joints:
        raise ValueError(
            f"joints: expected {source_set.num_joints} joints of set {source!r} in dim -2, "
            f"got shape {tuple(joints.shape)}"
        )
    if source == target:
        return joints
    if (source, target) not in _CONVERSIONS:
        raise ValueError(f"no mapping from joint set {source!r} to {target!r}")
    index = torch.tensor(_CONVERSIONS[(source, target)], device=joints.device)
    return joints.index_select(-2, index)


# Rest skeleton (T-pose, arms along +-x) of an adult of about 1.72 m, metres, pelvis at the origin.
# Proportions follow the SMPL neutral template: thigh 0.38, shin 0.40, upper arm 0.25,
# forearm 0.25, shoulder width 0.36 (joint centres); the head joint is the skull base.
_REST_LEFT_AND_CENTRE = {
    "pelvis": (0.0, 0.0, 0.0),
    "left_hip": (0.060, -0.085, -0.010),
    "spine1": (0.0, 0.110, -0.025),
    "left_knee": (0.095, -0.465, 0.000),
    "spine2": (0.0, 0.245, -0.015),
    "left_ankle": (0.085, -0.865, -0.040),
    "spine3": (0.0, 0.300, 0.000),
    "left_foot": (0.115, -0.920, 0.085),
    "neck": (0.0, 0.515, -0.025),
    "left_collar": (0.075, 0.420, -0.010),
    "head": (0.0, 0.605, 0.025),
    "left_shoulder": (0.180, 0.450, -0.020),
    "left_elbow": (0.430, 0.445, -0.035),
    "left_wrist": (0.680, 0.445, -0.030),
}


def _mirrored_rest_joints() -> torch.Tensor:
    rows = []
    for name in BODY22_NAMES:
        if name.startswith("right_"):
            x, y, z = _REST_LEFT_AND_CENTRE["left_" + name[len("right_"):]]
            rows.append((-x, y, z))
        else:
            rows.append(_REST_LEFT_AND_CENTRE[name])
    return torch.tensor(rows, dtype=torch.float32)


REST_JOINTS: torch.Tensor = _mirrored_rest_joints()
"""(22, 3) built-in rest skeleton in metres: T-pose, y up, facing +z, left at +x, pelvis at 0."""


def _check_pose_shapes(global_orient: torch.Tensor, body_pose: torch.Tensor) -> torch.Tensor:
    if global_orient.ndim != 2 or global_orient.shape[1] != 3:
        raise ValueError(f"global_orient: expected shape (B, 3), got {tuple(global_orient.shape)}")
    batch = global_orient.shape[0]
    if body_pose.shape in ((batch, 63), (batch, 21, 3)):
        return body_pose.reshape(batch, 21, 3)
    raise ValueError(
        f"body_pose: expected shape ({batch}, 21, 3) or ({batch}, 63) to match global_orient, "
        f"got {tuple(body_pose.shape)}"
    )


def forward_kinematics(
    global_orient: torch.Tensor,
    body_pose: torch.Tensor,
    transl: torch.Tensor | None = None,
    rest_joints: torch.Tensor | None = None,
) -> torch.Tensor:
    """Posed ``body22`` joints ``(B, 22, 3)`` from axis-angle rotations, as SMPL poses its skeleton.

    ``global_orient`` (B, 3) rotates the whole body about the pelvis; ``body_pose`` (B, 21, 3) or
    (B, 63) holds the local rotations of joints 1..21 relative to their parents; ``transl`` (B, 3)
    is added at the end. ``rest_joints`` (22, 3) or (B, 22, 3) defaults to :data:`REST_JOINTS`.
    """
    body_pose = _check_pose_shapes(global_orient, body_pose)
    batch, dtype, device = global_orient.shape[0], global_orient.dtype, global_orient.device
    if rest_joints is None:
        rest_joints = REST_JOINTS
    if rest_joints.shape not in ((22, 3), (batch, 22, 3)):
        raise ValueError(
            f"rest_joints: expected shape (22, 3) or ({batch}, 22, 3), got {tuple(rest_joints.shape)}"
        )
    rest = rest_joints.to(device=device, dtype=dtype).expand(batch, 22, 3)
    rotations = batch_rodrigues(torch.cat([global_orient[:, None], body_pose], 1).reshape(-1, 3))
    parents = torch.tensor(BODY22_PARENTS, dtype=torch.long, device=device)
    posed, _ = batch_rigid_transform(rotations.reshape(batch, 22, 3, 3), rest, parents, dtype=dtype)
    if transl is not None:
        if transl.shape != (batch, 3):
            raise ValueError(f"transl: expected shape ({batch}, 3), got {tuple(transl.shape)}")
        posed = posed + transl[:, None].to(dtype)
    return posed
