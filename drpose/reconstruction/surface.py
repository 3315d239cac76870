"""The true body surface of the tiny world: the boundary of a union of capsules, sampled and measured exactly.

A body (:func:`drpose.render.body_capsules`) is a union of capsules (a segment ``[a, b]`` dilated by a
radius ``r``; a sphere when ``a == b``). Its surface is the part of every capsule's surface that lies inside
no other capsule. :class:`CapsuleSurface` gives

* :meth:`~CapsuleSurface.sample`: points uniformly distributed over that surface (by area), with their
  outward normals: each capsule's surface is sampled uniformly (cylinder side and the two hemispherical caps
  in proportion to their areas), points inside another capsule are dropped, so what is left is uniform on the
  union's boundary (surfaces that coincide, as two collinear capsules of one radius have, would count
  twice: a case of zero measure for bodies);
* :meth:`~CapsuleSurface.distance`: the unsigned distance of any point to the surface, with the surface
  normal at the nearest point. Outside the body it is exact (``min_k |p - [a_k, b_k]| - r_k``); inside, it is
  the distance to the nearest capsule surface point that lies on the boundary, found among each capsule's own
  closest point and dense boundary samples (exact unless the nearest point is on a seam where capsules meet,
  then within the samples' spacing).

Units are those of the inputs (metres for bodies).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

_DENSE_SAMPLES = 30000


def segment_closest(points: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Closest points (N, K, 3) on each of K segments to each of N points."""
    axis = ends - starts  # (K, 3)
    length_sq = np.maximum((axis * axis).sum(-1), 1e-30)
    along = (points @ axis.T - (starts * axis).sum(-1)) / length_sq
    return starts[None] + np.clip(along, 0.0, 1.0)[..., None] * axis[None]


@dataclass
class CapsuleSurface:
    """The surface of a union of capsules: ``starts``/``ends`` (K, 3), ``radii`` (K,)."""

    starts: np.ndarray
    ends: np.ndarray
    radii: np.ndarray

    def __post_init__(self) -> None:
        self.starts = np.asarray(self.starts, dtype=np.float64).reshape(-1, 3)
        self.ends = np.asarray(self.ends, dtype=np.float64).reshape(-1, 3)
        self.radii = np.broadcast_to(np.asarray(self.radii, dtype=np.float64), (len(self.starts),)).copy()
        if self.ends.shape != self.starts.shape:
            raise ValueError(f"capsules: starts {self.starts.shape} and ends {self.ends.shape} differ in shape")
        if not (self.radii > 0).all():
            raise ValueError(f"capsules: radii must be positive, got {self.radii.min()}")
        self._dense: tuple[cKDTree, np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_joints(cls, joints) -> "CapsuleSurface":
        """The rendered body of one set of ``body22`` joints (22, 3), metres."""
        import torch

        from drpose.render import body_capsules

        joints = torch.as_tensor(joints, dtype=torch.float64).reshape(1, -1, 3)
        starts, ends, radii = body_capsules(joints)
        return cls(starts[0].numpy(), ends[0].numpy(), radii.numpy())

    @property
    def lengths(self) -> np.ndarray:
        return np.linalg.norm(self.ends - self.starts, axis=-1)

    @property
    def capsule_areas(self) -> np.ndarray:
        """Surface area of every capsule on its own: side ``2 pi r L`` plus the two caps ``4 pi r^2``."""
        return 2 * np.pi * self.radii * self.lengths + 4 * np.pi * self.radii ** 2

    def signed_distances(self, points: np.ndarray) -> np.ndarray:
        """(N, K) signed distance of every point to every capsule (negative inside)."""
        closest = segment_closest(points, self.starts, self.ends)
        return np.linalg.norm(points[:, None] - closest, axis=-1) - self.radii[None]

    def _sample_capsules(self, counts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``counts[k]`` points uniform on capsule k's own surface: points, normals, capsule index."""
        points, normals, owners = [], [], []
        for k, count in enumerate(counts):
            if count == 0:
                continue
            a, b, r = self.starts[k], self.ends[k], self.radii[k]
            length = float(np.linalg.norm(b - a))
            on_side = rng.random(count) < (2 * np.pi * r * length) / (2 * np.pi * r * length + 4 * np.pi * r ** 2)
            # An orthonormal frame (u, w, axis) of the capsule.
            axis = (b - a) / length if length > 0 else np.array([0.0, 1.0, 0.0])
            helper = np.array([1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
            u = np.cross(axis, helper)
            u /= np.linalg.norm(u)
            w = np.cross(axis, u)
            # Side: uniform angle and height. Caps: a uniform direction on the sphere, the half facing away
            # from the segment placed at the matching end (together the two halves are one full sphere).
            angle = rng.uniform(0, 2 * np.pi, count)
            side_normal = np.cos(angle)[:, None] * u + np.sin(angle)[:, None] * w
            side_base = a + rng.random(count)[:, None] * (b - a)
            direction = rng.normal(size=(count, 3))
            direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
            cap_base = np.where((direction @ axis >= 0)[:, None], b, a)
            normal = np.where(on_side[:, None], side_normal, direction)
            base = np.where(on_side[:, None], side_base, cap_base)
            points.append(base + r * normal)
            normals.append(normal)
            owners.append(np.full(count, k))
        return np.concatenate(points), np.concatenate(normals), np.concatenate(owners)

    def _on_boundary(self, points: np.ndarray, owners: np.ndarray, tolerance: float = 1e-9) -> np.ndarray:
        """Which points (each on its owner capsule's surface) lie inside no other capsule."""
        inside = self.signed_distances(points) < -tolerance
        inside[np.arange(len(points)), owners] = False
        return ~inside.any(-1)

    def sample(self, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``count`` points (N, 3) uniform over the surface and their outward unit normals (N, 3)."""
        rng = np.random.default_rng(seed)
        areas = self.capsule_areas
        points, normals, kept = [], [], 0
        batch = max(2 * count, 1000)
        while kept < count:
            counts = rng.multinomial(batch, areas / areas.sum())
            p, n, owner = self._sample_capsules(counts, rng)
            keep = self._on_boundary(p, owner)
            points.append(p[keep])
            normals.append(n[keep])
            kept += int(keep.sum())
        # Candidates come capsule by capsule: shuffle before keeping ``count`` so no capsule is cut short.
        order = rng.permutation(kept)[:count]
        return np.concatenate(points)[order], np.concatenate(normals)[order]

    def area(self, samples: int = 200000, seed: int = 0) -> float:
        """The surface's area, estimated as the share of capsule-surface samples that lie on the boundary."""
        rng = np.random.default_rng(seed)
        areas = self.capsule_areas
        p, _, owner = self._sample_capsules(rng.multinomial(samples, areas / areas.sum()), rng)
        return float(areas.sum() * self._on_boundary(p, owner).mean())

    def _dense_samples(self) -> tuple[cKDTree, np.ndarray, np.ndarray]:
        if self._dense is None:
            points, normals = self.sample(_DENSE_SAMPLES, seed=12345)
            self._dense = (cKDTree(points), points, normals)
        return self._dense

    def distance(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unsigned distance (N,) of ``points`` (N, 3) to the surface, and the surface normal (N, 3) at the
        nearest surface point."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        closest = segment_closest(points, self.starts, self.ends)  # (N, K, 3)
        offset = points[:, None] - closest
        axis_distance = np.linalg.norm(offset, axis=-1)
        signed = axis_distance - self.radii[None]
        nearest = signed.argmin(-1)
        rows = np.arange(len(points))
        distance = signed[rows, nearest]
        normal = offset[rows, nearest] / np.maximum(axis_distance[rows, nearest], 1e-12)[:, None]
        inside = distance < 0
        if inside.any():
            distance = distance.copy()
            distance[inside], normal[inside] = self._inside_distance(points[inside], offset[inside], axis_distance[inside])
        return distance, normal

    def _inside_distance(self, points, offset, axis_distance) -> tuple[np.ndarray, np.ndarray]:
        """Distance from points inside the body to its boundary (see the module docstring).

        Candidates: the closest surface point of every capsule holding the point (any boundary point is at
        least that far from it, so where that point is on the boundary it is the nearest), and the nearest
        dense boundary sample."""
        point_index, capsule = np.nonzero(axis_distance < self.radii[None])
        direction = offset[point_index, capsule] / np.maximum(axis_distance[point_index, capsule], 1e-12)[:, None]
        projected = points[point_index] + (self.radii[capsule] - axis_distance[point_index, capsule])[:, None] * direction
        valid = self._on_boundary(projected, capsule)
        gap = np.where(valid, self.radii[capsule] - axis_distance[point_index, capsule], np.inf)
        distance = np.full(len(points), np.inf)
        np.minimum.at(distance, point_index, gap)
        normal = np.zeros((len(points), 3))
        best = gap == distance[point_index]
        normal[point_index[best]] = direction[best]
        tree, _, dense_normals = self._dense_samples()
        dense_distance, index = tree.query(points)
        use_dense = dense_distance < distance
        distance = np.where(use_dense, dense_distance, distance)
        normal = np.where(use_dense[:, None], dense_normals[index], normal)
        return distance, normal
