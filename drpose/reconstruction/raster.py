"""A small orthographic z-buffer rasteriser for triangle meshes (numpy), in the rig's pixel convention.

Reconstructed meshes are rendered through the same cameras as the true bodies (:mod:`drpose.cameras`):
vertices in normalised camera coordinates (x right, y up, z towards the camera, the frame spanning
[-1, 1]), pixel ``(row i, col j)`` centred at ``x = (j + 0.5) * 2 / R - 1``, ``y = 1 - (i + 0.5) * 2 / R``.
A pixel shows the nearest triangle whose interior (edges included) covers its centre, as the capsule
renderer's rays do; no anti-aliasing.

Written here because trimesh renders only through an OpenGL window or ray casting with optional
compiled back-ends (rtree, embree), neither of which a CPU-only test machine can count on; a vectorised
rasteriser of a few thousand triangles per view is a few milliseconds of numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Raster:
    """Per-pixel results of one view: ``face`` (R, R) index of the visible triangle, -1 for background;
    ``barycentric`` (R, R, 3); ``depth`` (R, R) camera z of the visible surface (larger = nearer), -inf
    on the background."""

    face: np.ndarray
    barycentric: np.ndarray
    depth: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return self.face >= 0

    def interpolate(self, values: np.ndarray, faces: np.ndarray, background) -> np.ndarray:
        """Per-vertex ``values`` (V, C) interpolated at every pixel -> (R, R, C), ``background`` elsewhere."""
        size = self.face.shape[0]
        out = np.empty((size, size, values.shape[1]), dtype=np.float64)
        out[:] = np.asarray(background, dtype=np.float64)
        hit = self.mask
        corners = values[faces[self.face[hit]]]  # (P, 3, C)
        out[hit] = (self.barycentric[hit][..., None] * corners).sum(1)
        return out


def pixel_coordinates(camera_points: np.ndarray, size: int) -> np.ndarray:
    """Normalised camera x, y (N, >=2) -> pixel (x = column, y = row) coordinates (N, 2)."""
    return np.stack([(camera_points[:, 0] + 1.0) * size / 2 - 0.5, (1.0 - camera_points[:, 1]) * size / 2 - 0.5], -1)


def rasterize(camera_vertices: np.ndarray, faces: np.ndarray, size: int, max_pixels_per_face: int = 1 << 22) -> Raster:
    """Rasterise triangles ``faces`` (F, 3) of vertices (V, 3) in normalised camera coordinates at ``size``."""
    pixels = pixel_coordinates(camera_vertices, size)
    tri = pixels[faces]  # (F, 3, 2)
    z = camera_vertices[faces, 2]  # (F, 3)
    low = np.clip(np.ceil(tri.min(1) - 1e-9), 0, size - 1).astype(np.int64)
    high = np.clip(np.floor(tri.max(1) + 1e-9), 0, size - 1).astype(np.int64)
    inside_frame = (tri.max(1) >= -1e-9).all(-1) & (tri.min(1) <= size - 1 + 1e-9).all(-1)
    extent = high - low + 1
    area = ((tri[:, 1, 0] - tri[:, 0, 0]) * (tri[:, 2, 1] - tri[:, 0, 1])
            - (tri[:, 2, 0] - tri[:, 0, 0]) * (tri[:, 1, 1] - tri[:, 0, 1]))
    usable = inside_frame & (np.abs(area) > 1e-12) & (extent > 0).all(-1)

    cand_face, cand_pixel, cand_bary, cand_depth = [], [], [], []
    # Faces are handled in groups of similar bounding-box size, each group on a grid of pixel offsets.
    side = np.where(usable, extent.max(-1), 0)
    for level in np.unique(np.ceil(np.log2(np.maximum(side[usable], 1))).astype(np.int64)):
        span = 1 << int(level)
        group = np.flatnonzero(usable & (side <= span) & (side > span // 2 if span > 1 else side >= 1))
        step = max(1, max_pixels_per_face // (span * span))
        dy, dx = np.meshgrid(np.arange(span), np.arange(span), indexing="ij")
        offsets = np.stack([dx.ravel(), dy.ravel()], -1)  # (S, 2) as (x, y)
        for first in range(0, len(group), step):
            faces_here = group[first : first + step]
            px = low[faces_here, None, :] + offsets[None]  # (f, S, 2)
            valid = (px <= high[faces_here, None, :]).all(-1)
            a, b, c = (tri[faces_here, i, None, :] for i in range(3))
            p = px + 0.0
            w0 = (b[..., 0] - p[..., 0]) * (c[..., 1] - p[..., 1]) - (c[..., 0] - p[..., 0]) * (b[..., 1] - p[..., 1])
            w1 = (c[..., 0] - p[..., 0]) * (a[..., 1] - p[..., 1]) - (a[..., 0] - p[..., 0]) * (c[..., 1] - p[..., 1])
            total = area[faces_here, None]
            l0, l1 = w0 / total, w1 / total
            l2 = 1.0 - l0 - l1
            bary = np.stack([l0, l1, l2], -1)
            covered = valid & (bary >= -1e-9).all(-1)
            f_index, s_index = np.nonzero(covered)
            if not len(f_index):
                continue
            face_ids = faces_here[f_index]
            cand_face.append(face_ids)
            xy = px[f_index, s_index]
            cand_pixel.append(xy[:, 1] * size + xy[:, 0])
            weights = bary[f_index, s_index]
            cand_bary.append(weights)
            cand_depth.append((weights * z[face_ids]).sum(-1))

    face = np.full(size * size, -1, dtype=np.int64)
    barycentric = np.zeros((size * size, 3))
    depth = np.full(size * size, -np.inf)
    if cand_face:
        cand_face, cand_pixel = np.concatenate(cand_face), np.concatenate(cand_pixel)
        cand_bary, cand_depth = np.concatenate(cand_bary), np.concatenate(cand_depth)
        order = np.lexsort((-cand_depth, cand_pixel))  # by pixel, nearest first
        first = order[np.r_[True, cand_pixel[order][1:] != cand_pixel[order][:-1]]]
        pixel = cand_pixel[first]
        face[pixel], barycentric[pixel], depth[pixel] = cand_face[first], cand_bary[first], cand_depth[first]
    return Raster(face.reshape(size, size), barycentric.reshape(size, size, 3), depth.reshape(size, size))
