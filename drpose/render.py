"""Vectorised ray-cast rendering of capsule bodies through the camera rig.

A body is 22 parts: one capsule per ``body22`` bone (a cylinder with hemispherical caps, radius per
bone, :data:`BONE_RADII`) and a head sphere (centre :data:`HEAD_OFFSET` metres beyond the head joint
along the neck -> head direction, radius :data:`HEAD_RADIUS`). Part ``k < 21`` is bone ``k`` of
:data:`~drpose.skeleton.BODY22_BONES`; part 21 is the head (:data:`PART_NAMES`). Every pixel casts
one ray through its centre (the rig's pixel convention) and takes the first surface it meets, so the
nearest part wins wherever parts overlap. No anti-aliasing: a pixel is either one part or background.

Outputs (:class:`Renders`), for B bodies, V views and resolution R:

- ``rgb`` (B, V, 3, R, R) in [0, 1]: the part's colour times a shade
  ``0.35 + 0.65 * max(0, n . l)`` with ``n`` the camera-space surface normal and the light ``l``
  from the camera's upper left; background white (1, 1, 1).
- ``normal`` (B, V, 3, R, R) in [0, 1]: the camera-space normal (x right, y up, z towards the
  camera) mapped by ``(n + 1) / 2``; background black (0, 0, 0), which no unit normal maps to.
- ``mask`` (B, V, 1, R, R): 1 on the body, 0 on the background.
- ``part_id`` (B, V, R, R) long: the visible part, -1 on the background.

Palette (:data:`PART_COLOURS`): fully saturated colours (HSV value 1, saturation 1) at 22 hues spaced
360/22 degrees apart, assigned so that parts that touch (share a joint) or mirror each other (left vs
right) are at least 5 hue steps (82 degrees) apart. Shading scales all three channels alike, so the
hue of a pixel identifies its part.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import torch

from drpose.cameras import CameraRig, Framing
from drpose.skeleton import BODY22_BONES, BODY22_NAMES, NUM_BODY_JOINTS

PART_NAMES: tuple[str, ...] = tuple(
    f"{BODY22_NAMES[parent]}->{BODY22_NAMES[child]}" for parent, child in BODY22_BONES
) + ("head",)
NUM_PARTS = len(PART_NAMES)

# Capsule radius (metres) of each bone, keyed by the bone's child joint (right mirrors left).
_RADIUS_BY_CHILD = {
    "hip": 0.085, "spine1": 0.120, "knee": 0.075, "spine2": 0.120, "ankle": 0.055,
    "spine3": 0.125, "foot": 0.045, "neck": 0.105, "collar": 0.080, "head": 0.055,
    "shoulder": 0.065, "elbow": 0.050, "wrist": 0.040,
}
BONE_RADII: tuple[float, ...] = tuple(
    _RADIUS_BY_CHILD[BODY22_NAMES[child].removeprefix("left_").removeprefix("right_")]
    for _, child in BODY22_BONES
)
HEAD_RADIUS = 0.105
HEAD_OFFSET = 0.07

# Hue slot (of 22, i.e. hue = slot * 360 / 22 degrees) of each part, in PART_NAMES order.
PART_HUE_SLOTS: tuple[int, ...] = (
    17, 10, 2, 6, 19, 14, 16, 5, 1, 9, 20, 7, 12, 18, 21, 4, 11, 13, 0, 3, 15, 8,
)
PART_COLOURS: torch.Tensor = torch.tensor(
    [colorsys.hsv_to_rgb(slot / NUM_PARTS, 1.0, 1.0) for slot in PART_HUE_SLOTS], dtype=torch.float32
)
"""(22, 3) RGB in [0, 1] of each part, in :data:`PART_NAMES` order."""

RGB_BACKGROUND = (1.0, 1.0, 1.0)
NORMAL_BACKGROUND = (0.0, 0.0, 0.0)
_LIGHT = torch.tensor([-0.4, 0.6, 1.0]) / torch.tensor([-0.4, 0.6, 1.0]).norm()
_AMBIENT = 0.35


@dataclass
class Renders:
    """Per-view renders of a batch of bodies (see the module docstring for each field)."""

    rgb: torch.Tensor
    normal: torch.Tensor
    mask: torch.Tensor
    part_id: torch.Tensor


def body_capsules(joints3d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Capsule geometry of bodies (B, 22, 3): starts (B, 22, 3), ends (B, 22, 3), radii (22,) metres.

    Part ``k < 21`` runs from the parent to the child joint of bone ``k``; part 21, the head, is a
    sphere (start == end).
    """
    if joints3d.ndim != 3 or joints3d.shape[1:] != (NUM_BODY_JOINTS, 3):
        raise ValueError(f"joints3d: expected body22 joints of shape (B, 22, 3), got {tuple(joints3d.shape)}")
    parents = torch.tensor([p for p, _ in BODY22_BONES], device=joints3d.device)
    children = torch.tensor([c for _, c in BODY22_BONES], device=joints3d.device)
    head = joints3d[:, BODY22_NAMES.index("head")]
    neck_to_head = head - joints3d[:, BODY22_NAMES.index("neck")]
    head_centre = head + HEAD_OFFSET * neck_to_head / neck_to_head.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    starts = torch.cat([joints3d[:, parents], head_centre[:, None]], 1)
    ends = torch.cat([joints3d[:, children], head_centre[:, None]], 1)
    radii = torch.tensor(BONE_RADII + (HEAD_RADIUS,), dtype=joints3d.dtype, device=joints3d.device)
    return starts, ends, radii


def _first_hits(starts, ends, radii, origins, directions, near):
    """Ray parameter of the first hit of each ray with each capsule, +inf where it misses.

    ``starts``/``ends`` (b, V, K, 3), ``radii`` (b, 1, K, 1) in normalised camera coordinates;
    ``origins`` (P, 3) with ``origin . direction = 0`` (see ``CameraRig.pixel_rays``); unit
    ``directions`` (P, 3), or (1, 3) when all rays are parallel, which keeps every term that
    depends only on the direction per capsule instead of per pixel; ``near`` (P,) or (1,), the
    smallest admissible ray parameter. Returns (b, V, K, P). Dot products with the rays go through
    matmuls, so no (b, V, K, P, 3) tensor is formed.
    """
    axis = ends - starts
    axis_sq = (axis * axis).sum(-1, keepdim=True)
    radius_sq = radii * radii
    origin_sq = (origins * origins).sum(-1)
    axis_dir = axis @ directions.T  # d . axis
    start_dir = -(starts @ directions.T)  # d . (o - start), as d . o = 0
    end_dir = -(ends @ directions.T)
    # axis . (o - start), |o - start|^2 and |o - end|^2, built in place: these are (b, V, K, P).
    axis_origin = (axis @ origins.T).sub_((axis * starts).sum(-1, keepdim=True))
    start_dist_sq = (starts @ origins.T).mul_(-2).add_(origin_sq).add_((starts * starts).sum(-1, keepdim=True))
    end_dist_sq = (ends @ origins.T).mul_(-2).add_(origin_sq).add_((ends * ends).sum(-1, keepdim=True))

    # Side of the cylinder: a t^2 + 2 b t + c = 0, keeping hits between the two ends.
    a = axis_sq - axis_dir * axis_dir
    b = (axis_origin * axis_dir).neg_().add_(axis_sq * start_dir)
    c = (start_dist_sq - radius_sq).mul_(axis_sq).addcmul_(axis_origin, axis_origin, value=-1)
    discriminant = (b * b).addcmul_(a, c, value=-1)
    not_parallel = a > 1e-7 * axis_sq
    side_ok = (discriminant >= 0) & not_parallel
    hits = discriminant.clamp_min_(0).sqrt_().add_(b).neg_().div_(torch.where(not_parallel, a, 1.0))
    along = axis_origin.addcmul_(hits, axis_dir)  # axis . (hit - start)
    side_ok &= (along >= 0) & (along <= axis_sq)
    hits.masked_fill_(~side_ok, torch.inf)

    # The two end spheres: t^2 + 2 (d . (o - centre)) t + |o - centre|^2 - r^2 = 0.
    for centre_dir, centre_dist_sq in ((start_dir, start_dist_sq), (end_dir, end_dist_sq)):
        sphere_disc = centre_dist_sq.sub_(radius_sq).neg_().addcmul_(centre_dir, centre_dir)
        sphere_ok = sphere_disc >= 0
        t_sphere = sphere_disc.clamp_min_(0).sqrt_().add_(centre_dir).neg_()
        torch.minimum(hits, t_sphere.masked_fill_(~sphere_ok, torch.inf), out=hits)
    return hits.masked_fill_(hits <= near, torch.inf)


def _render_chunk(starts, ends, radii, origins, directions, near, shared_direction: bool):
    """Per-pixel outputs (b, V, P, ...) of capsules given in normalised camera coordinates."""
    hits = _first_hits(starts, ends, radii, origins,
                       directions[:1] if shared_direction else directions,
                       near[:1] if shared_direction else near)
    t, part = hits.min(2)  # nearest surface along each ray: (b, V, P)
    hit = torch.isfinite(t)

    # Normal: from the closest point of the winning part's axis to the hit point.
    start = torch.take_along_dim(starts, part[..., None], 2)
    axis = torch.take_along_dim(ends - starts, part[..., None], 2)
    point = origins + torch.where(hit, t, 0.0)[..., None] * directions
    along = ((point - start) * axis).sum(-1) / (axis * axis).sum(-1).clamp_min(1e-12)
    normal = torch.nn.functional.normalize(point - start - along.clamp(0, 1)[..., None] * axis, dim=-1)
    shade = _AMBIENT + (1 - _AMBIENT) * (normal @ _LIGHT.to(normal.device)).clamp_min(0)

    on_body = hit[..., None]
    colour = PART_COLOURS.to(normal.device)[part] * shade[..., None]
    rgb = torch.where(on_body, colour, torch.tensor(RGB_BACKGROUND, device=normal.device))
    normal_map = torch.where(on_body, (normal + 1) / 2, torch.tensor(NORMAL_BACKGROUND, device=normal.device))
    return rgb, normal_map, hit, torch.where(hit, part, -1)


def render_bodies(joints3d: torch.Tensor, rig: CameraRig | None = None, resolution: int = 64,
                  framing: Framing | None = None, chunk_size: int = 4) -> Renders:
    """Render bodies (B, 22, 3) in every view of ``rig`` at ``resolution`` x ``resolution``.

    ``framing`` defaults to ``rig.frame(joints3d)``, so joints projected with the same rig land on
    the rendered body. ``chunk_size`` bodies are ray-cast at a time to bound memory (about
    ``chunk_size * V * 22 * resolution^2 * 4`` bytes per intermediate).
    """
    rig = CameraRig() if rig is None else rig
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    starts, ends, radii = body_capsules(joints3d.float())
    if joints3d.shape[0] == 0:
        raise ValueError("joints3d: expected at least one body, got an empty batch")
    framing = rig.frame(joints3d) if framing is None else framing
    origins, directions, near = rig.pixel_rays(resolution, torch.float32, joints3d.device)
    outputs = []
    for first in range(0, joints3d.shape[0], chunk_size):
        chunk = slice(first, first + chunk_size)
        chunk_framing = Framing(framing.centre[chunk].float(), framing.half_extent[chunk].float())
        outputs.append(_render_chunk(
            rig.to_camera(starts[chunk], chunk_framing), rig.to_camera(ends[chunk], chunk_framing),
            radii[None, None, :, None] / chunk_framing.half_extent[:, None, None, None],
            origins, directions, near, shared_direction=rig.projection == "orthographic",
        ))
    rgb, normal_map, hit, part_id = (torch.cat(parts, 0) for parts in zip(*outputs))

    def image(values):  # (B, V, P, C) -> (B, V, C, R, R)
        return values.reshape(*values.shape[:2], resolution, resolution, -1).permute(0, 1, 4, 2, 3).contiguous()

    return Renders(
        rgb=image(rgb).clamp(0, 1),
        normal=image(normal_map).clamp(0, 1),
        mask=image(hit[..., None].float()),
        part_id=part_id.reshape(*part_id.shape[:2], resolution, resolution),
    )
