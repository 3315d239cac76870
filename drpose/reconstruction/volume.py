"""Occupancy of a voxel grid from the views: a soft visual hull, carved further with the normal maps.

Everything here works in *normalised* coordinates: the framing centre at the origin, one unit = the framing's
half-extent, world axes (:mod:`drpose.cameras`), so the framed volume is the cube [-1, 1]^3 seen by every
orthographic view. Occupancy values are in [0, 1], the surface at 0.5.

* Visual hull: a voxel's value is the smallest, over the views, of the soft silhouette sampled bilinearly
  where the voxel projects (0 outside the frame).
* Normal carving: a visual hull bulges where no view sees past the body (between the legs, under the arms),
  but the normal maps say which way the visible surface faces. In every view the depth of the visible
  surface is recovered from its normals: least squares on the depth differences between neighbouring
  pixels that the normals imply (pairs across a depth edge, where a normal is nearly parallel to the image
  or the hull's depth jumps, are left out), held to the hull's own depth where the hull's surface and the
  normal map agree (there the hull is the surface), loosely elsewhere, and never in front of the hull (an
  active set: where a solution comes out in front it is pinned to the hull and solved again). Voxels in front
  of that surface are carved away, only where the hull disagrees with the normals and at most
  ``max_carve_px`` pixel sizes deep (a wrong depth edge must not cut a limb off); carving that leaves a
  silhouette pixel uncovered is undone (:func:`drpose.reconstruction.reconstruct.keep_silhouettes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sparse
import scipy.sparse.linalg as sparse_linalg
import torch
import torch.nn.functional as F
from scipy import ndimage


_FAR = 100.0  # a depth beyond anything in the framed volume (normalised units), read outside the views


@dataclass(frozen=True)
class ViewGeometry:
    """Orthographic cameras of the body views: world -> camera rotations (V, 3, 3), image side ``size``."""

    rotations: np.ndarray
    size: int

    def to_camera(self, points: np.ndarray) -> np.ndarray:
        """Normalised world points (N, 3) -> camera coordinates (V, N, 3)."""
        return np.matmul(points[None], self.rotations.transpose(0, 2, 1))

    def pixels(self, camera_points: np.ndarray) -> np.ndarray:
        """Camera coordinates (..., 3) -> pixel (column, row) coordinates (..., 2)."""
        half = self.size / 2
        out = np.empty(camera_points.shape[:-1] + (2,))
        np.multiply(camera_points[..., 0] + 1.0, half, out=out[..., 0])
        np.multiply(1.0 - camera_points[..., 1], half, out=out[..., 1])
        out -= 0.5
        return out

    @property
    def pixel_size(self) -> float:
        return 2.0 / self.size


def sample_image(image: np.ndarray, pixels: np.ndarray, outside: float = 0.0) -> np.ndarray:
    """Bilinear samples of (R, R) or (R, R, C) ``image`` at (N, 2) pixel (column, row) positions; positions
    more than half a pixel outside the image read ``outside``."""
    size = image.shape[0]
    planes = torch.from_numpy(np.ascontiguousarray(image.reshape(size, size, -1).transpose(2, 0, 1)))[None]
    where = torch.from_numpy((pixels + 0.5) * (2.0 / size) - 1.0).to(planes.dtype).view(1, 1, -1, 2)
    # zeros padding on (image - outside) + outside: the constant beyond the border is ``outside``
    sampled = F.grid_sample(planes - outside, where, mode="bilinear", padding_mode="zeros", align_corners=False) + outside
    values = sampled[0, :, 0].T.numpy()
    return values[:, 0] if image.ndim == 2 else values


@dataclass(frozen=True)
class Grid:
    """A box of voxels: ``shape`` (nx, ny, nz) voxels of side ``voxel``, the centre of voxel (0, 0, 0) at
    ``origin``; arrays over it are indexed [x, y, z]."""

    origin: np.ndarray
    voxel: float
    shape: tuple[int, int, int]

    def points(self) -> np.ndarray:
        """Voxel centres (nx * ny * nz, 3)."""
        axes = [self.origin[d] + self.voxel * np.arange(self.shape[d]) for d in range(3)]
        return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def body_grid(soft_masks: np.ndarray, geometry: ViewGeometry, resolution: int, coarse: int = 32) -> Grid:
    """The part of the [-1, 1]^3 grid of ``resolution`` voxels a side that can hold the body: the bounding box
    of a coarse visual hull, one coarse voxel wider on every side."""
    step = 2.0 / resolution
    coarse_step = 2.0 / coarse
    axis = -1.0 + (np.arange(coarse) + 0.5) * coarse_step
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    # A coarse voxel may hold the body if any part of it projects onto a silhouette: grow the masks by the
    # voxel's projected reach (half its diagonal) before sampling at its centre.
    reach_px = int(np.ceil(np.sqrt(3) * coarse_step / 2 / geometry.pixel_size)) + 1
    grown = np.stack([ndimage.maximum_filter(mask, size=2 * reach_px + 1) for mask in soft_masks])
    occupied = visual_hull(grown, geometry, points) > 0
    if not occupied.any():
        raise ValueError("silhouettes: the views' silhouettes do not intersect, there is no body to reconstruct")
    low = points[occupied].min(0) - coarse_step
    high = points[occupied].max(0) + coarse_step
    first = np.clip(np.floor((low + 1.0) / step), 0, resolution - 1).astype(np.int64)
    last = np.clip(np.ceil((high + 1.0) / step), 0, resolution - 1).astype(np.int64)
    return Grid(-1.0 + (first + 0.5) * step, step, tuple(int(n) for n in last - first + 1))


def visual_hull(soft_masks: np.ndarray, geometry: ViewGeometry, points: np.ndarray) -> np.ndarray:
    """Soft visual hull values (N,) at ``points`` (N, 3) from masks (V, R, R)."""
    camera = geometry.to_camera(points)
    hull = np.ones(len(points))
    for view, mask in enumerate(soft_masks):
        np.minimum(hull, sample_image(mask, geometry.pixels(camera[view])), out=hull)
    return hull


@dataclass
class CarvingSettings:
    """Knobs of the normal carving (pixels and normalised units are those of the views)."""

    min_facing: float = 0.25  # |n_z| below this: the normal is nearly parallel to the image, a depth edge
    max_jump_px: float = 3.0  # hull depth jumps larger than this many pixel sizes: a depth edge
    agreement: float = 0.95  # cosine between hull and observed normals above which the hull is the surface
    loose_weight: float = 1e-3  # weight of the hull's depth where the two disagree
    tolerance_px: float = 0.0  # keep this many pixel sizes in front of the recovered surface (a safety margin)
    max_carve_px: float = 4.0  # carve at most this many pixel sizes behind the hull
    active_set_rounds: int = 3


def recover_depth(observed: np.ndarray, hull_depth: np.ndarray, hull_normal: np.ndarray, mask: np.ndarray,
                  pixel_size: float, settings: CarvingSettings) -> np.ndarray:
    """Depth (R, R) (camera z, larger = nearer) of the visible surface from its normals ``observed`` (R, R, 3)
    in the view's camera frame, anchored to ``hull_depth`` where ``hull_normal`` agrees; NaN off ``mask``."""
    size = mask.shape[0]
    index = -np.ones(mask.shape, dtype=np.int64)
    index[mask] = np.arange(mask.sum())
    count = int(mask.sum())
    if count == 0:
        return np.full(mask.shape, np.nan)
    nz = observed[..., 2]
    facing = nz >= settings.min_facing
    slope_x = np.where(facing, -observed[..., 0] / np.maximum(nz, 1e-6), 0.0)  # dz/dx per unit
    slope_y = np.where(facing, -observed[..., 1] / np.maximum(nz, 1e-6), 0.0)  # dz/dy per unit (y up)
    rows, cols, targets = [], [], []
    for dy, dx in ((0, 1), (1, 0)):
        first = (slice(0, size - dy), slice(0, size - dx))
        second = (slice(dy, size), slice(dx, size))
        pair = mask[first] & mask[second] & facing[first] & facing[second]
        with np.errstate(invalid="ignore"):  # -inf depths off the mask; those pairs are out already
            pair &= np.abs(hull_depth[first] - hull_depth[second]) <= settings.max_jump_px * pixel_size
        if dx:  # one column to the right: x grows by one pixel
            step = 0.5 * (slope_x[first] + slope_x[second]) * pixel_size
        else:  # one row down: y falls by one pixel
            step = -0.5 * (slope_y[first] + slope_y[second]) * pixel_size
        rows.append(index[second][pair])
        cols.append(index[first][pair])
        targets.append(step[pair])
    head, tail, target = (np.concatenate(x) for x in (rows, cols, targets))
    pairs = len(target)
    difference = sparse.csr_matrix(
        (np.r_[np.ones(pairs), -np.ones(pairs)], (np.r_[np.arange(pairs), np.arange(pairs)], np.r_[head, tail])),
        shape=(pairs, count))
    agree = (hull_normal * observed).sum(-1) >= settings.agreement
    weight = np.where(agree, 1.0, settings.loose_weight)[mask]
    anchor = hull_depth[mask]
    system = (difference.T @ difference).tocsc()
    rhs_gradient = difference.T @ target
    pinned = np.zeros(count, dtype=bool)
    for _ in range(settings.active_set_rounds):
        w = np.where(pinned, 1e3, weight)
        depth = sparse_linalg.spsolve(system + sparse.diags(w), rhs_gradient + w * anchor)
        in_front = depth > anchor + 1e-9
        if not (in_front & ~pinned).any():
            break
        pinned |= in_front
    # Only where the hull's surface disagrees with the normals is it not the surface, and only there is it carved.
    depth = np.where(agree[mask], anchor, np.clip(depth, anchor - settings.max_carve_px * pixel_size, anchor))
    out = np.full(mask.shape, np.nan)
    out[mask] = depth
    return out


def carve_with_depth(values: np.ndarray, points: np.ndarray, geometry: ViewGeometry, depths: list[np.ndarray],
                     ramp: float, settings: CarvingSettings) -> np.ndarray:
    """Occupancy ``values`` (N,) at ``points`` with everything in front of each view's surface ``depths[v]``
    (R, R, NaN where the view recovered none) carved away; the 0.5 level falls on that surface."""
    camera = geometry.to_camera(points)
    out = values.copy()
    for view, depth in enumerate(depths):
        known = np.isfinite(depth)
        if not known.any():
            continue
        # Extend the depth beyond its pixels (nearest known value) so bilinear samples near the edge stay finite.
        nearest = ndimage.distance_transform_edt(~known, return_distances=False, return_indices=True)
        filled = depth[tuple(nearest)]
        pixels = geometry.pixels(camera[view])
        surface = sample_image(filled, pixels, outside=_FAR)
        inside_known = sample_image(known.astype(np.float64), pixels) > 0
        margin = surface + settings.tolerance_px * geometry.pixel_size - camera[view][:, 2]
        carved = np.clip(0.5 + margin / ramp, 0.0, 1.0)
        np.minimum(out, np.where(inside_known, carved, 1.0), out=out)
    return out
