"""Mesh accuracy against the true body surface, as the human-reconstruction papers report it.

Convention (every distance in centimetres):

* both surfaces are sampled uniformly by area: ``num_samples`` points on the reconstructed mesh
  (``trimesh.sample``) and as many on the true surface (:meth:`CapsuleSurface.sample`, exact);
* ``p2s`` (point-to-surface, accuracy): the mean distance from the reconstruction's samples to the true
  surface (exact, :meth:`CapsuleSurface.distance`);
* ``s2p`` (completeness): the mean distance from the true surface's samples to the reconstructed mesh
  (exact point-to-triangle distance);
* ``chamfer``: the mean of the two directions, ``(p2s + s2p) / 2``;
* ``normal_consistency``: the mean, over both directions, of the dot product of the unit normal at a sample
  with the other surface's normal at its nearest point (oriented: both surfaces are closed and face
  outwards; 1 is perfect, inverted faces count negative);
* ``fscore@1cm`` / ``fscore@2cm``: the harmonic mean of precision (share of reconstruction samples within
  the threshold of the truth) and recall (share of truth samples within it of the reconstruction).

Image metrics of the reconstruction's renders against the true renders (same rig, same resolution):
``psnr`` and ``ssim`` of the RGB renders and ``psnr_normal`` of the normal renders, averaged over views.
"""

from __future__ import annotations

import numpy as np
import trimesh
from scipy.spatial import cKDTree

from .surface import CapsuleSurface

FSCORE_THRESHOLDS_CM = (1.0, 2.0)
SURFACE_METRICS = ("chamfer", "p2s", "s2p", "normal_consistency", "fscore@1cm", "fscore@2cm")


def closest_on_mesh(mesh: trimesh.Trimesh, points: np.ndarray, candidates: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Exact distance (N,) from ``points`` to the mesh surface and the unit normal (N, 3) of the nearest triangle.

    Candidate triangles come from a k-d tree over triangle centroids; a point is settled once no triangle
    beyond its candidates can be nearer (the k-th centroid distance minus the largest centroid-to-corner
    distance exceeds the best distance found), otherwise it is retried with more candidates. Triangles much
    longer than the typical edge are first split (the surface is the same) so that bound stays tight.
    """
    vertices, faces = mesh.vertices, mesh.faces
    edges = np.linalg.norm(vertices[faces] - vertices[np.roll(faces, 1, 1)], axis=-1)
    typical = float(np.median(edges))
    if edges.max() > 4 * typical:
        vertices, faces = trimesh.remesh.subdivide_to_size(vertices, faces, max_edge=2 * typical)
    triangles = vertices[faces]
    normals = trimesh.triangles.normals(triangles)[0]
    centroids = triangles.mean(1)
    reach = np.linalg.norm(triangles - centroids[:, None], axis=-1).max()
    tree = cKDTree(centroids)
    points = np.asarray(points, dtype=np.float64)
    distance = np.full(len(points), np.inf)
    nearest = np.zeros(len(points), dtype=np.int64)
    todo = np.arange(len(points))
    k = min(candidates, len(triangles))
    while len(todo):
        unsettled = []
        for chunk in np.array_split(todo, max(1, len(todo) * k // 1_000_000)):
            centroid_distance, index = tree.query(points[chunk], k=k)
            centroid_distance, index = centroid_distance.reshape(len(chunk), k), index.reshape(len(chunk), k)
            queried = np.repeat(points[chunk], k, 0)
            closest = trimesh.triangles.closest_point(triangles[index.ravel()], queried)
            gaps = np.linalg.norm(closest - queried, axis=-1).reshape(len(chunk), k)
            best = gaps.argmin(-1)
            distance[chunk] = gaps[np.arange(len(chunk)), best]
            nearest[chunk] = index[np.arange(len(chunk)), best]
            if k < len(triangles):
                unsettled.append(chunk[centroid_distance[:, -1] - reach <= distance[chunk]])
        todo = np.concatenate(unsettled) if unsettled else np.arange(0)
        k = min(4 * k, len(triangles))
    return distance, normals[nearest]


def sample_mesh(mesh: trimesh.Trimesh, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` points uniform by area on the mesh, with the unit normals of their triangles."""
    points, face = trimesh.sample.sample_surface(mesh, count, seed=seed)
    return np.asarray(points), np.asarray(mesh.face_normals[face])


def surface_metrics(mesh: trimesh.Trimesh, truth: CapsuleSurface, num_samples: int = 10000, seed: int = 0,
                    unit_cm: float = 100.0) -> dict[str, float]:
    """The surface metrics (see the module docstring) of ``mesh`` against ``truth``; ``unit_cm`` is how many
    centimetres one unit of the coordinates is (100 for metres)."""
    if len(mesh.faces) == 0:
        raise ValueError("mesh: the reconstruction has no triangles")
    mesh_points, mesh_normals = sample_mesh(mesh, num_samples, seed)
    truth_points, truth_normals = truth.sample(num_samples, seed)
    to_truth, truth_normal_at = truth.distance(mesh_points)
    to_mesh, mesh_normal_at = closest_on_mesh(mesh, truth_points)
    to_truth, to_mesh = to_truth * unit_cm, to_mesh * unit_cm
    p2s, s2p = float(to_truth.mean()), float(to_mesh.mean())
    consistency = 0.5 * (np.einsum("nd,nd->n", mesh_normals, truth_normal_at).mean()
                         + np.einsum("nd,nd->n", truth_normals, mesh_normal_at).mean())
    metrics = {"chamfer": 0.5 * (p2s + s2p), "p2s": p2s, "s2p": s2p, "normal_consistency": float(consistency)}
    for threshold in FSCORE_THRESHOLDS_CM:
        precision, recall = float((to_truth < threshold).mean()), float((to_mesh < threshold).mean())
        fscore = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
        metrics[f"fscore@{threshold:g}cm"] = fscore
    return metrics


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB) of images in [0, 1]; inf when they are equal."""
    error = float(np.mean((np.asarray(image, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return float("inf") if error == 0 else float(10 * np.log10(1.0 / error))


def ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """Structural similarity of (R, R, 3) images in [0, 1] (scikit-image, 7x7 windows or smaller)."""
    from skimage.metrics import structural_similarity

    side = min(image.shape[0], image.shape[1])
    window = min(7, side if side % 2 else side - 1)
    return float(structural_similarity(np.asarray(image, np.float64), np.asarray(reference, np.float64),
                                       win_size=window, channel_axis=-1, data_range=1.0))
