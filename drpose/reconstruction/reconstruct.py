"""Generated views -> a watertight, coloured mesh, and its accuracy against the true body.

    meshes = reconstruct(rgb, normal, rig, joints=joints)              # list of Reconstruction
    scores = reconstruct_and_score(rgb, normal, joints, rig)            # list of SampleScore

``rgb`` and ``normal`` are the body views in the model's output layout: (B, 6, 3, R, R) in [0, 1], the back
and left views mirrored as generated (the rig says which; they are flipped back here), normal maps in the
input camera's frame (``normal_frame="front"``, PSHuman's convention and the tiny world's) or each in its own
view's frame (``"view"``). The rig must be orthographic (PSHuman's six views).

Per sample: silhouettes (:mod:`.silhouette`), a soft visual hull on a voxel grid over the framed volume,
carving with the normal maps (:mod:`.volume`), marching cubes and clean-up, vertex colours from the RGB views
(:mod:`.mesh`). Geometry is built in the framing's normalised coordinates; with the body's framing (from
``joints``, or given) the mesh is returned in world metres, otherwise in half-extents about the frame's centre.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import multiprocessing
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import trimesh
from scipy import ndimage

from drpose.cameras import Framing
from drpose.models.rig import ViewRig

from .mesh import extract_mesh, render_mesh, to_world, vertex_colours
from .metrics import SURFACE_METRICS, psnr, ssim, surface_metrics
from .raster import rasterize
from .silhouette import soft_silhouettes
from .surface import CapsuleSurface
from .volume import CarvingSettings, ViewGeometry, body_grid, carve_with_depth, recover_depth, visual_hull

NORMAL_FRAMES = ("front", "view")
IMAGE_METRICS = ("psnr", "ssim", "psnr_normal")
METRICS = SURFACE_METRICS + IMAGE_METRICS


@dataclass
class ReconstructionSettings:
    """How a sample is reconstructed (see the module docstring)."""

    grid: int | None = None  # voxels a side of [-1, 1]^3; default 2 x the view resolution, at most 192
    normal_carving: bool = True
    carving: CarvingSettings = field(default_factory=CarvingSettings)
    smoothing: int = 6  # Taubin iterations
    min_blob: float = 0.02  # silhouette specks smaller than this share of the largest blob are dropped
    min_piece: float = 0.05  # mesh pieces with less than this share of the largest one's volume are dropped

    def grid_size(self, resolution: int) -> int:
        return self.grid if self.grid is not None else min(2 * resolution, 192)


@dataclass
class Reconstruction:
    """One sample's result: ``mesh`` (world metres with a framing, else normalised), ``normalised`` (the same
    mesh in the framing's normalised coordinates), the soft silhouettes (6, R, R) and the time taken."""

    mesh: trimesh.Trimesh
    normalised: trimesh.Trimesh
    silhouettes: np.ndarray
    seconds: float


@dataclass
class SampleScore:
    """One sample's metrics (``METRICS``, NaN where the reconstruction failed), its reconstruction (None on
    failure) and why it failed."""

    metrics: dict[str, float]
    reconstruction: Reconstruction | None
    error: str | None = None


def view_geometry(rig: ViewRig, size: int) -> ViewGeometry:
    if rig.cameras.projection != "orthographic":
        raise ValueError(f"rig: the reconstruction needs orthographic views (PSHuman's), this rig's projection is "
                         f"{rig.cameras.projection!r}")
    return ViewGeometry(rig.cameras.rotations(torch.float64).numpy(), size)


def camera_layout(images: torch.Tensor | np.ndarray, rig: ViewRig) -> np.ndarray:
    """Body views (B, 6, 3, R, R) as generated -> camera images (B, 6, R, R, 3) float64 (mirrored views flipped)."""
    images = torch.as_tensor(images)
    if images.dim() != 5 or images.shape[1] != rig.num_views or images.shape[2] != 3 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"views: expected body views of shape (B, {rig.num_views}, 3, R, R), got {tuple(images.shape)}")
    return rig.unmirror(images.detach().float().cpu()).permute(0, 1, 3, 4, 2).double().numpy()


def observed_normals(normal_maps: np.ndarray, geometry: ViewGeometry, normal_frame: str) -> np.ndarray:
    """Normal maps (V, R, R, 3) in [0, 1] -> unit normals (V, R, R, 3) in each view's own camera frame."""
    if normal_frame not in NORMAL_FRAMES:
        raise ValueError(f"normal_frame: expected one of {NORMAL_FRAMES}, got {normal_frame!r}")
    vectors = normal_maps * 2.0 - 1.0
    rotations = geometry.rotations
    if normal_frame == "front":  # input camera -> world -> view v
        to_view = rotations @ rotations[0].T
        vectors = np.einsum("vij,vhwj->vhwi", to_view, vectors)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-6)


def reconstruct_views(rgb: np.ndarray, normal_maps: np.ndarray, geometry: ViewGeometry, normal_frame: str = "front",
                      settings: ReconstructionSettings | None = None) -> tuple[trimesh.Trimesh, np.ndarray]:
    """One sample's camera images (6, R, R, 3) -> coloured mesh in normalised coordinates, soft silhouettes."""
    settings = settings or ReconstructionSettings()
    silhouettes, _ = soft_silhouettes(rgb, normal_maps, settings.min_blob)
    grid = body_grid(silhouettes, geometry, settings.grid_size(geometry.size))
    points = grid.points()
    values = visual_hull(silhouettes, geometry, points)
    if settings.normal_carving:
        hull = extract_mesh(values.reshape(grid.shape), grid, settings.min_piece, smoothing=0)
        observed = observed_normals(normal_maps, geometry, normal_frame)
        camera = geometry.to_camera(hull.vertices)
        camera_normals = np.einsum("vij,nj->vni", geometry.rotations, hull.vertex_normals)
        depths = []
        for view in range(len(rgb)):
            raster = rasterize(camera[view], hull.faces, geometry.size)
            hull_normal = raster.interpolate(camera_normals[view], hull.faces, (0.0, 0.0, 1.0))
            hull_normal /= np.maximum(np.linalg.norm(hull_normal, axis=-1, keepdims=True), 1e-12)
            mask = raster.mask & (silhouettes[view] >= 0.5)
            depths.append(recover_depth(observed[view], raster.depth, hull_normal, mask, geometry.pixel_size,
                                        settings.carving))
        carved = carve_with_depth(values, points, geometry, depths, geometry.pixel_size, settings.carving)
        values = keep_silhouettes(values, carved, grid, points, silhouettes, geometry, settings.min_piece)
    mesh = extract_mesh(values.reshape(grid.shape), grid, settings.min_piece, settings.smoothing)
    colours = vertex_colours(mesh, rgb, geometry)
    mesh.visual.vertex_colors = np.concatenate([np.rint(colours * 255), np.full((len(colours), 1), 255)], 1).astype(np.uint8)
    return mesh, silhouettes


def keep_silhouettes(hull: np.ndarray, carved: np.ndarray, grid, points: np.ndarray, silhouettes: np.ndarray,
                     geometry: ViewGeometry, min_piece: float, rounds: int = 2) -> np.ndarray:
    """Undo carving that a silhouette contradicts: the truth covers every silhouette, so where the carved shape
    no longer covers a silhouette pixel, the voxels carved along that pixel's ray go back to the hull's values."""
    values = carved
    camera = geometry.to_camera(points)
    pixels = [np.rint(geometry.pixels(camera[view])).astype(np.int64) for view in range(len(silhouettes))]
    size = geometry.size
    for _ in range(rounds):
        was_carved = values < hull - 1e-6
        if not was_carved.any() or values.max() < 0.5:
            break
        mesh = extract_mesh(values.reshape(grid.shape), grid, min_piece, smoothing=0)
        restore = np.zeros(len(points), dtype=bool)
        mesh_camera = geometry.to_camera(mesh.vertices)
        for view, silhouette in enumerate(silhouettes):
            covered = rasterize(mesh_camera[view], mesh.faces, size).mask
            lost = ndimage.binary_dilation((silhouette >= 0.5) & ~covered)
            x, y = pixels[view][:, 0], pixels[view][:, 1]
            inside = (x >= 0) & (x < size) & (y >= 0) & (y < size)
            hit = np.zeros(len(points), dtype=bool)
            hit[inside] = lost[y[inside], x[inside]]
            restore |= hit & was_carved
        if not restore.any():
            break
        values = np.where(restore, hull, values)
    return values


def _framings(rig: ViewRig, count: int, joints, framing: Framing | None) -> Framing | None:
    if framing is None and joints is not None:
        framing = rig.frame(torch.as_tensor(joints, dtype=torch.float64))
    if framing is not None and framing.centre.shape[0] != count:
        raise ValueError(f"framing: {framing.centre.shape[0]} bodies for {count} samples of views")
    return framing


def reconstruct(rgb, normal, rig: ViewRig, joints=None, framing: Framing | None = None, normal_frame: str | None = None,
                settings: ReconstructionSettings | None = None) -> list[Reconstruction]:
    """Meshes of B samples of body views in the model's layout (see the module docstring); ``joints``
    (B, 22, 3) or ``framing`` place them in world metres. ``normal_frame`` defaults to the rig's."""
    rgb_views, normal_views = camera_layout(rgb, rig), camera_layout(normal, rig)
    if rgb_views.shape != normal_views.shape:
        raise ValueError(f"rgb {rgb_views.shape} and normal {normal_views.shape} views differ in shape")
    geometry = view_geometry(rig, rgb_views.shape[2])
    frame = normal_frame or ("front" if rig.normals_in_input_frame else "view")
    framing = _framings(rig, len(rgb_views), joints, framing)
    out = []
    for index in range(len(rgb_views)):
        start = time.perf_counter()
        normalised, silhouettes = reconstruct_views(rgb_views[index], normal_views[index], geometry, frame, settings)
        mesh = normalised if framing is None else to_world(
            normalised, framing.centre[index].double().numpy(), float(framing.half_extent[index]))
        out.append(Reconstruction(mesh, normalised, silhouettes, time.perf_counter() - start))
    return out


def true_renders(joints, rig: ViewRig, size: int, framing: Framing | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Camera-layout true RGB and per-view normal renders (B, 6, R, R, 3) of bodies (B, 22, 3)."""
    from drpose.render import render_bodies

    joints = torch.as_tensor(joints, dtype=torch.float32)
    renders = render_bodies(joints, rig.cameras, size, framing=framing or rig.frame(joints))
    return (renders.rgb.permute(0, 1, 3, 4, 2).double().numpy(), renders.normal.permute(0, 1, 3, 4, 2).double().numpy())


def oracle_views(joints, rig: ViewRig, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The true renders of bodies in the model's output layout: RGB and normal body views (B, 6, 3, R, R), as a
    perfect model would generate them (the reconstruction's ceiling)."""
    from drpose.render import render_bodies

    joints = torch.as_tensor(joints, dtype=torch.float32)
    renders = render_bodies(joints, rig.cameras, size, framing=rig.frame(joints))
    views = rig.body_views(renders.rgb, renders.normal, renders.mask)  # (B, 2, 6, 3, R, R), normals first
    return views[:, 1], views[:, 0]


def image_metrics(reconstruction: Reconstruction, geometry: ViewGeometry, truth_rgb: np.ndarray,
                  truth_normal: np.ndarray) -> dict[str, float]:
    """PSNR / SSIM of the reconstruction's renders against the true camera renders (6, R, R, 3), view means."""
    rgb, normal, _ = render_mesh(reconstruction.normalised, geometry)
    views = range(len(rgb))
    return {"psnr": float(np.mean([psnr(rgb[v], truth_rgb[v]) for v in views])),
            "ssim": float(np.mean([ssim(rgb[v], truth_rgb[v]) for v in views])),
            "psnr_normal": float(np.mean([psnr(normal[v], truth_normal[v]) for v in views]))}


_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


WORKERS_VARIABLE = "DRPOSE_RECONSTRUCTION_WORKERS"


def default_workers() -> int:
    """The reconstruction pool's size: ``DRPOSE_RECONSTRUCTION_WORKERS`` when set, else the usable cores."""
    value = os.environ.get(WORKERS_VARIABLE)
    if value is None:
        return len(os.sched_getaffinity(0))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{WORKERS_VARIABLE}={value!r}: expected a whole number of processes >= 1")
    return int(value)


@contextlib.contextmanager
def reconstruction_pool(jobs: int, workers: int | None = None):
    """A pool of processes for ``jobs`` reconstructions (one per core, at most ``jobs``), or None where one
    process is all there is; pass it to :func:`reconstruct_and_score` (or ``score_batch``) as ``executor``:

        with reconstruction_pool(len(samples)) as pool:
            scores = reconstruct_and_score(rgb, normal, joints, rig, executor=pool)

    A reconstruction is mostly single-threaded NumPy/SciPy: each worker computes with one thread, set before
    its NumPy and torch start (OpenBLAS threads that spin while another process holds the core cost more than
    they give: measured 2x slower per body with two threads per worker).

    ``workers`` defaults to ``DRPOSE_RECONSTRUCTION_WORKERS`` when set (the test suite sets it to each test
    worker's share of the cores), else to the cores this process may run on."""
    workers = min(workers or default_workers(), jobs)
    if workers < 2:
        yield None
        return
    saved = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    os.environ.update({name: "1" for name in _THREAD_VARIABLES})  # inherited by the workers spawned in the block
    try:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            yield pool
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _score_sample(rgb, normal, rig: ViewRig, framing: Framing, normal_frame, settings, truth: CapsuleSurface,
                  num_samples: int, seed: int, geometry: ViewGeometry, truth_rgb: np.ndarray,
                  truth_normal: np.ndarray) -> SampleScore:
    """One sample of :func:`reconstruct_and_score` (a top-level function, so that a process pool can run it)."""
    try:
        [reconstruction] = reconstruct(rgb, normal, rig, framing=framing, normal_frame=normal_frame, settings=settings)
    except ValueError as error:
        return SampleScore({name: math.nan for name in METRICS}, None, str(error))
    metrics = surface_metrics(reconstruction.mesh, truth, num_samples, seed)
    metrics.update(image_metrics(reconstruction, geometry, truth_rgb, truth_normal))
    metrics["seconds"] = reconstruction.seconds
    return SampleScore(metrics, reconstruction)


def reconstruct_and_score(rgb, normal, joints, rig: ViewRig, normal_frame: str | None = None,
                          settings: ReconstructionSettings | None = None, truth: list[CapsuleSurface] | None = None,
                          num_samples: int = 10000, seed: int = 0,
                          executor: concurrent.futures.Executor | None = None) -> list[SampleScore]:
    """Reconstruct B samples of body views (model layout) of bodies with ``joints`` (B, 22, 3) and score each
    against its true surface (the capsule bodies of ``joints``, or ``truth``) and true renders; the samples run
    on ``executor`` when given (:func:`reconstruction_pool`), with the same results as in one process.

    A sample whose reconstruction fails (e.g. no body in the silhouettes) gets NaN metrics and its error."""
    joints = torch.as_tensor(joints, dtype=torch.float64)
    rgb, normal = torch.as_tensor(rgb), torch.as_tensor(normal)
    count = rgb.shape[0]
    if joints.dim() != 3 or joints.shape[0] != count:
        raise ValueError(f"joints: expected ({count}, 22, 3) for {count} samples of views, got {tuple(joints.shape)}")
    truth = truth if truth is not None else [CapsuleSurface.from_joints(j) for j in joints]
    size = rgb.shape[-1]
    geometry = view_geometry(rig, size)
    framing = rig.frame(joints)
    truth_rgb, truth_normal = true_renders(joints, rig, size, framing)
    jobs = [(rgb[i : i + 1], normal[i : i + 1], rig,
             Framing(framing.centre[i : i + 1], framing.half_extent[i : i + 1]), normal_frame, settings, truth[i],
             num_samples, seed, geometry, truth_rgb[i], truth_normal[i]) for i in range(count)]
    if executor is None:
        return [_score_sample(*job) for job in jobs]
    return [future.result() for future in [executor.submit(_score_sample, *job) for job in jobs]]
