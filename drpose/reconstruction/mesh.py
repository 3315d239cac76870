"""From occupancy to a coloured, watertight mesh; renders of it through the rig; export and preview.

* :func:`extract_mesh`: marching cubes (scikit-image, Lewiner) at the 0.5 level of a zero-padded grid, so the
  surface is closed; trimesh merges vertices, keeps the pieces with at least ``min_piece`` of the largest
  piece's volume, smooths with Taubin's filter (no shrinking) and orients the faces outwards.
* :func:`vertex_colours`: each vertex takes the colour of the views that see it (depth test against the
  mesh's own raster at twice the view resolution), weighted by how squarely they see it (cosine squared);
  vertices no view sees take their nearest seen neighbour's colour.
* :func:`render_mesh`: RGB (vertex colours, white background) and camera-frame normal maps (``(n + 1) / 2``,
  black background) in the views of the rig, as :func:`drpose.render.render_bodies` renders the true bodies.
* :func:`turntable`: a preview PNG of meshes turning around the vertical axis (matplotlib).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh
from scipy.spatial import cKDTree

from .raster import rasterize
from .volume import Grid, ViewGeometry, sample_image


def extract_mesh(values: np.ndarray, grid: Grid, min_piece: float = 0.05, smoothing: int = 6) -> trimesh.Trimesh:
    """Mesh (normalised coordinates) of the 0.5 level of occupancy ``values`` (grid.shape) over ``grid``."""
    from skimage.measure import marching_cubes

    if values.max() < 0.5:
        raise ValueError("occupancy: no voxel is inside the body (the silhouettes do not intersect)")
    padded = np.pad(values, 1)
    voxel = grid.voxel
    vertices, faces, _, _ = marching_cubes(padded, 0.5, spacing=(voxel, voxel, voxel), allow_degenerate=False)
    vertices = vertices - voxel + grid.origin[None]  # padded index 1 is voxel 0's centre
    mesh = trimesh.Trimesh(vertices, faces, process=True)
    pieces = mesh.split(only_watertight=False)
    if len(pieces) > 1:
        volumes = np.nan_to_num(np.array([abs(p.volume) for p in pieces]))
        mesh = trimesh.util.concatenate([p for p, v in zip(pieces, volumes) if v >= min_piece * volumes.max()])
    if smoothing:
        trimesh.smoothing.filter_taubin(mesh, iterations=smoothing)
    mesh.fix_normals()
    if mesh.volume < 0:
        mesh.invert()
    return mesh


def to_world(mesh: trimesh.Trimesh, centre: np.ndarray, half_extent: float) -> trimesh.Trimesh:
    """A copy of a normalised-coordinates mesh in world units (metres)."""
    out = mesh.copy()
    out.vertices = out.vertices * half_extent + np.asarray(centre)[None]
    return out


def visibility(camera_vertices: np.ndarray, faces: np.ndarray, size: int, tolerance_px: float = 1.0) -> np.ndarray:
    """Which vertices (V,) are not hidden by the mesh itself in one view (camera coordinates)."""
    raster = rasterize(camera_vertices, faces, 2 * size)
    pixels = np.rint(np.stack([(camera_vertices[:, 0] + 1) * size - 0.5, (1 - camera_vertices[:, 1]) * size - 0.5], -1))
    pixels = np.clip(pixels, 0, 2 * size - 1).astype(np.int64)
    front = raster.depth[pixels[:, 1], pixels[:, 0]]
    return camera_vertices[:, 2] >= front - tolerance_px * 2.0 / size


def vertex_colours(mesh: trimesh.Trimesh, rgb: np.ndarray, geometry: ViewGeometry) -> np.ndarray:
    """Per-vertex RGB (V, 3) in [0, 1] of a normalised-coordinates mesh from camera images (V_views, R, R, 3)."""
    vertices, normals = mesh.vertices, mesh.vertex_normals
    camera = geometry.to_camera(vertices)
    facing = np.einsum("vij,nj->vni", geometry.rotations, normals)[..., 2]  # cosine to each view direction
    total = np.zeros((len(vertices), 3))
    weight_sum = np.zeros(len(vertices))
    for view in range(len(rgb)):
        weight = np.clip(facing[view], 0, None) ** 2 * visibility(camera[view], mesh.faces, geometry.size)
        total += weight[:, None] * sample_image(rgb[view], geometry.pixels(camera[view]), outside=1.0)
        weight_sum += weight
    seen = weight_sum > 1e-6
    colours = np.ones((len(vertices), 3))
    colours[seen] = total[seen] / weight_sum[seen, None]
    if seen.any() and not seen.all():
        _, nearest = cKDTree(vertices[seen]).query(vertices[~seen])
        colours[~seen] = colours[seen][nearest]
    return np.clip(colours, 0.0, 1.0)


def render_mesh(mesh: trimesh.Trimesh, geometry: ViewGeometry, colours: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB (V, R, R, 3), camera-frame normal maps (V, R, R, 3) and masks (V, R, R) of a normalised-coordinates
    mesh in every view; ``colours`` (vertices, 3) default to the mesh's vertex colours."""
    if colours is None:
        colours = mesh.visual.vertex_colors[:, :3] / 255.0
    camera = geometry.to_camera(mesh.vertices)
    camera_normals = np.einsum("vij,nj->vni", geometry.rotations, mesh.vertex_normals)
    rgbs, normal_maps, masks = [], [], []
    for view in range(len(geometry.rotations)):
        raster = rasterize(camera[view], mesh.faces, geometry.size)
        rgbs.append(raster.interpolate(colours, mesh.faces, (1.0, 1.0, 1.0)))
        normal = raster.interpolate(camera_normals[view], mesh.faces, (0.0, 0.0, 0.0))
        length = np.linalg.norm(normal, axis=-1, keepdims=True)
        normal = np.where(raster.mask[..., None], (normal / np.maximum(length, 1e-12) + 1) / 2, 0.0)
        normal_maps.append(normal)
        masks.append(raster.mask)
    return np.stack(rgbs), np.stack(normal_maps), np.stack(masks)


def export_mesh(mesh: trimesh.Trimesh, path: str | Path) -> Path:
    """Write ``mesh`` (with its vertex colours) as .ply or .obj, by the file's suffix."""
    path = Path(path)
    if path.suffix.lower() not in (".ply", ".obj"):
        raise ValueError(f"mesh file {path}: expected a .ply or .obj name")
    path.parent.mkdir(parents=True, exist_ok=True)
    mesh.export(path)
    return path


def turntable_images(mesh: trimesh.Trimesh, size: int = 160, angles: int = 6) -> np.ndarray:
    """Shaded renders (angles, size, size, 3) of a mesh turning around the vertical axis, each framed on the
    mesh's bounding sphere (vertex colours times a headlight shade)."""
    from drpose.cameras import CameraRig

    rotations = CameraRig(azimuths_deg=tuple(360.0 * i / angles for i in range(angles))).rotations().numpy()
    centre = mesh.bounding_box.centroid
    scale = 1.05 * np.linalg.norm(mesh.vertices - centre, axis=-1).max()
    normalised = (mesh.vertices - centre) / scale
    colours = mesh.visual.vertex_colors[:, :3] / 255.0
    images = []
    for rotation in rotations:
        camera = normalised @ rotation.T
        raster = rasterize(camera, mesh.faces, size)
        normal = raster.interpolate(mesh.vertex_normals @ rotation.T, mesh.faces, (0.0, 0.0, 1.0))
        shade = 0.4 + 0.6 * np.clip(normal[..., 2] / np.maximum(np.linalg.norm(normal, axis=-1), 1e-12), 0, 1)
        colour = raster.interpolate(colours, mesh.faces, (1.0, 1.0, 1.0))
        images.append(np.where(raster.mask[..., None], colour * shade[..., None], 1.0))
    return np.stack(images)


def turntable(meshes: dict[str, trimesh.Trimesh], path: str | Path, angles: int = 6, size: int = 160,
              title: str = "") -> Path:
    """A PNG with one row per named mesh, turning around the vertical axis (``angles`` views)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from drpose.evaluation.figures import save_figure

    figure, axes = plt.subplots(len(meshes), angles, figsize=(1.3 * angles, 1.5 * len(meshes)), squeeze=False)
    for row, (name, mesh) in enumerate(meshes.items()):
        for column, image in enumerate(turntable_images(mesh, size, angles)):
            axis = axes[row][column]
            axis.imshow(image, interpolation="bilinear")
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                axis.set_ylabel(name, fontsize=7)
    return save_figure(figure, path, title)
