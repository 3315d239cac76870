"""A synthetic SMPL-X model file for tests (the licensed model files cannot be shipped).

The file has every array the ``smplx`` package reads, with SMPL-X's sizes (55 joints, 9930
vertices: the smallest count for which smplx's fixed extra-joint vertex ids exist). It is built so
that its skeleton is the project's built-in rest skeleton: vertex ``j < 55`` sits on joint ``j``,
the joint regressor picks exactly those vertices, and each of them is skinned to its own joint. Pose
blend shapes are zero; the first shape coefficient scales the whole body by ``1 + 0.1 * beta_0``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from drpose.skeleton import BODY22_PARENTS, REST_JOINTS

NUM_VERTICES = 9930
NUM_JOINTS = 55
SHAPE_SCALE_PER_BETA = 0.1


def smplx_parents() -> list[int]:
    """SMPL-X kinematic tree: body 22, jaw and eyes on the head, 15 finger joints per wrist."""
    parents = list(BODY22_PARENTS) + [15, 15, 15]
    for wrist in (20, 21):
        for _finger in range(5):
            base = len(parents)
            parents += [wrist, base, base + 1]
    return parents


def model_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    template = rng.normal(0.0, 0.3, (NUM_VERTICES, 3)).astype(np.float32)
    template[:22] = REST_JOINTS.numpy()
    # Face and finger joints near the head and the wrists.
    anchors = [15] * 3 + [20] * 15 + [21] * 15
    template[22:NUM_JOINTS] = template[anchors] + rng.normal(0.0, 0.03, (33, 3))
    regressor = np.zeros((NUM_JOINTS, NUM_VERTICES), np.float32)
    regressor[np.arange(NUM_JOINTS), np.arange(NUM_JOINTS)] = 1.0
    weights = np.zeros((NUM_VERTICES, NUM_JOINTS), np.float32)
    weights[np.arange(NUM_JOINTS), np.arange(NUM_JOINTS)] = 1.0
    weights[NUM_JOINTS:, 0] = 1.0
    faces = np.stack([np.arange(NUM_VERTICES - 2), np.arange(1, NUM_VERTICES - 1),
                      np.arange(2, NUM_VERTICES)], 1).astype(np.int64)
    shapedirs = np.zeros((NUM_VERTICES, 3, 20), np.float32)
    shapedirs[:, :, 0] = SHAPE_SCALE_PER_BETA * template
    kintree = np.stack([np.array(smplx_parents()), np.arange(NUM_JOINTS)]).astype(np.int64)
    return {
        "v_template": template, "f": faces, "J_regressor": regressor, "weights": weights,
        "kintree_table": kintree, "shapedirs": shapedirs,
        "posedirs": np.zeros((NUM_VERTICES, 3, 9 * (NUM_JOINTS - 1)), np.float32),
        "hands_componentsl": np.eye(45, dtype=np.float32),
        "hands_componentsr": np.eye(45, dtype=np.float32),
        "hands_meanl": np.zeros(45, np.float32), "hands_meanr": np.zeros(45, np.float32),
        "lmk_faces_idx": np.arange(51, dtype=np.int64),
        "lmk_bary_coords": np.full((51, 3), 1.0 / 3.0, np.float32),
    }


def write_model(path: Path, arrays: dict[str, np.ndarray] | None = None) -> Path:
    """Write the synthetic model (or the given arrays) as a compressed ``.npz``; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **(model_arrays() if arrays is None else arrays))
    return path
