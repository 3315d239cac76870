"""The multi-view camera rig: framing a body, projecting joints into pixels, triangulating back.

World frame: metres, +y up, the body at rest faces +z, the person's left is +x (see
:mod:`drpose.skeleton`). Cameras orbit the body at one elevation and look at the framing centre.

Azimuths. The camera at azimuth ``a`` sits in direction ``(-sin a * cos e, sin e, cos a * cos e)``
from the centre (``e`` = elevation), i.e. the rig turns clockwise seen from above, towards the
person's right. With the default azimuths that gives PSHuman's six views:

====== ============ ======================================================================
 azim   name         what the camera sees
====== ============ ======================================================================
   0    front        the front; the person's left (+x) on the image's right
  45    front_right  front and right side
  90    right        the right side; the person's front (+z) on the image's right
 180    back         the back; the person's left on the image's left
 270    left         the left side
 315    front_left   front and left side
====== ============ ======================================================================

Camera coordinates: ``x`` right, ``y`` up, ``z`` towards the camera; world -> camera is
``R = R_x(e) @ R_y(a)`` applied to ``(p - centre) / half_extent``.

Framing (:meth:`CameraRig.frame`): one centre and one scale per body, the same for every view, from
the joints alone. Centre: the joints' mean over ``x`` and ``z``, and the midpoint of their ``y``
range. With ``r`` the largest horizontal distance of a joint from the centre and ``h`` half the
vertical range, every joint projects orthographically within
``bound = max(r, h * cos(e) + r * |sin(e)|)`` of the centre in every view, whatever the azimuth, so
``half_extent = (1 + margin) * bound + padding``. ``margin`` is relative; ``padding`` (metres)
leaves room for the body's volume beyond the joints: the default 0.18 m covers everything
:mod:`drpose.render` draws (the head sphere reaches 0.175 m beyond the head joint, limb radii are at
most 0.125 m), so the whole rendered body is in frame in every view. Perspective rigs frame the
enclosing sphere instead: ``half_extent = sqrt(1 + 1 / distance^2) * ((1 + margin) * hypot(r, h) +
padding)``, the smallest frame through which a sphere of that radius is seen whole from ``distance``.
The frame spans ``[-half_extent, +half_extent]`` in both image directions at the centre plane.

Pixels (the fused op's convention): pixel ``(row i, col j)`` has its centre at ``(x, y) = (j, i)``;
the frame's edges are at ``-0.5`` and ``S - 0.5`` for a square image of side ``S``; rows go down. A
normalised camera coordinate ``u in [-1, 1]`` (right) maps to ``x = (u + 1) * S / 2 - 0.5`` and
``v`` (up) to ``y = (1 - v) * S / 2 - 0.5``, so maps of any resolution describe the same frame:
``x_h = (x_i + 0.5) * S_h / S_i - 0.5`` (:func:`rescale_pixels`).

Perspective (``projection="perspective"``): the camera sits ``distance`` half-extents from the
centre; its focal length makes the centre plane fill the frame exactly as the orthographic view
does (field of view ``2 * atan(1 / distance)``), so the two projections agree at the centre plane.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from drpose_kernels._validation import carries_values

from drpose.skeleton import BODY22_BONES, NUM_BODY_JOINTS

DEFAULT_AZIMUTHS_DEG: tuple[float, ...] = (0.0, 45.0, 90.0, 180.0, 270.0, 315.0)
VIEW_NAMES: dict[float, str] = {
    0.0: "front", 45.0: "front_right", 90.0: "right", 180.0: "back", 270.0: "left",
    315.0: "front_left",
}
PROJECTIONS = ("orthographic", "perspective")


@dataclass(frozen=True)
class Framing:
    """Where each body sits in the frame: ``centre`` (B, 3) in metres, ``half_extent`` (B,) metres."""

    centre: torch.Tensor
    half_extent: torch.Tensor


def rescale_pixels(points: torch.Tensor, from_size: int, to_size: int) -> torch.Tensor:
    """Pixel coordinates at side ``from_size`` -> the same frame positions at side ``to_size``."""
    return (points + 0.5) * (to_size / from_size) - 0.5


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size: expected a positive int (image side in pixels), got {size!r}")
    return size


def _check_points(name: str, points: torch.Tensor, last: int = 3) -> None:
    if not isinstance(points, torch.Tensor) or points.ndim != 3 or points.shape[-1] != last:
        shape = tuple(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__
        raise ValueError(f"{name}: expected a tensor of shape (B, J, {last}), got {shape}")
    if not points.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {points.dtype}")
    if carries_values(points) and not torch.isfinite(points).all():
        raise ValueError(f"{name}: contains NaN or inf values")


@dataclass(frozen=True)
class CameraRig:
    """Settings of the multi-view rig (see the module docstring for every convention)."""

    azimuths_deg: tuple[float, ...] = DEFAULT_AZIMUTHS_DEG
    elevation_deg: float = 0.0
    projection: str = "orthographic"
    distance: float = 3.0
    margin: float = 0.05
    padding: float = 0.18

    def __post_init__(self) -> None:
        object.__setattr__(self, "azimuths_deg", tuple(float(a) for a in self.azimuths_deg))
        if not self.azimuths_deg:
            raise ValueError("azimuths_deg: expected at least one view")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection: expected one of {PROJECTIONS}, got {self.projection!r}")
        if not -90.0 < self.elevation_deg < 90.0:
            raise ValueError(f"elevation_deg: expected a value in (-90, 90), got {self.elevation_deg}")
        if not self.distance > 1.0:
            raise ValueError(
                f"distance: expected > 1 (camera outside the framed volume, in half-extents), "
                f"got {self.distance}"
            )
        if self.margin < 0 or self.padding < 0:
            raise ValueError(f"margin and padding: expected >= 0, got {self.margin}, {self.padding}")

    @property
    def num_views(self) -> int:
        return len(self.azimuths_deg)

    @property
    def view_names(self) -> tuple[str, ...]:
        return tuple(VIEW_NAMES.get(a % 360.0, f"azimuth_{a:g}") for a in self.azimuths_deg)

    def to_dict(self) -> dict:
        """Plain JSON-ready settings; :meth:`from_dict` reads them back."""
        settings = asdict(self)
        settings["azimuths_deg"] = list(self.azimuths_deg)
        return settings

    @classmethod
    def from_dict(cls, settings: dict) -> CameraRig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"camera settings: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**settings)

    def rotations(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """World -> camera rotations (V, 3, 3), ``R = R_x(elevation) @ R_y(azimuth)``."""
        azimuth = torch.deg2rad(torch.tensor(self.azimuths_deg, dtype=torch.float64))
        elevation = math.radians(self.elevation_deg)
        cos_a, sin_a = torch.cos(azimuth), torch.sin(azimuth)
        zero, one = torch.zeros_like(azimuth), torch.ones_like(azimuth)
        about_y = torch.stack([
            torch.stack([cos_a, zero, sin_a], -1),
            torch.stack([zero, one, zero], -1),
            torch.stack([-sin_a, zero, cos_a], -1),
        ], -2)
        cos_e, sin_e = math.cos(elevation), math.sin(elevation)
        about_x = torch.tensor(
            [[1.0, 0.0, 0.0], [0.0, cos_e, -sin_e], [0.0, sin_e, cos_e]], dtype=torch.float64
        )
        return (about_x @ about_y).to(dtype=dtype, device=device)

    def frame(self, joints3d: torch.Tensor) -> Framing:
        """The per-body framing (centre, half-extent) shared by all views; see the module docstring."""
        _check_points("joints3d", joints3d)
        centre_xz = joints3d[..., [0, 2]].mean(1)
        low, high = joints3d[..., 1].amin(1), joints3d[..., 1].amax(1)
        centre = torch.stack([centre_xz[:, 0], (low + high) / 2, centre_xz[:, 1]], -1)
        radius = (joints3d[..., [0, 2]] - centre_xz[:, None]).norm(dim=-1).amax(1)
        half_height = (high - low) / 2
        if self.projection == "orthographic":
            # The joints fill a vertical cylinder (radius, half_height) about the centre.
            elevation = math.radians(self.elevation_deg)
            bound = torch.maximum(
                radius, half_height * math.cos(elevation) + radius * abs(math.sin(elevation))
            )
            return Framing(centre=centre, half_extent=(1.0 + self.margin) * bound + self.padding)
        # Perspective: a sphere of radius rho about the centre fits every view when
        # half_extent >= rho * sqrt(1 + 1 / distance^2).
        sphere = (1.0 + self.margin) * torch.hypot(radius, half_height) + self.padding
        return Framing(centre=centre, half_extent=sphere * math.sqrt(1.0 + 1.0 / self.distance ** 2))

    def to_camera(self, points: torch.Tensor, framing: Framing) -> torch.Tensor:
        """World points (B, N, 3) -> normalised camera coordinates (B, V, N, 3).

        Origin at the framing centre, unit = the half-extent; x right, y up, z towards the camera.
        """
        _check_points("points", points)
        normalised = (points - framing.centre[:, None]) / framing.half_extent[:, None, None]
        rotations = self.rotations(points.dtype, points.device)
        return torch.einsum("vij,bnj->bvni", rotations, normalised)

    def _image_plane(self, camera_points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image coordinates (u right, v up, in [-1, 1] inside the frame) and depth."""
        x, y, z = camera_points.unbind(-1)
        if self.projection == "orthographic":
            return torch.stack([x, y], -1), -z
        depth = self.distance - z
        scale = self.distance / depth
        return torch.stack([x * scale, y * scale], -1), depth

    def project(self, joints3d: torch.Tensor, size: int, framing: Framing | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel coordinates (B, V, J, 2) as (x, y) at image side ``size``, and depth (B, V, J).

        ``framing`` defaults to :meth:`frame` of these joints. Depth is measured along the viewing
        direction in half-extents (smaller = nearer): from the centre plane for orthographic
        cameras, from the camera for perspective ones (<= 0 means behind the camera).
        """
        size = _check_size(size)
        framing = self.frame(joints3d) if framing is None else framing
        image_plane, depth = self._image_plane(self.to_camera(joints3d, framing))
        u, v = image_plane.unbind(-1)
        pixels = torch.stack([(u + 1.0) * (size / 2) - 0.5, (1.0 - v) * (size / 2) - 0.5], -1)
        return pixels, depth

    def visible_in_frame(self, pixels: torch.Tensor, depth: torch.Tensor, size: int) -> torch.Tensor:
        """Boolean (..., J): inside the frame ``[-0.5, size - 0.5]^2`` and in front of the camera."""
        inside = ((pixels >= -0.5) & (pixels <= size - 0.5)).all(-1)
        if self.projection == "perspective":
            inside &= depth > 0
        return inside

    def segments_and_weights(self, joints3d: torch.Tensor, size: int, include_bones: bool = True,
                             framing: Framing | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-view target segments and weights for the PoseScore op.

        Returns ``segments`` (B, V, C, 2, 2) float32, indexed ``[..., c, end, xy]`` with
        ``end`` 0 = a, 1 = b and ``xy`` = (x, y) pixels at side ``size``, and ``weights`` (B, V, C)
        float32. Channels: the J joints (``a == b``), then, with ``include_bones`` (``body22``
        only), the 21 bones parent -> child in :data:`~drpose.skeleton.BODY22_BONES` order, so
        C = 22 + 21 = 43. A weight is 0 when the point (for a bone: either end) is out of frame.
        """
        pixels, depth = self.project(joints3d, size, framing)
        visible = self.visible_in_frame(pixels, depth, size)
        segments = torch.stack([pixels, pixels], -2)
        weights = visible
        if include_bones:
            if joints3d.shape[1] != NUM_BODY_JOINTS:
                raise ValueError(
                    f"joints3d: bones are defined for the {NUM_BODY_JOINTS} body22 joints, got "
                    f"{joints3d.shape[1]} joints (pass include_bones=False for other joint sets)"
                )
            parents = torch.tensor([p for p, _ in BODY22_BONES], device=joints3d.device)
            children = torch.tensor([c for _, c in BODY22_BONES], device=joints3d.device)
            bones = torch.stack([pixels[:, :, parents], pixels[:, :, children]], -2)
            segments = torch.cat([segments, bones], 2)
            weights = torch.cat([weights, visible[:, :, parents] & visible[:, :, children]], 2)
        return segments.float(), weights.float()

    def triangulate(self, points2d: torch.Tensor, weights: torch.Tensor, size: int,
                    framing: Framing | None = None) -> torch.Tensor:
        """3D points (B, J, 3) from 2D points (B, V, J, 2) seen through the rig.

        Weighted linear least squares over the views (weights (B, V, J) >= 0, e.g. keypoint
        confidences). With ``framing`` the result is in world metres, without it in normalised
        coordinates (origin at the framing centre, unit = half-extent). Points that the weighted
        views do not determine (fewer than two non-parallel views) are NaN.
        """
        size = _check_size(size)
        num_views = self.num_views
        if points2d.ndim != 4 or points2d.shape[1] != num_views or points2d.shape[-1] != 2:
            raise ValueError(
                f"points2d: expected shape (B, {num_views}, J, 2), got {tuple(points2d.shape)}"
            )
        if weights.shape != points2d.shape[:-1]:
            raise ValueError(
                f"weights: expected shape {tuple(points2d.shape[:-1])} to match points2d, "
                f"got {tuple(weights.shape)}"
            )
        if not torch.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("weights: expected finite values >= 0")
        compute = torch.float64
        points = points2d.to(compute)
        u = (points[..., 0] + 0.5) * (2.0 / size) - 1.0
        v = 1.0 - (points[..., 1] + 0.5) * (2.0 / size)
        rows = self.rotations(compute, points2d.device)[None, :, None]  # (1, V, 1, 3, 3)
        if self.projection == "orthographic":
            design = torch.stack([rows[..., 0, :], rows[..., 1, :]], -2).expand(*u.shape, 2, 3)
            target = torch.stack([u, v], -1)
        else:
            d = self.distance
            design = torch.stack([
                u[..., None] * rows[..., 2, :] + d * rows[..., 0, :],
                v[..., None] * rows[..., 2, :] + d * rows[..., 1, :],
            ], -2)
            target = torch.stack([u, v], -1) * d
        w = weights.to(compute)[..., None, None]
        normal_matrix = (w * design.transpose(-1, -2) @ design).sum(1)  # (B, J, 3, 3)
        normal_rhs = (w * design.transpose(-1, -2) @ target[..., None]).sum(1)  # (B, J, 3, 1)
        eigenvalues = torch.linalg.eigvalsh(normal_matrix)
        determined = eigenvalues[..., 0] > 1e-9 * eigenvalues[..., -1].clamp_min(1e-300)
        safe_matrix = torch.where(
            determined[..., None, None], normal_matrix, torch.eye(3, dtype=compute)
        )
        solution = torch.linalg.solve(safe_matrix, normal_rhs)[..., 0]
        solution = torch.where(determined[..., None], solution, torch.nan)
        if framing is not None:
            solution = solution * framing.half_extent.to(compute)[:, None, None] \
                + framing.centre.to(compute)[:, None]
        return solution.to(points2d.dtype)

    def pixel_rays(self, size: int, dtype=torch.float32, device=None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rays through every pixel centre, row-major, in normalised camera coordinates.

        Returns ``origins`` (P, 3), unit ``directions`` (P, 3) pointing away from the camera, and
        ``near`` (P,), with P = size * size. A ray is ``origin + t * direction``; its origin is the
        ray's point closest to the framing centre (so ``origin . direction = 0``, and the body lies
        at small |t|, which keeps float32 precise), and the camera sits at ``t = near`` (-inf for
        orthographic cameras): surfaces count only where ``t > near``, and the smallest such ``t``
        is the nearest surface.
        """
        size = _check_size(size)
        centres = (torch.arange(size, dtype=torch.float64) + 0.5) * (2.0 / size) - 1.0
        v, u = torch.meshgrid(-centres, centres, indexing="ij")
        u, v = u.reshape(-1), v.reshape(-1)
        on_centre_plane = torch.stack([u, v, torch.zeros_like(u)], -1)
        if self.projection == "orthographic":
            directions = torch.zeros_like(on_centre_plane)
            directions[:, 2] = -1.0
            origins, near = on_centre_plane, torch.full_like(u, -torch.inf)
        else:
            camera = torch.tensor([0.0, 0.0, self.distance], dtype=torch.float64)
            directions = on_centre_plane - camera
            directions = directions / directions.norm(dim=-1, keepdim=True)
            along = (on_centre_plane * directions).sum(-1, keepdim=True)
            origins = on_centre_plane - along * directions
            near = ((camera - origins) * directions).sum(-1)
        return tuple(x.to(dtype=dtype, device=device) for x in (origins, directions, near))
