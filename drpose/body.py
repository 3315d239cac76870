"""SMPL-X parameters and the 3D joints they describe.

Two ways from parameters to ``body22`` joints, behind one entry point, :func:`joints_from_params`:

- with a real SMPL-X model (:class:`SMPLXBody`, when the user has the licensed model files), joints
  come from the ``smplx`` package: body shape (``betas``) changes bone lengths;
- without one, the built-in rest skeleton :data:`drpose.skeleton.REST_JOINTS` is posed by
  :func:`drpose.skeleton.forward_kinematics`. That skeleton has one fixed shape, so ``betas`` (and
  the hand poses, which move no body joint) are unused on this path.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import smplx
import torch
from smplx.joint_names import JOINT_NAMES as SMPLX_JOINT_NAMES

from drpose.skeleton import BODY22_NAMES, COCO17_NAMES, forward_kinematics


@dataclass
class SMPLXParams:
    """A batch of N SMPL-X body parameters (axis-angle rotations, metres).

    ``body_pose`` may be given as (N, 63) and is stored as (N, 21, 3); hand poses likewise as
    (N, 45) or (N, 15, 3). ``betas`` (N, K), ``transl`` (N, 3) and the hands are optional.
    """

    global_orient: torch.Tensor
    body_pose: torch.Tensor
    betas: torch.Tensor | None = None
    transl: torch.Tensor | None = None
    left_hand_pose: torch.Tensor | None = None
    right_hand_pose: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.global_orient, torch.Tensor) or self.global_orient.ndim != 2 \
                or self.global_orient.shape[1] != 3:
            raise ValueError(
                f"global_orient: expected a tensor of shape (N, 3), got {_describe(self.global_orient)}"
            )
        num = self.global_orient.shape[0]
        self.body_pose = _as_rotations("body_pose", self.body_pose, num, 21)
        self.left_hand_pose = _optional_rotations("left_hand_pose", self.left_hand_pose, num, 15)
        self.right_hand_pose = _optional_rotations("right_hand_pose", self.right_hand_pose, num, 15)
        if self.betas is not None and (self.betas.ndim != 2 or self.betas.shape[0] != num):
            raise ValueError(f"betas: expected shape ({num}, K), got {_describe(self.betas)}")
        if self.transl is not None and self.transl.shape != (num, 3):
            raise ValueError(f"transl: expected shape ({num}, 3), got {_describe(self.transl)}")

    def __len__(self) -> int:
        return self.global_orient.shape[0]

    def select(self, index: torch.Tensor | slice | list[int]) -> SMPLXParams:
        """The parameters of the samples picked by ``index`` (a slice, or indices along N)."""
        return SMPLXParams(**{
            f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
            for f in fields(self)
        })

    def to(self, device=None, dtype=None) -> SMPLXParams:
        """The same parameters on ``device`` and/or in ``dtype``."""
        return SMPLXParams(**{
            f.name: None if getattr(self, f.name) is None
            else getattr(self, f.name).to(device=device, dtype=dtype)
            for f in fields(self)
        })


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _as_rotations(name: str, value, num: int, joints: int) -> torch.Tensor:
    if isinstance(value, torch.Tensor) and value.shape in ((num, joints * 3), (num, joints, 3)):
        return value.reshape(num, joints, 3)
    raise ValueError(
        f"{name}: expected shape ({num}, {joints}, 3) or ({num}, {joints * 3}), got {_describe(value)}"
    )


def _optional_rotations(name: str, value, num: int, joints: int) -> torch.Tensor | None:
    return None if value is None else _as_rotations(name, value, num, joints)


class BodyModelError(ValueError):
    """A SMPL-X model file exists but does not hold what the ``smplx`` package needs."""


# Keys the smplx package reads from an SMPL-X model file, with the expected shapes. "V" is the
# vertex count; the smplx package picks extra joints from fixed vertex ids up to 9929, so V >= 9930.
_SMPLX_NUM_JOINTS = 55
_SMPLX_MIN_VERTICES = 9930
_SMPLX_REQUIRED_KEYS = (
    "v_template", "f", "J_regressor", "weights", "kintree_table", "shapedirs", "posedirs",
    "hands_componentsl", "hands_componentsr", "hands_meanl", "hands_meanr",
    "lmk_faces_idx", "lmk_bary_coords",
)
# SMPL-X output joint names as the smplx package orders them (55 skeleton joints, then joints taken
# from vertices: nose, eyes, ears, toes, heels, fingertips).
_COCO17_FROM_SMPLX = tuple(SMPLX_JOINT_NAMES.index(name) for name in COCO17_NAMES)


def _resolve_model_file(model_path: str | Path, gender: str) -> Path:
    path = Path(model_path)
    if path.is_file():
        return path
    tried = [path] if path.suffix in (".npz", ".pkl") else []
    if path.is_dir():
        stem = f"SMPLX_{gender.upper()}"
        tried = [folder / f"{stem}{ext}" for folder in (path, path / "smplx") for ext in (".npz", ".pkl")]
        for candidate in tried:
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"SMPL-X model not found at {str(path)!r}"
        + (f" (looked for: {', '.join(str(p) for p in tried)})" if tried else "")
        + ". Point model_path to an SMPLX_<GENDER>.npz/.pkl file or to the folder holding it."
    )


def _load_model_arrays(path: Path) -> dict:
    if path.suffix not in (".npz", ".pkl"):
        raise BodyModelError(f"SMPL-X model file {str(path)!r}: expected a .npz or .pkl file")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=True) as archive:
                return {key: archive[key] for key in archive.files}
        with open(path, "rb") as handle:
            content = pickle.load(handle, encoding="latin1")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as error:
        raise BodyModelError(f"SMPL-X model file {str(path)!r} cannot be read: {error}") from error
    if not isinstance(content, dict):
        raise BodyModelError(
            f"SMPL-X model file {str(path)!r}: expected a pickled dict of arrays, "
            f"got {type(content).__name__}"
        )
    return content


def _check_model_arrays(path: Path, arrays: dict) -> None:
    """Check the keys and shapes the smplx package relies on, naming the file and what is wrong."""
    missing = [key for key in _SMPLX_REQUIRED_KEYS if key not in arrays]
    if missing:
        raise BodyModelError(f"SMPL-X model file {str(path)!r} is missing keys {missing}")
    shapes = {key: np.shape(arrays[key]) for key in _SMPLX_REQUIRED_KEYS}
    num_vertices = shapes["v_template"][0] if len(shapes["v_template"]) == 2 else -1
    num_landmarks = shapes["lmk_faces_idx"][0] if len(shapes["lmk_faces_idx"]) == 1 else -1
    joints = _SMPLX_NUM_JOINTS
    expected = {
        "v_template": ("(V, 3)", len(shapes["v_template"]) == 2 and shapes["v_template"][1] == 3),
        "f": ("(F, 3)", len(shapes["f"]) == 2 and shapes["f"][1] == 3),
        "J_regressor": (f"({joints}, V)", shapes["J_regressor"] == (joints, num_vertices)),
        "weights": (f"(V, {joints})", shapes["weights"] == (num_vertices, joints)),
        "kintree_table": (f"(2, {joints})", shapes["kintree_table"] == (2, joints)),
        "shapedirs": ("(V, 3, K) with K >= 20", len(shapes["shapedirs"]) == 3
                      and shapes["shapedirs"][:2] == (num_vertices, 3) and shapes["shapedirs"][2] >= 20),
        "posedirs": (f"(V, 3, {9 * (joints - 1)})",
                     shapes["posedirs"] == (num_vertices, 3, 9 * (joints - 1))),
        "hands_componentsl": ("(P, 45)", len(shapes["hands_componentsl"]) == 2
                              and shapes["hands_componentsl"][1] == 45),
        "hands_componentsr": ("(P, 45)", len(shapes["hands_componentsr"]) == 2
                              and shapes["hands_componentsr"][1] == 45),
        "hands_meanl": ("(45,)", shapes["hands_meanl"] == (45,)),
        "hands_meanr": ("(45,)", shapes["hands_meanr"] == (45,)),
        "lmk_faces_idx": ("(L,)", num_landmarks >= 0),
        "lmk_bary_coords": ("(L, 3)", shapes["lmk_bary_coords"] == (num_landmarks, 3)),
    }
    for key, (description, ok) in expected.items():
        if not ok:
            raise BodyModelError(
                f"SMPL-X model file {str(path)!r}: key {key!r} has shape {shapes[key]}, "
                f"expected {description} (V = vertices = {num_vertices})"
            )
    if num_vertices < _SMPLX_MIN_VERTICES:
        raise BodyModelError(
            f"SMPL-X model file {str(path)!r}: v_template has {num_vertices} vertices; an SMPL-X "
            f"model has at least {_SMPLX_MIN_VERTICES} (is this an SMPL or SMPL-H file?)"
        )


class SMPLXBody:
    """A real SMPL-X body model (through the ``smplx`` package) that turns parameters into joints.

    ``model_path`` is an ``.npz``/``.pkl`` model file, or a folder holding ``SMPLX_<GENDER>.npz``
    (directly or in ``smplx/``). A missing file raises ``FileNotFoundError``; a file without the
    arrays SMPL-X needs raises :class:`BodyModelError`; both name the file. Hand poses are full
    axis-angle (15 joints x 3 per hand, no PCA).
    """

    def __init__(self, model_path: str | Path, gender: str = "neutral", num_betas: int = 10,
                 device: torch.device | str = "cpu"):
        self.model_file = _resolve_model_file(model_path, gender)
        _check_model_arrays(self.model_file, _load_model_arrays(self.model_file))
        self.model = smplx.SMPLX(
            str(self.model_file), ext=self.model_file.suffix[1:], gender=gender,
            num_betas=num_betas, use_pca=False, batch_size=1,
        ).to(device)
        self.model.requires_grad_(False)
        self.num_betas = self.model.num_betas
        self.device = torch.device(device)

    def joints(self, params: SMPLXParams, joint_set: str = "body22") -> torch.Tensor:
        """Joints (N, J, 3) in metres: ``body22`` (22 skeleton joints) or ``coco17``.

        ``coco17`` uses the mesh's own nose, eye and ear points (exact, unlike the head-joint
        approximation that :mod:`drpose.skeleton` must use without a mesh).
        """
        if joint_set not in ("body22", "coco17"):
            raise ValueError(f"joint_set: expected 'body22' or 'coco17', got {joint_set!r}")
        num = len(params)
        params = params.to(device=self.device, dtype=self.model.v_template.dtype)

        def given_or_zeros(value, width):
            return value.reshape(num, width) if value is not None else self._zeros(num, width)

        betas = params.betas
        if betas is not None and betas.shape[1] > self.num_betas:
            raise ValueError(
                f"betas: {betas.shape[1]} shape coefficients given but the model at "
                f"{str(self.model_file)!r} was loaded with num_betas={self.num_betas}"
            )
        if betas is not None and betas.shape[1] < self.num_betas:
            # Trailing shape coefficients that were not given are zero by definition of the basis.
            betas = torch.cat([betas, self._zeros(num, self.num_betas - betas.shape[1])], 1)
        output = self.model(
            global_orient=params.global_orient,
            body_pose=params.body_pose.reshape(num, 63),
            betas=given_or_zeros(betas, self.num_betas),
            transl=given_or_zeros(params.transl, 3),
            left_hand_pose=given_or_zeros(params.left_hand_pose, 45),
            right_hand_pose=given_or_zeros(params.right_hand_pose, 45),
            jaw_pose=self._zeros(num, 3),
            leye_pose=self._zeros(num, 3),
            reye_pose=self._zeros(num, 3),
            expression=self._zeros(num, self.model.num_expression_coeffs),
            return_verts=False,
        )
        if joint_set == "body22":
            return output.joints[:, : len(BODY22_NAMES)]
        return output.joints[:, list(_COCO17_FROM_SMPLX)]

    def _zeros(self, num: int, width: int) -> torch.Tensor:
        return torch.zeros(num, width, device=self.device, dtype=self.model.v_template.dtype)


def joints_from_params(params: SMPLXParams, body_model: SMPLXBody | None = None) -> torch.Tensor:
    """``body22`` joints (N, 22, 3) in metres for a batch of SMPL-X parameters.

    With ``body_model`` the real SMPL-X model is used; without, the built-in skeleton is posed by
    forward kinematics (betas and hand poses are then unused: that skeleton has one fixed shape).
    """
    if body_model is not None:
        return body_model.joints(params, "body22")
    return forward_kinematics(params.global_orient, params.body_pose, params.transl)
