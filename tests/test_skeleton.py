"""Joint sets, the rest skeleton, forward kinematics, and SMPL-X bodies (synthetic model file)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from smplx.joint_names import JOINT_NAMES as SMPLX_JOINT_NAMES
from smplx.vertex_ids import vertex_ids
from synthetic_smplx import SHAPE_SCALE_PER_BETA, model_arrays, write_model

from drpose.body import BodyModelError, SMPLXBody, SMPLXParams, joints_from_params
from drpose.skeleton import (
    BODY22_BONES, BODY22_NAMES, BODY22_PARENTS, COCO17_APPROXIMATED, COCO17_NAMES, REST_JOINTS,
    SMPL24_NAMES, convert_joints, forward_kinematics, joint_set,
)


def test_body22_is_the_smplx_body_in_smplx_order():
    assert BODY22_NAMES == tuple(SMPLX_JOINT_NAMES[:22])
    assert BODY22_NAMES == SMPL24_NAMES[:22]
    assert len(BODY22_BONES) == 21
    for parent, child in BODY22_BONES:
        assert BODY22_PARENTS[child] == parent and parent < child


def test_rest_skeleton_is_an_upright_adult_facing_forward():
    name = BODY22_NAMES.index
    joints = REST_JOINTS
    assert joints.shape == (22, 3)
    # Left is +x, mirrored exactly on the right.
    for index, joint in enumerate(BODY22_NAMES):
        if joint.startswith("left_"):
            right = joints[name("right_" + joint[5:])]
            assert joints[index][0] > 0
            assert torch.equal(right, joints[index] * torch.tensor([-1.0, 1.0, 1.0]))
    # y up: head above neck above pelvis above knees above ankles; toes point forward (+z).
    heights = [joints[name(j), 1] for j in ("head", "neck", "pelvis", "left_knee", "left_ankle")]
    assert all(a > b for a, b in zip(heights, heights[1:]))
    assert joints[name("left_foot"), 2] > joints[name("left_ankle"), 2] + 0.05
    # Adult proportions: ankle-to-head-joint about 1.47 m (stature about 1.72 m).
    assert 1.35 < float(joints[name("head"), 1] - joints[name("left_ankle"), 1]) < 1.6
    thigh = (joints[name("left_knee")] - joints[name("left_hip")]).norm()
    forearm = (joints[name("left_wrist")] - joints[name("left_elbow")]).norm()
    assert 0.33 < thigh < 0.45 and 0.2 < forearm < 0.3


def _rodrigues(vector: np.ndarray) -> np.ndarray:
    angle = np.linalg.norm(vector)
    if angle < 1e-12:
        return np.eye(3)
    x, y, z = vector / angle
    cross = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def _fk_by_hand(global_orient, body_pose, transl, rest):
    """Each joint: parent's position + parent's world rotation applied to its rest offset."""
    rotations = [_rodrigues(global_orient)] + [_rodrigues(r) for r in body_pose]
    world_rotation, positions = [None] * 22, np.zeros((22, 3))
    for joint in range(22):
        parent = BODY22_PARENTS[joint]
        if parent < 0:
            world_rotation[joint], positions[joint] = rotations[0], rest[0]
        else:
            world_rotation[joint] = world_rotation[parent] @ rotations[joint]
            positions[joint] = positions[parent] + world_rotation[parent] @ (rest[joint] - rest[parent])
    return positions + transl


def test_forward_kinematics_matches_a_hand_computation():
    generator = torch.Generator().manual_seed(0)
    global_orient = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    body_pose = 0.7 * torch.randn(5, 21, 3, generator=generator, dtype=torch.float64)
    transl = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    posed = forward_kinematics(global_orient, body_pose, transl)
    rest = REST_JOINTS.double().numpy()
    for sample in range(5):
        expected = _fk_by_hand(global_orient[sample].numpy(), body_pose[sample].numpy(),
                               transl[sample].numpy(), rest)
        np.testing.assert_allclose(posed[sample].numpy(), expected, atol=1e-7)


def test_raising_the_left_arm_by_hand():
    """90 degrees about +z at the left shoulder turns the arm (along +x) straight up (+y)."""
    body_pose = torch.zeros(1, 21, 3)
    body_pose[0, BODY22_NAMES.index("left_shoulder") - 1] = torch.tensor([0.0, 0.0, math.pi / 2])
    posed = forward_kinematics(torch.zeros(1, 3), body_pose)[0]
    shoulder, elbow, wrist = (REST_JOINTS[BODY22_NAMES.index(j)]
                              for j in ("left_shoulder", "left_elbow", "left_wrist"))
    for joint, rest in (("left_elbow", elbow), ("left_wrist", wrist)):
        dx, dy, dz = (rest - shoulder).tolist()
        expected = shoulder + torch.tensor([-dy, dx, dz])
        torch.testing.assert_close(posed[BODY22_NAMES.index(joint)], expected, atol=1e-6, rtol=0)
    untouched = [i for i, j in enumerate(BODY22_NAMES) if j not in ("left_elbow", "left_wrist")]
    torch.testing.assert_close(posed[untouched], REST_JOINTS[untouched], atol=1e-6, rtol=0)


def test_forward_kinematics_accepts_flat_poses_and_custom_rest():
    pose = 0.3 * torch.randn(2, 21, 3)
    orient = torch.randn(2, 3)
    torch.testing.assert_close(forward_kinematics(orient, pose.reshape(2, 63)),
                               forward_kinematics(orient, pose))
    doubled = forward_kinematics(orient, pose, rest_joints=2 * REST_JOINTS)
    torch.testing.assert_close(doubled, 2 * forward_kinematics(orient, pose))


@pytest.mark.parametrize("args, message", [
    ((torch.zeros(2, 4), torch.zeros(2, 21, 3)), "global_orient: expected shape (B, 3)"),
    ((torch.zeros(2, 3), torch.zeros(2, 20, 3)), "body_pose: expected shape (2, 21, 3) or (2, 63)"),
    ((torch.zeros(2, 3), torch.zeros(2, 21, 3), torch.zeros(3, 3)), "transl: expected shape (2, 3)"),
    ((torch.zeros(2, 3), torch.zeros(2, 21, 3), None, torch.zeros(21, 3)), "rest_joints: expected"),
])
def test_forward_kinematics_rejects_bad_shapes(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        forward_kinematics(*args)


def test_joint_set_conversions():
    smpl24 = torch.randn(3, 24, 3)
    assert torch.equal(convert_joints(smpl24, "smpl24", "body22"), smpl24[:, :22])
    body22 = torch.randn(3, 22, 3)
    coco = convert_joints(body22, "body22", "coco17")
    for index, name in enumerate(COCO17_NAMES):
        source = "head" if name in COCO17_APPROXIMATED else name
        assert torch.equal(coco[:, index], body22[:, BODY22_NAMES.index(source)])
    assert COCO17_APPROXIMATED == ("nose", "left_eye", "right_eye", "left_ear", "right_ear")
    assert torch.equal(convert_joints(smpl24, "smpl24", "coco17"),
                       convert_joints(smpl24[:, :22], "body22", "coco17"))
    with pytest.raises(ValueError, match="no mapping from joint set 'coco17' to 'body22'"):
        convert_joints(torch.zeros(1, 17, 3), "coco17", "body22")
    with pytest.raises(ValueError, match="expected 22 joints of set 'body22'"):
        convert_joints(torch.zeros(1, 17, 3), "body22", "coco17")
    with pytest.raises(ValueError, match="unknown joint set 'h36m'"):
        joint_set("h36m")


# --- real SMPL-X model path, through a synthetic model file ------------------------------------------

@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("smplx") / "SMPLX_NEUTRAL.npz")


@pytest.fixture(scope="module")
def body(model_file):
    return SMPLXBody(model_file.parent)  # a folder: finds SMPLX_NEUTRAL.npz in it


def _random_params(num, seed, **extra):
    generator = torch.Generator().manual_seed(seed)
    return SMPLXParams(
        global_orient=torch.randn(num, 3, generator=generator),
        body_pose=0.5 * torch.randn(num, 21, 3, generator=generator),
        transl=torch.randn(num, 3, generator=generator), **extra,
    )


def test_smplx_model_joints_match_builtin_forward_kinematics(body):
    params = _random_params(4, 0, left_hand_pose=torch.randn(4, 45), right_hand_pose=torch.randn(4, 15, 3))
    expected = forward_kinematics(params.global_orient, params.body_pose, params.transl)
    torch.testing.assert_close(body.joints(params), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(joints_from_params(params, body), expected, atol=1e-5, rtol=0)
    # Without a model the same entry point uses the built-in skeleton (betas then unused).
    with_betas = SMPLXParams(params.global_orient, params.body_pose, betas=torch.ones(4, 10),
                             transl=params.transl)
    torch.testing.assert_close(joints_from_params(with_betas), expected)


def test_smplx_model_betas_change_the_body(body):
    params = _random_params(3, 1, betas=torch.tensor([[1.0], [0.0], [-2.0]]))  # fewer than 10 betas
    scale = 1 + SHAPE_SCALE_PER_BETA * params.betas
    expected = forward_kinematics(params.global_orient, params.body_pose, params.transl,
                                  rest_joints=scale[:, :, None] * REST_JOINTS)
    torch.testing.assert_close(body.joints(params), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="12 shape coefficients given but the model"):
        body.joints(_random_params(3, 1, betas=torch.zeros(3, 12)))


def test_smplx_model_coco17_uses_the_mesh_face_points(body):
    params = _random_params(2, 2)
    coco = body.joints(params, "coco17")
    template = torch.from_numpy(model_arrays()["v_template"])
    rotation = torch.stack([torch.from_numpy(_rodrigues(g.double().numpy())).float()
                            for g in params.global_orient])
    # Face vertices are skinned to the pelvis (at the origin), so they move rigidly with the body.
    nose = template[vertex_ids["smplx"]["nose"]]
    torch.testing.assert_close(coco[:, 0], (rotation @ nose) + params.transl, atol=1e-5, rtol=0)
    body22 = body.joints(params)
    torch.testing.assert_close(coco[:, 5:], convert_joints(body22, "body22", "coco17")[:, 5:])
    with pytest.raises(ValueError, match="joint_set: expected 'body22' or 'coco17'"):
        body.joints(params, "smpl24")


def test_missing_model_file_names_the_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="SMPLX_FEMALE.npz"):
        SMPLXBody(tmp_path, gender="female")
    with pytest.raises(FileNotFoundError, match="nowhere.npz"):
        SMPLXBody(tmp_path / "nowhere.npz")


@pytest.mark.parametrize("change, message", [
    (lambda a: [a.pop("posedirs"), a.pop("weights")], r"is missing keys \['weights', 'posedirs'\]"),
    (lambda a: a.update(J_regressor=np.zeros((24, 9930), np.float32)),
     r"key 'J_regressor' has shape \(24, 9930\), expected \(55, V\)"),
    (lambda a: a.update(shapedirs=np.zeros((9930, 3, 10), np.float32)), r"key 'shapedirs'.*K >= 20"),
], ids=["missing keys", "SMPL joint regressor", "too few shape components"])
def test_malformed_model_file_says_what_is_missing(tmp_path, change, message):
    arrays = model_arrays()
    change(arrays)
    path = write_model(tmp_path / "SMPLX_NEUTRAL.npz", arrays)
    with pytest.raises(BodyModelError, match=message) as error:
        SMPLXBody(path)
    assert str(path) in str(error.value)


def test_smpl_sized_model_and_unreadable_file_are_rejected(tmp_path):
    arrays = model_arrays()
    arrays["v_template"] = arrays["v_template"][:6890]
    arrays["J_regressor"] = arrays["J_regressor"][:, :6890]
    arrays["weights"] = arrays["weights"][:6890]
    arrays["shapedirs"] = arrays["shapedirs"][:6890]
    arrays["posedirs"] = arrays["posedirs"][:6890]
    with pytest.raises(BodyModelError, match="6890 vertices; an SMPL-X model has at least 9930"):
        SMPLXBody(write_model(tmp_path / "small" / "SMPLX_NEUTRAL.npz", arrays))
    broken = tmp_path / "broken" / "SMPLX_NEUTRAL.npz"
    broken.parent.mkdir()
    broken.write_bytes(b"not a zip archive")
    with pytest.raises(BodyModelError, match="cannot be read"):
        SMPLXBody(broken)
