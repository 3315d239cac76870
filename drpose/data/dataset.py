"""The DrPose15K-style dataset folder: schema, validation, reading and writing.

A dataset is a folder with ``manifest.jsonl`` (one JSON object per line, one line per sample) and the
files its records point to (paths relative to the folder)::

    manifest.jsonl
    images/<id>.png      the single-view condition image (RGB)
    poses/<id>.npz       the pose
    renders/<id>.npz     optional multi-view renders for evaluation

Record fields:

=============== ========== ================================================================
 field           required   meaning
=============== ========== ================================================================
 ``id``          yes        unique, letters, digits, ``_ - .``
 ``image``       yes        path of an RGB image; all images of a dataset share one size
 ``pose``        yes        path of a ``.npz`` pose file
 ``pose_format`` yes        ``"smplx"`` or ``"joints"``
 ``joint_set``   joints     for ``"joints"`` poses: ``"body22"``, ``"smpl24"`` or ``"coco17"``
 ``camera``      renders    :class:`~drpose.cameras.CameraRig` settings: the image is its view 0
 ``renders``     no         path of a ``.npz`` with the rig's multi-view renders
 ``source``      no         free text: where the sample came from
 ``group``       no         id shared by temporal neighbours (motion-built datasets)
 ``frame``       no         frame index in the source sequence
=============== ========== ================================================================

Pose files. ``"smplx"``: float arrays ``global_orient`` (3,), ``body_pose`` (21, 3) or (63,),
``betas`` (K,), ``transl`` (3,), and optionally ``left_hand_pose`` / ``right_hand_pose`` (15, 3) or
(45,). ``"joints"``: ``joints`` (J, 3) in metres in the record's joint set. Render files: ``rgb`` and
``normal`` uint8 (V, R, R, 3), ``mask`` uint8 (V, R, R) in {0, 1}, ``part_id`` int8 (V, R, R) in
[-1, 21] (-1 exactly where the mask is 0), V = the camera's number of views (see
:mod:`drpose.render` for what each holds).

:class:`DrPoseDataset` validates every record when it opens a folder and raises
:class:`DatasetError` naming the record, file and field of the first problem; no record is skipped
and no missing value is filled in.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from drpose.body import SMPLXBody, SMPLXParams, joints_from_params
from drpose.cameras import CameraRig
from drpose.render import NUM_PARTS, Renders
from drpose.skeleton import JOINT_SETS, can_convert, convert_joints

MANIFEST = "manifest.jsonl"
POSE_FORMATS = ("smplx", "joints")
REQUIRED_FIELDS = ("id", "image", "pose", "pose_format")
OPTIONAL_FIELDS = ("joint_set", "camera", "renders", "source", "group", "frame")
_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")

# Accepted shapes of each SMPL-X pose array ("K" = any positive length).
_SMPLX_REQUIRED_ARRAYS = {
    "global_orient": ((3,),), "body_pose": ((21, 3), (63,)), "betas": (("K",),), "transl": ((3,),),
}
_SMPLX_OPTIONAL_ARRAYS = {"left_hand_pose": ((15, 3), (45,)), "right_hand_pose": ((15, 3), (45,))}
_RENDER_ARRAYS = {"rgb": np.uint8, "normal": np.uint8, "mask": np.uint8, "part_id": np.int8}


class DatasetError(ValueError):
    """A dataset record that breaks the schema; says which record, file and field, and why."""

    def __init__(self, problem: str, *, record_id: str | None = None, file: str | None = None,
                 field: str | None = None, line: int | None = None):
        where = []
        if line is not None:
            where.append(f"{MANIFEST} line {line}")
        if record_id is not None:
            where.append(f"record {record_id!r}")
        if file is not None:
            where.append(f"file {file!r}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {problem}" if where else problem)
        self.record_id, self.file, self.field, self.line = record_id, file, field, line


@dataclass
class Record:
    """One validated manifest record, with its pose loaded (paths are absolute)."""

    id: str
    image: Path
    pose: Path
    pose_format: str
    joint_set: str
    camera: CameraRig | None
    renders: Path | None
    source: str | None
    group: str | None
    frame: int | None
    params: SMPLXParams | None
    joints: torch.Tensor | None


def _shape_matches(shape: tuple, allowed: tuple) -> bool:
    return any(
        len(shape) == len(pattern) and all(p == "K" and s > 0 or p == s for s, p in zip(shape, pattern))
        for pattern in allowed
    )


class _RecordChecker:
    """Validates one manifest line; every error carries the line, record id, file and field."""

    def __init__(self, root: Path, line: int, raw: dict):
        self.root, self.line, self.raw = root, line, raw
        self.record_id = raw.get("id") if isinstance(raw.get("id"), str) else None

    def error(self, problem: str, *, file: str | None = None, field: str | None = None) -> DatasetError:
        return DatasetError(problem, record_id=self.record_id, file=file, field=field, line=self.line)

    def string_field(self, name: str, required: bool) -> str | None:
        value = self.raw.get(name)
        if value is None:
            if required:
                raise self.error("missing required field", field=name)
            return None
        if not isinstance(value, str) or not value:
            raise self.error(f"expected a non-empty string, got {value!r}", field=name)
        return value

    def existing_file(self, name: str, required: bool) -> tuple[str, Path] | tuple[None, None]:
        relative = self.string_field(name, required)
        if relative is None:
            return None, None
        path = self.root / relative
        if not path.is_file():
            raise self.error("file does not exist", file=relative, field=name)
        return relative, path

    def check(self) -> Record:
        unknown = sorted(set(self.raw) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
        if unknown:
            raise self.error(
                f"unknown fields {unknown}; known fields: {list(REQUIRED_FIELDS + OPTIONAL_FIELDS)}"
            )
        record_id = self.string_field("id", True)
        if not _ID_PATTERN.match(record_id):
            raise self.error("id may hold only letters, digits, '_', '-' and '.'", field="id")
        pose_format = self.string_field("pose_format", True)
        if pose_format not in POSE_FORMATS:
            raise self.error(f"expected one of {POSE_FORMATS}, got {pose_format!r}", field="pose_format")
        joint_set = self.joint_set(pose_format)
        camera = self.camera()
        _, image = self.existing_file("image", True)
        pose_file, pose = self.existing_file("pose", True)
        arrays = self.npz_arrays(pose_file, pose, "pose")
        params = joints = None
        if pose_format == "smplx":
            params = self.smplx_params(pose_file, arrays)
        else:
            joints = self.joints(pose_file, arrays, joint_set)
        renders_file, renders = self.existing_file("renders", False)
        if renders is not None:
            if camera is None:
                raise self.error("a record with 'renders' needs the 'camera' that made them", field="camera")
            self.check_renders(renders_file, renders, camera)
        frame = self.raw.get("frame")
        if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int) or frame < 0):
            raise self.error(f"expected an int >= 0, got {frame!r}", field="frame")
        return Record(
            id=record_id, image=image, pose=pose, pose_format=pose_format, joint_set=joint_set,
            camera=camera, renders=renders, source=self.string_field("source", False),
            group=self.string_field("group", False), frame=frame, params=params, joints=joints,
        )

    def joint_set(self, pose_format: str) -> str:
        name = self.string_field("joint_set", pose_format == "joints")
        if pose_format == "smplx":
            if name is not None:
                raise self.error("only 'joints' poses name a joint set (SMPL-X poses give body22)",
                                 field="joint_set")
            return "body22"
        if name not in JOINT_SETS:
            raise self.error(f"unknown joint set {name!r}; known joint sets: {sorted(JOINT_SETS)}",
                             field="joint_set")
        return name

    def camera(self) -> CameraRig | None:
        settings = self.raw.get("camera")
        if settings is None:
            return None
        if not isinstance(settings, dict):
            raise self.error(f"expected an object of camera settings, got {settings!r}", field="camera")
        try:
            return CameraRig.from_dict(settings)
        except (TypeError, ValueError) as error:
            raise self.error(str(error), field="camera") from error

    def npz_arrays(self, relative: str, path: Path, field: str) -> dict[str, np.ndarray]:
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise self.error(f"cannot be read as a .npz archive of arrays ({error})",
                             file=relative, field=field) from error

    def float_array(self, relative: str, arrays: dict, key: str, allowed: tuple) -> np.ndarray:
        if key not in arrays:
            raise self.error("missing array", file=relative, field=key)
        array = arrays[key]
        if not np.issubdtype(array.dtype, np.floating):
            raise self.error(f"expected a floating-point array, got dtype {array.dtype}",
                             file=relative, field=key)
        if not _shape_matches(array.shape, allowed):
            expected = " or ".join(str(a).replace("'K'", "K") for a in allowed)
            raise self.error(f"expected shape {expected}, got {array.shape}", file=relative, field=key)
        if not np.isfinite(array).all():
            raise self.error("contains NaN or inf values", file=relative, field=key)
        return array

    def reject_unknown_arrays(self, relative: str, arrays: dict, known) -> None:
        unknown = sorted(set(arrays) - set(known))
        if unknown:
            raise self.error(f"unknown arrays {unknown}; expected {sorted(known)}",
                             file=relative, field=unknown[0])

    def smplx_params(self, relative: str, arrays: dict) -> SMPLXParams:
        self.reject_unknown_arrays(relative, arrays, {**_SMPLX_REQUIRED_ARRAYS, **_SMPLX_OPTIONAL_ARRAYS})
        values = {}
        for key, allowed in _SMPLX_REQUIRED_ARRAYS.items():
            values[key] = self.float_array(relative, arrays, key, allowed)
        for key, allowed in _SMPLX_OPTIONAL_ARRAYS.items():
            if key in arrays:
                values[key] = self.float_array(relative, arrays, key, allowed)
        return SMPLXParams(**{
            key: torch.from_numpy(np.asarray(value, dtype=np.float32).reshape(1, -1))
            for key, value in values.items()
        })

    def joints(self, relative: str, arrays: dict, joint_set: str) -> torch.Tensor:
        self.reject_unknown_arrays(relative, arrays, {"joints"})
        count = JOINT_SETS[joint_set].num_joints
        joints = self.float_array(relative, arrays, "joints", ((count, 3),))
        return torch.from_numpy(joints.astype(np.float32))

    def check_renders(self, relative: str, path: Path, camera: CameraRig) -> None:
        arrays = self.npz_arrays(relative, path, "renders")
        self.reject_unknown_arrays(relative, arrays, _RENDER_ARRAYS)
        for key, dtype in _RENDER_ARRAYS.items():
            if key not in arrays:
                raise self.error("missing array", file=relative, field=key)
            if arrays[key].dtype != dtype:
                raise self.error(f"expected dtype {np.dtype(dtype)}, got {arrays[key].dtype}",
                                 file=relative, field=key)
        views, size = camera.num_views, arrays["mask"].shape[-1] if arrays["mask"].ndim == 3 else -1
        expected = {"rgb": (views, size, size, 3), "normal": (views, size, size, 3),
                    "mask": (views, size, size), "part_id": (views, size, size)}
        for key, shape in expected.items():
            if arrays[key].shape != shape or size < 1:
                raise self.error(
                    f"expected shape {shape} ({views} camera views of R x R pixels), "
                    f"got {arrays[key].shape}", file=relative, field=key,
                )
        mask, part_id = arrays["mask"], arrays["part_id"]
        if not np.isin(mask, (0, 1)).all():
            raise self.error("expected values 0 or 1", file=relative, field="mask")
        if part_id.min() < -1 or part_id.max() >= NUM_PARTS:
            raise self.error(f"expected part ids in [-1, {NUM_PARTS - 1}]", file=relative, field="part_id")
        if not np.array_equal(part_id >= 0, mask == 1):
            raise self.error("part_id must be -1 exactly where mask is 0", file=relative, field="part_id")


def _check_image(checker: _RecordChecker, record: Record, root: Path) -> tuple[int, int]:
    relative = str(record.image.relative_to(root))
    try:
        with Image.open(record.image) as image:
            mode, size = image.mode, image.size
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise checker.error(f"cannot be read as an image ({error})", file=relative, field="image") from error
    if mode != "RGB":
        raise checker.error(f"expected an RGB image, got mode {mode!r} (convert it to RGB)",
                            file=relative, field="image")
    return size


class DrPoseDataset(torch.utils.data.Dataset):
    """A validated DrPose15K-style folder (see the module docstring for the format).

    Items are dicts: ``id`` (str), ``image`` float32 (3, H, W) in [0, 1], ``joints`` float32
    (J, 3) in ``joint_set`` and, with ``load_renders`` (every record must then have renders),
    ``renders``: ``rgb``/``normal`` float32 (V, 3, R, R), ``mask`` float32 (V, 1, R, R),
    ``part_id`` long (V, R, R). SMPL-X poses become ``body22`` joints through ``body_model`` when
    given, else through the built-in skeleton (see :func:`drpose.body.joints_from_params`).
    """

    def __init__(self, root: str | Path, joint_set: str = "body22", body_model: SMPLXBody | None = None,
                 load_renders: bool = False):
        if joint_set not in JOINT_SETS:
            raise ValueError(f"joint_set: unknown {joint_set!r}; known joint sets: {sorted(JOINT_SETS)}")
        self.root = Path(root)
        self.joint_set = joint_set
        self.load_renders = load_renders
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            raise DatasetError(f"no {MANIFEST} in {str(self.root)!r}", file=MANIFEST)
        self.records: list[Record] = []
        seen: dict[str, int] = {}
        image_size = None
        for line_number, text in enumerate(manifest.read_text().splitlines(), start=1):
            if not text.strip():
                raise DatasetError("empty line (every line must hold one JSON record)", line=line_number)
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as error:
                raise DatasetError(f"not valid JSON ({error})", line=line_number) from error
            if not isinstance(raw, dict):
                raise DatasetError("expected a JSON object", line=line_number)
            checker = _RecordChecker(self.root, line_number, raw)
            record = checker.check()
            if record.id in seen:
                raise checker.error(f"duplicate id (first used on line {seen[record.id]})", field="id")
            seen[record.id] = line_number
            size = _check_image(checker, record, self.root)
            if image_size is None:
                image_size = size
            elif size != image_size:
                raise checker.error(f"image size {size} differs from the dataset's {image_size}",
                                    file=str(record.image.relative_to(self.root)), field="image")
            if not can_convert(record.joint_set, joint_set):
                raise checker.error(f"joint set {record.joint_set!r} cannot be converted to the "
                                    f"dataset's joint set {joint_set!r}", field="joint_set")
            if load_renders and record.renders is None:
                raise checker.error("load_renders=True but the record has no renders", field="renders")
            self.records.append(record)
        if not self.records:
            raise DatasetError(f"{MANIFEST} holds no records", file=MANIFEST)
        self.image_width, self.image_height = image_size
        self.joints = self._all_joints(body_model)

    @property
    def image_size(self) -> int | tuple[int, int]:
        """The side of the dataset's (square) images, or (width, height) when they are not square."""
        return self.image_width if self.image_width == self.image_height else (self.image_width, self.image_height)

    def _all_joints(self, body_model: SMPLXBody | None) -> torch.Tensor:
        """Joints (N, J, 3) of every record in the dataset's joint set, SMPL-X poses batched."""
        joints: list[torch.Tensor | None] = [
            None if r.joints is None else convert_joints(r.joints, r.joint_set, self.joint_set)
            for r in self.records
        ]
        smplx_rows = [i for i, r in enumerate(self.records) if r.params is not None]
        if smplx_rows:
            params = [self.records[i].params for i in smplx_rows]
            batched = SMPLXParams(
                global_orient=torch.cat([p.global_orient for p in params]),
                body_pose=torch.cat([p.body_pose for p in params]),
                transl=torch.cat([p.transl for p in params]),
                betas=self._stacked_betas(smplx_rows) if body_model is not None else None,
            )
            body22 = joints_from_params(batched, body_model)
            for row, value in zip(smplx_rows, convert_joints(body22, "body22", self.joint_set)):
                joints[row] = value
        return torch.stack(joints).float()

    def _stacked_betas(self, rows: list[int]) -> torch.Tensor:
        """Betas (N, K) of the SMPL-X records; a body model needs one K for the whole batch."""
        first = self.records[rows[0]].params.betas.shape[1]
        for row in rows:
            record = self.records[row]
            if record.params.betas.shape[1] != first:
                raise DatasetError(
                    f"{record.params.betas.shape[1]} betas where record {self.records[rows[0]].id!r} "
                    f"has {first}; a body model needs the same number for every record",
                    record_id=record.id, file=str(record.pose.relative_to(self.root)), field="betas",
                )
        return torch.cat([self.records[row].params.betas for row in rows])

    def __len__(self) -> int:
        return len(self.records)

    def image(self, index: int) -> torch.Tensor:
        """Record ``index``'s front image as floats (3, H, W) in [0, 1]."""
        with Image.open(self.records[index].image) as image:
            pixels = np.array(image.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        item = {"id": record.id, "image": self.image(index), "joints": self.joints[index]}
        if self.load_renders:
            item["renders"] = read_renders(record.renders)
        return item


def read_renders(path: str | Path) -> dict[str, torch.Tensor]:
    """Multi-view renders from a render file, as float images (V, C, R, R) and part ids (V, R, R)."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    return {
        "rgb": torch.from_numpy(arrays["rgb"]).permute(0, 3, 1, 2).float() / 255.0,
        "normal": torch.from_numpy(arrays["normal"]).permute(0, 3, 1, 2).float() / 255.0,
        "mask": torch.from_numpy(arrays["mask"])[:, None].float(),
        "part_id": torch.from_numpy(arrays["part_id"]).long(),
    }


def _to_uint8_image(image) -> np.ndarray:
    """An (H, W, 3) uint8 array from a uint8 array, or a float tensor (3, H, W) in [0, 1]."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"image: expected a float tensor (3, H, W) in [0, 1], got "
                             f"{image.dtype} {tuple(image.shape)}")
        return (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected a uint8 array (H, W, 3), got {image.dtype} {image.shape}")
    return image


def _float_images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(V, 3, R, R) floats in [0, 1] -> (V, R, R, 3) uint8."""
    return (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class DatasetWriter:
    """Writes a dataset folder record by record (use as a context manager).

    The folder must be new or empty, so that a dataset never mixes old and new records. Each
    :meth:`add` writes the record's files, then appends its manifest line.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.exists() and any(self.root.iterdir()):
            raise FileExistsError(f"dataset folder {str(self.root)!r} is not empty; choose a new folder")
        for folder in ("images", "poses", "renders"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self._manifest = open(self.root / MANIFEST, "x", encoding="utf-8")
        self._ids: set[str] = set()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._manifest.close()

    def add(self, record_id: str, image, *, params: SMPLXParams | None = None,
            joints: torch.Tensor | None = None, joint_set: str | None = None,
            camera: CameraRig | None = None, renders: Renders | None = None,
            source: str | None = None, group: str | None = None, frame: int | None = None) -> dict:
        """Write one sample; returns its manifest record.

        Give either ``params`` (one SMPL-X sample, with betas and transl) or ``joints`` (J, 3) with
        ``joint_set``. ``renders`` (a :class:`~drpose.render.Renders` of one body) needs the
        ``camera`` rig that made it.
        """
        if not isinstance(record_id, str) or not _ID_PATTERN.match(record_id):
            raise ValueError(f"record_id: expected letters, digits, '_', '-', '.', got {record_id!r}")
        if record_id in self._ids:
            raise ValueError(f"record_id: {record_id!r} was already written")
        if (params is None) == (joints is None):
            raise ValueError("give exactly one of params (SMPL-X) or joints (with joint_set)")
        if renders is not None and camera is None:
            raise ValueError("renders: the camera rig that made them must be given too")
        record = {"id": record_id, "image": f"images/{record_id}.png", "pose": f"poses/{record_id}.npz"}
        if params is not None:
            pose_arrays = self._smplx_arrays(params)
            record["pose_format"] = "smplx"
        else:
            if joint_set not in JOINT_SETS:
                raise ValueError(f"joint_set: expected one of {sorted(JOINT_SETS)}, got {joint_set!r}")
            expected = (JOINT_SETS[joint_set].num_joints, 3)
            if tuple(joints.shape) != expected:
                raise ValueError(
                    f"joints: expected shape {expected} for {joint_set}, got {tuple(joints.shape)}"
                )
            pose_arrays = {"joints": joints.detach().cpu().float().numpy()}
            record.update(pose_format="joints", joint_set=joint_set)
        if camera is not None:
            record["camera"] = camera.to_dict()
        Image.fromarray(_to_uint8_image(image)).save(self.root / record["image"])
        np.savez(self.root / record["pose"], **pose_arrays)
        if renders is not None:
            record["renders"] = f"renders/{record_id}.npz"
            self._write_renders(self.root / record["renders"], renders, camera)
        for key, value in (("source", source), ("group", group), ("frame", frame)):
            if value is not None:
                record[key] = value
        self._manifest.write(json.dumps(record) + "\n")
        self._manifest.flush()
        self._ids.add(record_id)
        return record

    @staticmethod
    def _smplx_arrays(params: SMPLXParams) -> dict[str, np.ndarray]:
        if len(params) != 1:
            raise ValueError(f"params: expected one sample, got {len(params)}")
        if params.betas is None or params.transl is None:
            raise ValueError("params: a SMPL-X record needs betas and transl (write zeros explicitly "
                             "for the mean shape at the origin)")
        arrays = {}
        for name in ("global_orient", "body_pose", "betas", "transl", "left_hand_pose", "right_hand_pose"):
            value = getattr(params, name)
            if value is not None:
                value = value[0].detach().cpu().float().numpy()
                if not np.isfinite(value).all():
                    raise ValueError(f"params.{name}: contains NaN or inf values")
                arrays[name] = value
        return arrays

    @staticmethod
    def _write_renders(path: Path, renders: Renders, camera: CameraRig) -> None:
        if renders.rgb.shape[:2] != (1, camera.num_views):
            raise ValueError(f"renders: expected one body in {camera.num_views} views, "
                             f"got {tuple(renders.rgb.shape[:2])}")
        np.savez_compressed(
            path,
            rgb=_float_images_to_uint8(renders.rgb[0]),
            normal=_float_images_to_uint8(renders.normal[0]),
            mask=renders.mask[0, :, 0].round().to(torch.uint8).cpu().numpy(),
            part_id=renders.part_id[0].to(torch.int8).cpu().numpy(),
        )

