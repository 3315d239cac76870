"""Build a DrPose15K-style folder from motion-capture sequences (AMASS / Motion-X style ``.npz``).

DrPose15K picks 1.5K diverse poses from dance motion by farthest-point sampling and keeps each
with 9 temporal neighbours; a pose-conditioned video model then animates them into images. This
builder does the selection and writes, for every selected frame, a record whose image is the
guidance render (the front view of the capsule body): an external video model replaces those images
with its own frames, keeping the poses.

Motion files (one sequence each), SMPL-X parameters per frame, in either layout:

- ``poses`` (T, 165): SMPL-X full pose, ``[global 0:3, body 3:66, jaw 66:69, eyes 69:75,
  left hand 75:120, right hand 120:165]``; or (T, 156): SMPL-H, ``[global 0:3, body 3:66,
  left hand 66:111, right hand 111:156]``;
- ``root_orient`` (T, 3) + ``pose_body`` (T, 63), optionally ``pose_hand`` (T, 90);

plus ``trans`` (T, 3) and ``betas`` (K,) or (T, K); the frame rate (``mocap_frame_rate`` or
``mocap_framerate``) is read when present. AMASS stores motion with +z up; ``up_axis="z"`` (the
default) turns it to the project's +y up by rotating the global orientation and the translation
-90 degrees about x (exact for the built-in skeleton, whose pelvis rests at the origin; with a real
body model the body turns about a point a few centimetres from its pelvis, which the per-sample
framing absorbs).

Selection: a frame can be a key frame when its whole window (the key and ``neighbours`` frames
``stride`` apart, centred on it) lies inside its sequence. Key frames are chosen by farthest-point
sampling over root-relative joints with the heading removed (the same pose facing another way is
the same pose). Records: id ``<group>_<position in window>``, ``group`` and ``frame`` fields, and
``source`` the motion file.
"""

from __future__ import annotations

import argparse
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from smplx.lbs import batch_rodrigues

from drpose.body import SMPLXBody, SMPLXParams, joints_from_params
from drpose.cameras import CameraRig
from drpose.data.dataset import DatasetWriter
from drpose.data.synthesize import write_rendered_records
from drpose.poses import farthest_point_sampling, matrix_to_axis_angle, remove_heading

UP_AXES = ("y", "z")
_FULL_POSE_LAYOUTS = {  # width of ``poses`` -> (left hand slice, right hand slice)
    165: (slice(75, 120), slice(120, 165)),
    156: (slice(66, 111), slice(111, 156)),
}


class MotionFormatError(ValueError):
    """A motion file that does not hold an SMPL-X parameter sequence; names the file and key."""


@dataclass
class MotionSequence:
    """One motion file: per-frame SMPL-X parameters (betas per frame) in the y-up world frame."""

    path: Path
    params: SMPLXParams
    frame_rate: float | None


@dataclass
class BuildSummary:
    """What :func:`build_motion_dataset` wrote, and every input it did not use, with the reason."""

    num_groups: int
    num_records: int
    sequences_used: int
    not_used: list[str] = field(default_factory=list)


def _array(path: Path, arrays: dict, key: str, shapes: Sequence[tuple]) -> np.ndarray:
    if key not in arrays:
        raise MotionFormatError(f"motion file {str(path)!r}: missing array {key!r}")
    value = arrays[key]
    if not np.issubdtype(value.dtype, np.number):
        raise MotionFormatError(f"motion file {str(path)!r}: array {key!r} has dtype {value.dtype}, "
                                "expected numbers")
    if not any(len(value.shape) == len(s) and all(e is None or e == v for e, v in zip(s, value.shape))
               for s in shapes):
        expected = " or ".join(str(tuple("T" if e is None else e for e in s)) for s in shapes)
        raise MotionFormatError(f"motion file {str(path)!r}: array {key!r} has shape {value.shape}, "
                                f"expected {expected}")
    if not np.isfinite(value).all():
        raise MotionFormatError(f"motion file {str(path)!r}: array {key!r} contains NaN or inf values")
    return value.astype(np.float32)


def _up_z_to_y() -> torch.Tensor:
    """Rotation taking +z up to +y up: -90 degrees about x."""
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def read_motion_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of a motion ``.npz``; unreadable files raise :class:`MotionFormatError`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise MotionFormatError(f"motion file {str(path)!r} cannot be read as .npz: {error}") from error


def is_motion_sequence(arrays: dict) -> bool:
    """Whether the arrays name a pose sequence in one of the supported layouts."""
    return "poses" in arrays or {"root_orient", "pose_body"} <= set(arrays)


def load_motion(path: str | Path, up_axis: str = "z") -> MotionSequence:
    """Read one motion file (layouts in the module docstring) into y-up SMPL-X parameters."""
    if up_axis not in UP_AXES:
        raise ValueError(f"up_axis: expected one of {UP_AXES}, got {up_axis!r}")
    path = Path(path)
    arrays = read_motion_arrays(path)
    if not is_motion_sequence(arrays):
        raise MotionFormatError(
            f"motion file {str(path)!r}: no pose sequence; expected 'poses' (T, 165 or 156) or "
            f"'root_orient' (T, 3) + 'pose_body' (T, 63); found {sorted(arrays)}"
        )
    hands = {}
    if "poses" in arrays:
        full = _array(path, arrays, "poses", [(None, width) for width in _FULL_POSE_LAYOUTS])
        global_orient, body_pose = full[:, :3], full[:, 3:66]
        left, right = _FULL_POSE_LAYOUTS[full.shape[1]]
        hands = {"left_hand_pose": full[:, left], "right_hand_pose": full[:, right]}
    else:
        global_orient = _array(path, arrays, "root_orient", [(None, 3)])
        body_pose = _array(path, arrays, "pose_body", [(None, 63)])
        if "pose_hand" in arrays:
            pose_hand = _array(path, arrays, "pose_hand", [(None, 90)])
            hands = {"left_hand_pose": pose_hand[:, :45], "right_hand_pose": pose_hand[:, 45:]}
    frames = global_orient.shape[0]
    if frames < 1 or body_pose.shape[0] != frames:
        raise MotionFormatError(f"motion file {str(path)!r}: pose arrays hold {frames} and "
                                f"{body_pose.shape[0]} frames; expected the same number >= 1")
    transl = _array(path, arrays, "trans", [(frames, 3)])
    betas = _array(path, arrays, "betas", [(None,), (frames, None)])
    betas = np.broadcast_to(betas, (frames, betas.shape[-1])).copy()
    rate_key = next((k for k in ("mocap_frame_rate", "mocap_framerate") if k in arrays), None)
    frame_rate = float(arrays[rate_key]) if rate_key is not None else None

    global_orient, transl = torch.from_numpy(global_orient), torch.from_numpy(transl)
    if up_axis == "z":
        turn = _up_z_to_y()
        global_orient = matrix_to_axis_angle(turn @ batch_rodrigues(global_orient.double()).float())
        transl = transl @ turn.T
    params = SMPLXParams(
        global_orient=global_orient.float(), body_pose=torch.from_numpy(body_pose),
        betas=torch.from_numpy(betas), transl=transl.float(),
        **{name: torch.from_numpy(value) for name, value in hands.items()},
    )
    return MotionSequence(path=path, params=params, frame_rate=frame_rate)


def discover_motion_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Files given directly, plus every ``.npz`` under given folders (sorted, for determinism)."""
    files = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            files.extend(sorted(entry.rglob("*.npz")))
        elif entry.is_file():
            files.append(entry)
        else:
            raise FileNotFoundError(f"motion input {str(entry)!r} does not exist")
    return files


def window_offsets(neighbours: int, stride: int) -> torch.Tensor:
    """Frame offsets of a key frame's window: ``neighbours + 1`` frames ``stride`` apart, centred."""
    if neighbours < 0 or stride < 1:
        raise ValueError(f"neighbours >= 0 and stride >= 1 expected, got {neighbours}, {stride}")
    return (torch.arange(neighbours + 1) - neighbours // 2) * stride


def _concat_params(parts: list[SMPLXParams]) -> SMPLXParams:
    with_hands = all(p.left_hand_pose is not None for p in parts)
    return SMPLXParams(
        global_orient=torch.cat([p.global_orient for p in parts]),
        body_pose=torch.cat([p.body_pose for p in parts]),
        betas=torch.cat([p.betas for p in parts]),
        transl=torch.cat([p.transl for p in parts]),
        left_hand_pose=torch.cat([p.left_hand_pose for p in parts]) if with_hands else None,
        right_hand_pose=torch.cat([p.right_hand_pose for p in parts]) if with_hands else None,
    )


def _joints_in_chunks(params: SMPLXParams, body_model: SMPLXBody | None, chunk: int = 4096
                      ) -> torch.Tensor:
    """``body22`` joints of many frames, a chunk at a time to bound memory with a real body model."""
    return torch.cat([
        joints_from_params(params.select(slice(first, first + chunk)), body_model)
        for first in range(0, len(params), chunk)
    ])


def build_motion_dataset(inputs: Sequence[str | Path], out: str | Path, num_poses: int, *,
                         neighbours: int = 9, stride: int = 1, candidate_stride: int = 1,
                         seed: int = 0, resolution: int = 64, up_axis: str = "z",
                         body_model: SMPLXBody | None = None, rig: CameraRig | None = None,
                         with_renders: bool = False, progress: bool = True) -> BuildSummary:
    """Select ``num_poses`` key frames (plus temporal neighbours) from motion files; write a dataset.

    ``candidate_stride`` > 1 considers only every n-th eligible frame as a key frame (for very
    long motion collections); neighbours are still taken ``stride`` frames apart.
    """
    if candidate_stride < 1:
        raise ValueError(f"candidate_stride: expected >= 1, got {candidate_stride}")
    rig = CameraRig() if rig is None else rig
    offsets = window_offsets(neighbours, stride)
    not_used: list[str] = []
    sequences: list[MotionSequence] = []
    for path in discover_motion_files(inputs):
        arrays = read_motion_arrays(path)
        if not is_motion_sequence(arrays):
            not_used.append(f"{path}: not a pose sequence (keys {sorted(arrays)})")
            continue
        sequence = load_motion(path, up_axis)
        if len(sequence.params) < int(offsets[-1] - offsets[0]) + 1:
            not_used.append(f"{path}: {len(sequence.params)} frames, shorter than one window of "
                            f"{int(offsets[-1] - offsets[0]) + 1}")
            continue
        sequences.append(sequence)
    if not sequences:
        raise ValueError("no usable motion sequence among the inputs:\n" + "\n".join(not_used))
    widths = {s.params.betas.shape[1] for s in sequences}
    if len(widths) != 1:
        raise MotionFormatError(f"motion files carry different numbers of betas {sorted(widths)}; "
                                "use sequences of one body-model family")
    if not all(s.params.left_hand_pose is not None for s in sequences):
        not_used.append("hand poses: not every sequence has them, so no record carries them")

    candidates = []  # (sequence index, key frame)
    candidate_joints = []
    for index, sequence in enumerate(sequences):
        first, last = int(-offsets[0]), len(sequence.params) - 1 - int(offsets[-1])
        key_frames = list(range(first, last + 1, candidate_stride))
        candidates.extend((index, frame) for frame in key_frames)
        candidate_joints.append(_joints_in_chunks(sequence.params.select(key_frames), body_model))
    if num_poses > len(candidates):
        raise ValueError(f"num_poses: {num_poses} requested but only {len(candidates)} frames can be "
                         f"key frames with {neighbours} neighbours {stride} frames apart")
    candidate_joints = torch.cat(candidate_joints)
    keys = farthest_point_sampling(remove_heading(candidate_joints), num_poses, seed=seed)

    parts, record_ids, sources, groups, frames = [], [], [], [], []
    for group, key in enumerate(keys.tolist()):
        index, key_frame = candidates[key]
        window = (key_frame + offsets).tolist()
        parts.append(sequences[index].params.select(window))
        for position, frame in enumerate(window):
            record_ids.append(f"{group:05d}_{position:02d}")
            sources.append(str(sequences[index].path))
            groups.append(f"{group:05d}")
            frames.append(frame)
    with DatasetWriter(out) as writer:
        write_rendered_records(
            writer, _concat_params(parts), record_ids, rig=rig, resolution=resolution,
            with_renders=with_renders, sources=sources, groups=groups, frames=frames,
            body_model=body_model, progress=progress,
        )
    return BuildSummary(num_groups=num_poses, num_records=len(record_ids),
                        sequences_used=len(sequences), not_used=not_used)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m drpose.data.motion",
        description="Select diverse poses (farthest-point sampling, with temporal neighbours) from "
                    "SMPL-X motion files and write a DrPose15K-style folder of guidance renders.",
    )
    parser.add_argument("inputs", nargs="+", help="motion .npz files or folders of them")
    parser.add_argument("--out", required=True, type=Path, help="new (or empty) dataset folder")
    parser.add_argument("--num-poses", required=True, type=int, help="key poses to select")
    parser.add_argument("--neighbours", type=int, default=9, help="temporal neighbours per key pose")
    parser.add_argument("--stride", type=int, default=1, help="frames between neighbours")
    parser.add_argument("--candidate-stride", type=int, default=1,
                        help="consider every n-th eligible frame as a key frame")
    parser.add_argument("--seed", type=int, default=0, help="picks the first key pose")
    parser.add_argument("--resolution", type=int, default=64, help="guidance image side in pixels")
    parser.add_argument("--up-axis", choices=UP_AXES, default="z", help="up axis of the motion files")
    parser.add_argument("--body-model", type=Path, help="SMPL-X model file or folder (optional)")
    parser.add_argument("--gender", default="neutral", help="SMPL-X model gender, with --body-model")
    parser.add_argument("--num-betas", type=int, default=16, help="shape coefficients, with --body-model")
    parser.add_argument("--renders", action="store_true", help="also store all rig views per record")
    args = parser.parse_args(argv)
    body_model = None
    if args.body_model is not None:
        body_model = SMPLXBody(args.body_model, gender=args.gender, num_betas=args.num_betas)
    summary = build_motion_dataset(
        args.inputs, args.out, args.num_poses, neighbours=args.neighbours, stride=args.stride,
        candidate_stride=args.candidate_stride, seed=args.seed, resolution=args.resolution,
        up_axis=args.up_axis, body_model=body_model, with_renders=args.renders,
    )
    print(f"wrote {summary.num_records} records ({summary.num_groups} key poses x "
          f"{args.neighbours + 1} frames) from {summary.sequences_used} sequences to {args.out}")
    for note in summary.not_used:
        print(f"not used: {note}")


if __name__ == "__main__":
    main()
