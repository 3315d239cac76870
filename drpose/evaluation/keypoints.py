"""Body22 keypoints read analytically from colour-coded multi-view RGB images of capsule bodies.

The evaluator must measure the pose in *generated* images with an estimator that shares nothing with
the reward model (a learned latent keypoint net), or the reward could be gamed. The tiny world draws
every body part in its own hue (:mod:`drpose.render`), so the parts, and from them the joints, can
be read from the pixels. :func:`estimate_keypoints` works in five steps:

1. Parts (:func:`part_map`): each pixel's part from its hue (the nearest of 22 hue slots), with
   blends of two parts' colours along blurred boundaries resolved towards the neighbouring parts;
   per part, stray pieces far from its main piece are dropped (a blur can shift a piece of one part
   into the hue of another).
2. Readings, per view: a bone (capsule from its parent to its child joint) ends one radius inside
   the extremes of its pixels along their principal axis; which end is the parent is decided by
   which lies nearer the parts that touch the bone at its parent joint. Where the only two bones at
   a joint touch in the image, the midpoint of their common boundary reads that joint too, and the
   head sphere's centre is read as a 23rd point. Every reading has a weight in [0, 1]: how much of
   the part is visible, whether its pixels spread like a capsule's, whether a thicker capsule at the
   joint hides the end.
3. Triangulation through the rig, robust: readings far from the consensus lose weight (iteratively
   reweighted least squares), so do readings beyond their bone's reach from the parent joint (a
   part that took another's hue), and joints whose reprojection falls off the body's silhouette in
   some view are pulled back onto it. Joints too few views see borrow the missing depth from their
   neighbours in the kinematic tree, so every joint gets a finite estimate. The head joint follows
   from the head sphere's centre (:data:`~drpose.render.HEAD_OFFSET` towards the neck); the pelvis
   and the collars, which no view shows, sit at the rest skeleton's offsets in the frames of the
   hips and the chest.
4. Refinement by re-rendering (``refinement_steps``): readings are biased where capsules overlap (a
   thin bone's end hidden in a thicker one's cap, a short part seen as a blob), and the bias
   depends on the 3D configuration, which the first estimate gets right to a few centimetres. So
   the body is rendered at that estimate, read the same way, and every observed reading is
   corrected by the render's reading minus the estimate's true projection; then step 3 again.
5. ``points2d``: a view's own estimate where the view sees the joint and agrees with the
   triangulation (within ``consistency_px``), else the triangulated joint's reprojection. Where
   generated views contradict each other, the minority's ``points2d`` thus follows the majority;
   ``raw2d`` with ``raw_confidence`` keeps what each view shows, and ``confidence`` falls with the
   disagreement.

What it assumes about the body: the renderer's palette, capsule radii and head offset, and the
rest skeleton (:data:`~drpose.skeleton.REST_JOINTS`) for generous bounds on how long a part can
look and for the pelvis and collar offsets. Bodies of other proportions (SMPL-X shapes) shift those
offsets by about a centimetre.

Conventions: pixel ``(row i, col j)`` has its centre at ``(x, y) = (j, i)`` (the rig's); a capsule
of radius ``r`` metres is ``r / framing.half_extent * R / 2`` pixels wide on each side of its axis
(exact for orthographic rigs; at the framing centre's depth for perspective ones). Per-view arrays
are indexed ``[b, v, joint]`` in :data:`~drpose.skeleton.BODY22_NAMES` order. Images are expected at
a resolution where limbs are a few pixels wide (64 and up; at 32 the forearms are one pixel wide
and accuracy drops).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from drpose.cameras import CameraRig, Framing
from drpose.render import BONE_RADII, HEAD_OFFSET, HEAD_RADIUS, NUM_PARTS, PART_HUE_SLOTS, render_bodies
from drpose.skeleton import BODY22_BONES, BODY22_NAMES, BODY22_PARENTS, NUM_BODY_JOINTS, REST_JOINTS

NUM_BONES = NUM_PARTS - 1
HEAD_PART = NUM_PARTS - 1
HEAD_JOINT = BODY22_NAMES.index("head")
NECK_JOINT = BODY22_NAMES.index("neck")
HEAD_CENTRE = NUM_BODY_JOINTS  # the head sphere's centre: triangulated as a 23rd point
NUM_POINTS = NUM_BODY_JOINTS + 1

# Radii (metres) of the 22 parts, and how far apart two pieces of one part can lie: the rest bone
# length with a fifth to spare plus a radius at each end (a sphere's diameter for the head).
PART_RADII: tuple[float, ...] = BONE_RADII + (HEAD_RADIUS,)
PART_REACH: tuple[float, ...] = tuple(
    1.2 * float((REST_JOINTS[child] - REST_JOINTS[parent]).norm()) + 2 * radius
    for (parent, child), radius in zip(BODY22_BONES, BONE_RADII)
) + (2 * HEAD_RADIUS,)
# A bone's end hides inside the cap of a thicker capsule at the same joint: the weight of its
# reading falls by a factor e for every COVER_SCALE metres that the thickest capsule seen there is
# wider than the bone.
COVER_SCALE = 0.015
# Touching pixel pairs at which a junction reading gets its full weight.
JUNCTION_FULL_COUNT = 4.0
# Weight of the silhouette pixel that pulls a joint reprojected off the body back onto it.
SILHOUETTE_WEIGHT = 0.5

_PART_OF_SLOT = torch.empty(NUM_PARTS, dtype=torch.long)
_PART_OF_SLOT[torch.tensor(PART_HUE_SLOTS)] = torch.arange(NUM_PARTS)
_BONE_END_JOINTS = torch.tensor(BODY22_BONES)  # (21, 2): parent and child joint of each bone


def _neighbours_at_ends() -> torch.Tensor:
    """(21, 2, 22): 1 where part m touches bone k at k's parent (0) or child (1) joint."""
    touching = torch.zeros(NUM_BONES, 2, NUM_PARTS)
    for k, joints in enumerate(BODY22_BONES):
        for end, joint in enumerate(joints):
            for m, other in enumerate(BODY22_BONES):
                if m != k and joint in other:
                    touching[k, end, m] = 1.0
            if joint == HEAD_JOINT:
                touching[k, end, HEAD_PART] = 1.0
    return touching


def _two_bone_junctions() -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of bones (Q, 2) that are the only two at a joint, and that joint (Q,).

    Where exactly two capsules meet, the line along which they touch in the image passes near the
    joint; where more meet (pelvis, spine3), it mostly does not.
    """
    pairs, joints = [], []
    for joint in range(NUM_BODY_JOINTS):
        bones = [k for k, ends in enumerate(BODY22_BONES) if joint in ends]
        if len(bones) == 2:
            pairs.append(bones)
            joints.append(joint)
    return torch.tensor(pairs), torch.tensor(joints)


_NEIGHBOURS = _neighbours_at_ends()
_JUNCTION_PAIRS, _JUNCTION_JOINTS = _two_bone_junctions()
_JUNCTION_OF_PARTS = torch.full((NUM_PARTS + 1, NUM_PARTS + 1), -1, dtype=torch.long)  # last: none
_JUNCTION_OF_PARTS[_JUNCTION_PAIRS[:, 0], _JUNCTION_PAIRS[:, 1]] = torch.arange(len(_JUNCTION_PAIRS))
_JUNCTION_OF_PARTS[_JUNCTION_PAIRS[:, 1], _JUNCTION_PAIRS[:, 0]] = torch.arange(len(_JUNCTION_PAIRS))

# The point each reading observes: bone ends (parent, child; bone by bone), the head centre, the
# junctions. Points are the 22 joints, then the head centre.
_READING_POINTS = torch.cat([_BONE_END_JOINTS.reshape(-1), torch.tensor([HEAD_CENTRE]), _JUNCTION_JOINTS])

# Kinematic tree over the 23 points (the head centre hangs off the head joint). A reading farther
# from its point's parent than the bone reaches (half as long again as at rest, plus 5 cm) belongs
# to some other part that took this part's hue.
_POINT_PARENTS = BODY22_PARENTS + (HEAD_JOINT,)
_POINT_ADJACENCY = torch.zeros(NUM_POINTS, NUM_POINTS)
_TREE_EDGES = torch.tensor([(child, parent) for child, parent in enumerate(_POINT_PARENTS) if parent >= 0])
_POINT_ADJACENCY[_TREE_EDGES[:, 0], _TREE_EDGES[:, 1]] = 1.0
_POINT_ADJACENCY[_TREE_EDGES[:, 1], _TREE_EDGES[:, 0]] = 1.0
_POINT_TETHER = torch.tensor([
    1.5 * float((REST_JOINTS[child] - REST_JOINTS[parent]).norm()) + 0.05 if parent >= 0 else torch.inf
    for child, parent in enumerate(BODY22_PARENTS)
] + [HEAD_OFFSET + 0.05])
_READING_PARENTS = torch.tensor([max(parent, 0) for parent in _POINT_PARENTS])[_READING_POINTS]
_READING_TETHER = _POINT_TETHER[_READING_POINTS]


@dataclass
class KeypointEstimate:
    """Keypoints of B bodies seen in V views at image side R.

    - ``points2d`` (B, V, 22, 2): pixels (x, y) per view; the view's own estimate where it sees the
      joint and agrees with the triangulation, else the triangulated joint's reprojection.
    - ``confidence`` (B, V, 22) in [0, 1]: how well the view sees the joint times how well it agrees
      with the triangulation; 0 where the view does not see the joint.
    - ``joints3d`` (B, 22, 3): world metres, triangulated from all views; always finite.
    - ``raw2d`` (B, V, 22, 2): each view's own estimate before the consistency step: its readings
      of the joint, each weighted by how well it agrees with the triangulation (with refinement,
      corrected for the readings' bias); NaN where the view does not see the joint.
    - ``raw_confidence`` (B, V, 22) in [0, 1]: how well each view sees each joint.
    - ``reprojected2d`` (B, V, 22, 2): ``joints3d`` projected into every view.
    - ``part_pixels`` (B, V, 22): visible pixels of each part (order of
      :data:`~drpose.render.PART_NAMES`), after stray pieces are dropped.
    """

    points2d: torch.Tensor
    confidence: torch.Tensor
    joints3d: torch.Tensor
    raw2d: torch.Tensor
    raw_confidence: torch.Tensor
    reprojected2d: torch.Tensor
    part_pixels: torch.Tensor


# --------------------------------------------------------------------------------------- parts


def part_map(rgb: torch.Tensor, hue_tolerance: float = 0.35, min_coverage: float = 0.5,
             min_chroma: float = 0.1, min_support: int = 3, grow_tolerance: float = 3.0,
             grow_steps: int = 2) -> torch.Tensor:
    """Part index per pixel (..., R, R) long of RGB images (..., 3, R, R) in [0, 1]; -1 for none.

    A part's colour is a fully saturated hue (one channel 0) times a shade, on a white background,
    so a pixel that blends a fraction ``a`` of part colour with white has its smallest channel at
    ``1 - a`` whatever the shade. Pixels count as body where that coverage is at least
    ``min_coverage`` (the 50 % contour of a blurred silhouette) and the chroma (largest minus
    smallest channel) is at least ``min_chroma``, so that their hue means something.

    Seeds: a body pixel takes the part whose hue slot (1 slot = 360/22 degrees) is nearest to its
    hue, if within ``hue_tolerance`` slots; a seed that fewer than ``min_support`` of its 8
    neighbours share is dropped, as blends of two parts' colours along blurred boundaries pass
    through other parts' hues in thin lines. Growth (``grow_steps`` rounds): a body pixel left
    without a part (a blend of two parts, colour noise on a dark pixel) joins the neighbouring part
    nearest to it in hue, if within ``grow_tolerance`` slots.
    """
    if not isinstance(rgb, torch.Tensor) or rgb.ndim < 3 or rgb.shape[-3] != 3:
        shape = tuple(rgb.shape) if isinstance(rgb, torch.Tensor) else type(rgb).__name__
        raise ValueError(f"rgb: expected RGB images of shape (..., 3, R, R), got {shape}")
    if not rgb.is_floating_point():
        raise TypeError(f"rgb: expected floating-point values in [0, 1], got {rgb.dtype}")
    rgb = rgb.float()
    red, green, blue = rgb.unbind(-3)
    value, smallest = rgb.amax(-3), rgb.amin(-3)
    chroma = value - smallest
    safe_chroma = chroma.clamp_min(1e-6)
    hue_sixths = torch.where(  # hue in [0, 6): red 0, green 2, blue 4
        value == red, ((green - blue) / safe_chroma) % 6,
        torch.where(value == green, (blue - red) / safe_chroma + 2, (red - green) / safe_chroma + 4),
    )
    slot = hue_sixths * (NUM_PARTS / 6)
    nearest = slot.round()
    body = (smallest <= 1 - min_coverage) & (chroma >= min_chroma)
    labels = torch.where(body & ((slot - nearest).abs() <= hue_tolerance),
                         _PART_OF_SLOT.to(rgb.device)[nearest.long() % NUM_PARTS], -1)
    if min_support > 0:
        labels = torch.where(_same_label_neighbours(labels) >= min_support, labels, -1)
    part_slots = torch.tensor(PART_HUE_SLOTS, dtype=torch.float32, device=rgb.device)
    for _ in range(grow_steps):
        best_gap = torch.full_like(slot, torch.inf)
        best_part = torch.full_like(labels, -1)
        for neighbour in _neighbour_views(labels):
            gap = (slot - part_slots[neighbour.clamp_min(0)]).abs()
            gap = torch.minimum(gap, NUM_PARTS - gap)
            better = (neighbour >= 0) & (gap < best_gap)
            best_gap = torch.where(better, gap, best_gap)
            best_part = torch.where(better, neighbour, best_part)
        labels = torch.where((labels < 0) & body & (best_gap <= grow_tolerance), best_part, labels)
    return labels


def _neighbour_views(values: torch.Tensor) -> list[torch.Tensor]:
    """Each pixel's 8 neighbours' values (-1 beyond the border), one tensor per direction."""
    height, width = values.shape[-2:]
    padded = torch.nn.functional.pad(values, (1, 1, 1, 1), value=-1)
    return [padded[..., di:di + height, dj:dj + width]
            for di in range(3) for dj in range(3) if (di, dj) != (1, 1)]


def _same_label_neighbours(labels: torch.Tensor) -> torch.Tensor:
    """How many of each pixel's 8 neighbours carry its label."""
    support = torch.zeros_like(labels)
    for neighbour in _neighbour_views(labels):
        support += neighbour == labels
    return support


def _pixel_grid(size: int, device) -> torch.Tensor:
    """(R * R, 2) pixel centres (x, y) = (col, row), row-major."""
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float32, device=device),
                                torch.arange(size, dtype=torch.float32, device=device), indexing="ij")
    return torch.stack([cols.reshape(-1), rows.reshape(-1)], -1)


def _drop_stray_pieces(labels: torch.Tensor, reach_px: torch.Tensor, min_pixels: int = 3) -> torch.Tensor:
    """Label maps (N, R, R) with each part cut down to its largest piece and the pieces near it.

    Blurred boundaries shift hues, and the 22 hues are only 16 degrees apart, so a piece of one part
    can take another part's hue; that stray piece would drag the other part's axis and extent
    across the image. A piece (8-connected) stays if it is its part's largest, or has at least
    ``min_pixels`` pixels and a centroid within ``reach_px`` (N, 22) of the largest one's: an
    occluder can split a part, but not into pieces farther apart than the part is long.
    """
    num_images, size = labels.shape[0], labels.shape[-1]
    num_pixels = size * size
    labelled = labels >= 0
    pixel_ids = torch.arange(num_pixels, dtype=torch.int32, device=labels.device).reshape(size, size)
    # Connected pieces: every pixel ends up with the largest pixel id of its piece, taking its
    # same-part neighbours' ids, then jumping to the id that the pixel named by its own id holds.
    piece = torch.where(labelled, pixel_ids, -1)
    same_part = [neighbour == labels for neighbour in _neighbour_views(labels)]
    for _ in range(num_pixels):
        spread = piece
        for neighbour_piece, same in zip(_neighbour_views(piece), same_part):
            spread = torch.where(same, torch.maximum(spread, neighbour_piece), spread)
        flat = spread.reshape(num_images, -1)
        spread = torch.where(labelled, flat.gather(1, flat.clamp_min(0).long()).reshape(spread.shape), -1)
        if torch.equal(spread, piece):
            break
        piece = spread

    flat_labels = labels.reshape(num_images, -1)
    part_bins = torch.where(flat_labels >= 0, flat_labels, NUM_PARTS)  # last bin: no part
    piece_bins = torch.where(flat_labels >= 0, piece.reshape(num_images, -1).long(), num_pixels)
    coords = _pixel_grid(size, labels.device).expand(num_images, -1, -1)
    piece_sums = torch.zeros(num_images, num_pixels + 1, 3, device=labels.device).scatter_add_(
        1, piece_bins[..., None].expand(-1, -1, 3), torch.cat([torch.ones_like(coords[..., :1]), coords], -1))
    piece_centroids = piece_sums[..., 1:] / piece_sums[..., :1].clamp_min(1)
    piece_size = piece_sums[..., 0].gather(1, piece_bins)
    largest_size = torch.zeros(num_images, NUM_PARTS + 1, device=labels.device).scatter_reduce(
        1, part_bins, piece_size, "amax").gather(1, part_bins)
    is_largest = (piece_size == largest_size) & (flat_labels >= 0)
    main_piece = torch.full((num_images, NUM_PARTS + 1), -1, device=labels.device).scatter_reduce(
        1, part_bins, torch.where(is_largest, piece_bins, -1), "amax").gather(1, part_bins)
    main_centroid = piece_centroids.gather(1, main_piece.clamp_min(0)[..., None].expand(-1, -1, 2))
    gap = (piece_centroids.gather(1, piece_bins[..., None].expand(-1, -1, 2)) - main_centroid).norm(dim=-1)
    reach = torch.cat([reach_px, torch.zeros_like(reach_px[:, :1])], 1).gather(1, part_bins)
    keep = (piece_bins == main_piece) | ((piece_size >= min_pixels) & (gap <= reach))
    return torch.where(keep & (flat_labels >= 0), flat_labels, -1).reshape(labels.shape)


# -------------------------------------------------------------------------------- view readings


@dataclass
class _PartAxes:
    """Per image and part (N, 22): visible pixels, their principal axis and extent along it."""

    count: torch.Tensor  # pixels
    centre: torch.Tensor  # (N, 22, 2): midpoint of the extent along the axis
    direction: torch.Tensor  # (N, 22, 2): unit principal axis
    half_extent: torch.Tensor  # half the extent along the axis, pixels
    minor_spread: torch.Tensor  # standard deviation across the axis, pixels


def _part_axes(labels: torch.Tensor) -> _PartAxes:
    """Moments and axis extents of every part in label maps (N, R, R), by scattering pixels."""
    num_images, size = labels.shape[0], labels.shape[-1]
    coords = _pixel_grid(size, labels.device)
    bins = torch.where(labels >= 0, labels, NUM_PARTS).reshape(num_images, -1)  # last bin: no part
    x, y = coords[:, 0].expand(num_images, -1), coords[:, 1].expand(num_images, -1)
    moments = torch.stack([torch.ones_like(x), x, y, x * x, y * y, x * y], -1)
    sums = torch.zeros(num_images, NUM_PARTS + 1, 6, device=labels.device).scatter_add_(
        1, bins[..., None].expand(-1, -1, 6), moments)
    count = sums[..., 0]
    mean = sums[..., 1:3] / count[..., None].clamp_min(1)
    second = sums[..., 3:] / count[..., None].clamp_min(1)
    var_x = (second[..., 0] - mean[..., 0] ** 2).clamp_min(0)
    var_y = (second[..., 1] - mean[..., 1] ** 2).clamp_min(0)
    cov_xy = second[..., 2] - mean[..., 0] * mean[..., 1]
    angle = 0.5 * torch.atan2(2 * cov_xy, var_x - var_y)
    direction = torch.stack([torch.cos(angle), torch.sin(angle)], -1)
    minor_var = (var_x + var_y) / 2 - torch.sqrt(((var_x - var_y) / 2) ** 2 + cov_xy ** 2)

    along = ((coords - mean.gather(1, bins[..., None].expand(-1, -1, 2)))
             * direction.gather(1, bins[..., None].expand(-1, -1, 2))).sum(-1)
    high = torch.full((num_images, NUM_PARTS + 1), -torch.inf, device=labels.device).scatter_reduce(
        1, bins, along, "amax")
    low = torch.full((num_images, NUM_PARTS + 1), torch.inf, device=labels.device).scatter_reduce(
        1, bins, along, "amin")
    seen = count > 0
    high, low = torch.where(seen, high, 0.0), torch.where(seen, low, 0.0)
    return _PartAxes(
        count=count[:, :NUM_PARTS],
        centre=(mean + ((high + low) / 2)[..., None] * direction)[:, :NUM_PARTS],
        direction=direction[:, :NUM_PARTS],
        half_extent=((high - low) / 2)[:, :NUM_PARTS],
        minor_spread=minor_var.clamp_min(0).sqrt()[:, :NUM_PARTS],
    )


def _bone_ends(parts: _PartAxes, radii_px: torch.Tensor, visibility: torch.Tensor) -> torch.Tensor:
    """(N, 21, 2, 2) parent and child end of every bone, one radius inside its extremes.

    The parent end is the one nearer (on average) to the ends of the visible parts that touch the
    bone at its parent joint, and farther from those touching it at its child joint.
    """
    half_length = (parts.half_extent - radii_px).clamp_min(0)
    offset = half_length[..., None] * parts.direction
    ends = torch.stack([parts.centre - offset, parts.centre + offset], -2)  # (N, 22, 2, 2)
    # gaps[n, k, e, m]: from end e of bone k to the nearer end of part m
    gaps = (ends[:, :NUM_BONES, :, None, None] - ends[:, None, None]).norm(dim=-1).amin(-1)
    touching = _NEIGHBOURS.to(radii_px.device) * visibility[:, None, None, :]  # (N, 21, joint, 22)
    # affinity[n, k, e, j]: mean gap from end e of bone k to the parts touching it at joint j
    affinity = torch.einsum("nkem,nkjm->nkej", gaps, touching) / touching.sum(-1)[:, :, None].clamp_min(1e-6)
    swap = affinity[..., 1, 0] + affinity[..., 0, 1] < affinity[..., 0, 0] + affinity[..., 1, 1]
    ends = ends[:, :NUM_BONES]
    return torch.where(swap[..., None, None], ends.flip(-2), ends)


def _junction_touches(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the two bones of each junction touch: pixel pairs (N, Q), mean (N, Q, 2), spread (N, Q).

    Each pair of pixels of the two bones that are side by side, or one apart with an unlabelled
    pixel between them (a blurred boundary), contributes its midpoint.
    """
    num_images, size = labels.shape[0], labels.shape[-1]
    num_junctions = len(_JUNCTION_PAIRS)
    junction_of_parts = _JUNCTION_OF_PARTS.to(labels.device)
    bins = torch.where(labels < 0, NUM_PARTS, labels)
    coords = _pixel_grid(size, labels.device).reshape(size, size, 2)
    sums = torch.zeros(num_images, num_junctions + 1, 5, device=labels.device)  # last bin: none
    for gap in (1, 2):
        for axis, xy in ((-1, 0), (-2, 1)):  # neighbours along a row (x differs), along a column (y)
            first, second = bins.narrow(axis, 0, size - gap), bins.narrow(axis, gap, size - gap)
            junction = junction_of_parts[first, second]
            if gap == 2:
                junction = torch.where(bins.narrow(axis, 1, size - gap) == NUM_PARTS, junction, -1)
            midpoint = coords.narrow(axis - 1, 0, size - gap).clone()
            midpoint[..., xy] += gap / 2
            values = torch.cat([torch.ones_like(midpoint[..., :1]), midpoint, midpoint ** 2], -1)
            junction = torch.where(junction >= 0, junction, num_junctions).reshape(num_images, -1)
            sums.scatter_add_(1, junction[..., None].expand(-1, -1, 5),
                              values.reshape(1, -1, 5).expand(num_images, -1, -1))
    count = sums[:, :-1, 0]
    mean = sums[:, :-1, 1:3] / count[..., None].clamp_min(1)
    variance = sums[:, :-1, 3:5] / count[..., None].clamp_min(1) - mean ** 2
    return count, mean, variance.clamp_min(0).sum(-1).sqrt()


def _view_readings(labels: torch.Tensor, radii_px: torch.Tensor, reach_px: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Readings of points in label maps (N, R, R): positions (N, S, 2) and weights (N, S) in [0, 1].

    Reading ``s`` observes point ``_READING_POINTS[s]``. ``radii_px`` and ``reach_px`` (N, 22) are
    the parts' radii and reaches in pixels. Also returns each part's pixel count (N, 22).
    """
    num_images = labels.shape[0]
    labels = _drop_stray_pieces(labels, reach_px)
    parts = _part_axes(labels)
    visibility = (parts.count / (torch.pi * radii_px ** 2).clamp_min(1.0)).clamp(max=1.0)  # a disc's worth
    ends = _bone_ends(parts, radii_px, visibility)

    # Pixels should spread across the axis like a capsule's (std about radius / 2); a sliver that a
    # thicker neighbour leaves of a bone has its principal axis across the bone, and wrong ends.
    capsule_like = ((parts.minor_spread / (0.5 * radii_px).clamp_min(1e-6) - 0.4) / 0.4).clamp(0.05, 1.0)
    end_joints = _BONE_END_JOINTS.reshape(-1).to(labels.device).expand(num_images, -1)
    end_radii = torch.tensor(BONE_RADII, device=labels.device).repeat_interleave(2)
    end_visibility = visibility[:, :NUM_BONES].repeat_interleave(2, dim=1)
    thickest_seen = torch.zeros(num_images, NUM_BODY_JOINTS, device=labels.device).scatter_reduce(
        1, end_joints, torch.where(end_visibility > 0.3, end_radii, 0.0), "amax").gather(1, end_joints)
    uncovered = torch.exp(-(thickest_seen - end_radii).clamp_min(0) / COVER_SCALE)
    end_weights = end_visibility * capsule_like[:, :NUM_BONES].repeat_interleave(2, dim=1) * uncovered

    touch_count, touch_mean, touch_spread = _junction_touches(labels)
    pair_radii = radii_px[:, _JUNCTION_PAIRS[:, 0]] + radii_px[:, _JUNCTION_PAIRS[:, 1]]
    compact = ((0.6 - touch_spread / pair_radii.clamp_min(1e-6)) / 0.3).clamp(0, 1)  # not a long seam
    touch_weights = (touch_count / JUNCTION_FULL_COUNT).clamp(max=1.0) * compact

    positions = torch.cat([ends.reshape(num_images, -1, 2), parts.centre[:, HEAD_PART, None], touch_mean], 1)
    weights = torch.cat([end_weights, visibility[:, HEAD_PART, None], touch_weights], 1)
    return positions, weights, parts.count


# ------------------------------------------------------------------------------- triangulation


def _combine_readings(positions: torch.Tensor, weights: torch.Tensor,
                      points: torch.Tensor = _READING_POINTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean per point (..., 23, 2) of readings (..., S, 2) of ``points`` (S,), and the
    summed weights (..., 23)."""
    lead = positions.shape[:-2]
    index = points.to(positions.device).expand(*lead, -1)
    total = torch.zeros(*lead, NUM_POINTS, device=positions.device).scatter_add(-1, index, weights)
    summed = torch.zeros(*lead, NUM_POINTS, 2, device=positions.device).scatter_add(
        -2, index[..., None].expand(*index.shape, 2), positions * weights[..., None])
    return summed / total[..., None].clamp_min(1e-6), total


def _silhouette_pull(points2d: torch.Tensor, silhouettes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For points (B, V, P, 2) and body silhouettes (B, V, R, R) bool: the nearest silhouette pixel
    (B, V, P, 2) of each point, and whether the point lies off the silhouette (B, V, P)."""
    size = silhouettes.shape[-1]
    pixel = points2d.round().long()
    in_frame = ((pixel >= 0) & (pixel < size)).all(-1)
    pixel = pixel.clamp(0, size - 1)
    flat = silhouettes.flatten(-2)
    on_body = flat.gather(-1, pixel[..., 1] * size + pixel[..., 0])
    outside = ~(in_frame & on_body) & flat.any(-1)[..., None]
    nearest = points2d.clone()
    b, v, p = outside.nonzero(as_tuple=True)
    if len(b):
        grid = _pixel_grid(size, points2d.device)
        gaps = (grid[None] - points2d[b, v, p][:, None]).norm(dim=-1)
        nearest[b, v, p] = grid[torch.where(flat[b, v], gaps, torch.inf).argmin(-1)]
    return nearest, outside


def _fill_from_tree(points3d: torch.Tensor, known: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Points (B, 23, 3) where ``known`` (B, 23) is False take the mean of their nearest known
    neighbours in the kinematic tree; with none known at all, ``fallback`` (B, 3)."""
    adjacency = _POINT_ADJACENCY.to(points3d)
    filled = torch.where(known[..., None], points3d, 0.0)
    have = known.to(points3d.dtype)
    for _ in range(NUM_POINTS):
        if bool(have.bool().all()):
            break
        neighbours_known = adjacency @ have[..., None]
        grown = (adjacency @ (filled * have[..., None])) / neighbours_known.clamp_min(1)
        new = (have == 0) & (neighbours_known[..., 0] > 0)
        filled = torch.where(new[..., None], grown, filled)
        have = torch.where(new, 1.0, have)
    return torch.where(have.bool()[..., None], filled, fallback[:, None].to(points3d))


def _triangulate(rig: CameraRig, points2d: torch.Tensor, weights: torch.Tensor, size: int,
                 framing: Framing) -> torch.Tensor:
    """Points (B, 23, 3) from per-view points (B, V, 23, 2) with weights (B, V, 23), all finite.

    A point that fewer than two non-parallel views determine keeps what its views say and takes the
    rest from a guess, the mean of its nearest determined neighbours in the kinematic tree: the
    guess's projections enter as observations of a weight too small to move anything else.
    """
    points3d = rig.triangulate(points2d, weights, size, framing)
    known = torch.isfinite(points3d).all(-1)
    if bool(known.all()):
        return points3d
    guess = _fill_from_tree(points3d, known, framing.centre)
    guessed2d, _ = rig.project(guess, size, framing)
    pinned2d = torch.where((weights > 0)[..., None], points2d, guessed2d)
    pinned = rig.triangulate(pinned2d, weights + 1e-4, size, framing)
    return torch.where(known[..., None], points3d, pinned)


def _triangulate_readings(rig: CameraRig, readings: torch.Tensor, weights: torch.Tensor,
                          silhouettes: torch.Tensor, size: int, framing: Framing, iterations: int = 5
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Points (B, 23, 3) from readings (B, V, S, 2) with weights (B, V, S), robustly; and the
    per-view points (B, V, 23, 2) that the final weights give.

    Iteratively reweighted least squares. A reading's weight is scaled by a Cauchy weight of its
    distance to its point's reprojection (scale 2 % of the image side), so a wrong reading (a
    swapped bone end, a part hidden behind another) fades out, and so does a view that disagrees
    with the others; it drops to 1 % beyond its bone's reach from the parent joint's reprojection.
    Every joint lies inside its capsule, so it projects onto the body's silhouette (B, V, R, R) in
    every view, seen or not: where a reprojection falls off it, the nearest silhouette pixel joins
    that view's readings (weight :data:`SILHOUETTE_WEIGHT`).
    """
    scale_px = 0.02 * size
    reading_points = _READING_POINTS.to(readings.device)
    parents = _READING_PARENTS.to(readings.device)
    tether_px = (_READING_TETHER.to(readings.device) * (size / 2 / framing.half_extent)[:, None])[:, None]
    all_points = torch.cat([reading_points, torch.arange(NUM_POINTS, device=readings.device)])
    pulls = torch.zeros(*readings.shape[:2], NUM_POINTS, 2, device=readings.device)
    pull_weights = torch.zeros(*readings.shape[:2], NUM_POINTS, device=readings.device)
    current = weights
    for _ in range(iterations):
        per_view, seen = _combine_readings(torch.cat([readings, pulls], 2),
                                           torch.cat([current, pull_weights], 2), all_points)
        points3d = _triangulate(rig, per_view, seen.clamp(max=1.0), size, framing)
        reprojected, _ = rig.project(points3d, size, framing)
        residual = (readings - reprojected[:, :, reading_points]).norm(dim=-1)
        beyond_reach = (readings - reprojected[:, :, parents]).norm(dim=-1) > tether_px
        current = weights / (1 + (residual / scale_px) ** 2) * torch.where(beyond_reach, 0.01, 1.0)
        nearest, outside = _silhouette_pull(reprojected, silhouettes)
        pulls = torch.where(outside[..., None], nearest, pulls)
        pull_weights = torch.maximum(pull_weights, SILHOUETTE_WEIGHT * outside.float())
    return points3d, _combine_readings(readings, current)[0]


# ------------------------------------------------------------------------ joints from points


def _head_centre(joints3d: torch.Tensor) -> torch.Tensor:
    """(B, 3) centre of the head sphere of joints (B, 22, 3), as :mod:`drpose.render` places it."""
    up = joints3d[:, HEAD_JOINT] - joints3d[:, NECK_JOINT]
    return joints3d[:, HEAD_JOINT] + HEAD_OFFSET * torch.nn.functional.normalize(up, dim=-1)


def _frame_axes(origin: torch.Tensor, towards_up: torch.Tensor, across: torch.Tensor) -> torch.Tensor:
    """Orthonormal axes (..., 3, 3) as rows (lateral, up, forward): up from ``origin`` towards
    ``towards_up``, lateral along ``across`` made orthogonal to up."""
    up = torch.nn.functional.normalize(towards_up - origin, dim=-1)
    lateral = torch.nn.functional.normalize(across - (across * up).sum(-1, keepdim=True) * up, dim=-1)
    return torch.stack([lateral, up, torch.linalg.cross(lateral, up, dim=-1)], -2)


_PELVIS = BODY22_NAMES.index("pelvis")
_SPINE1 = BODY22_NAMES.index("spine1")
_SPINE3 = BODY22_NAMES.index("spine3")
_HIPS = [BODY22_NAMES.index("left_hip"), BODY22_NAMES.index("right_hip")]
_COLLARS = [BODY22_NAMES.index("left_collar"), BODY22_NAMES.index("right_collar")]
_SHOULDERS = [BODY22_NAMES.index("left_shoulder"), BODY22_NAMES.index("right_shoulder")]


def _hip_frame(joints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Origin (..., 3) and axes (..., 3, 3) of the hips: mid-hip, up towards spine1, across the hips."""
    left, right = joints[..., _HIPS[0], :], joints[..., _HIPS[1], :]
    middle = (left + right) / 2
    return middle, _frame_axes(middle, joints[..., _SPINE1, :], left - right)


def _chest_frame(joints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Origin (..., 3) and axes (..., 3, 3) of the chest: spine3, up towards the neck, across the
    shoulders."""
    origin = joints[..., _SPINE3, :]
    across = joints[..., _SHOULDERS[0], :] - joints[..., _SHOULDERS[1], :]
    return origin, _frame_axes(origin, joints[..., NECK_JOINT, :], across)


def _rest_offsets() -> tuple[torch.Tensor, torch.Tensor]:
    """At rest: the pelvis in the hip frame (3,) and the collars in the chest frame (2, 3)."""
    origin, axes = _hip_frame(REST_JOINTS)
    pelvis = axes @ (REST_JOINTS[_PELVIS] - origin)
    origin, axes = _chest_frame(REST_JOINTS)
    return pelvis, (REST_JOINTS[_COLLARS] - origin) @ axes.T


_PELVIS_IN_HIP_FRAME, _COLLARS_IN_CHEST_FRAME = _rest_offsets()


def _joints_from_points(points3d: torch.Tensor, head_centre_seen: torch.Tensor) -> torch.Tensor:
    """Joints (B, 22, 3) from the 23 triangulated points.

    The head joint lies :data:`HEAD_OFFSET` from the head sphere's centre towards the neck, where
    the sphere is seen in two views or more (``head_centre_seen`` (B,)). The pelvis and the
    collars, which no view shows (they sit inside the hip and lower-spine capsules, and inside the
    chest and neck), are rigid in frames that visible joints fix: the hips and spine1 hang off
    the pelvis at fixed offsets in its frame, the collars off spine3 (up: towards the neck; across:
    the shoulders, which the collars' own small rotations tilt a little). So they are placed at
    the rest skeleton's offsets in those frames: exact for the pelvis and within about a
    centimetre for the collars given true neighbours, far better than their readings.
    """
    joints3d = points3d[:, :NUM_BODY_JOINTS].clone()
    towards_neck = torch.nn.functional.normalize(joints3d[:, NECK_JOINT] - points3d[:, HEAD_CENTRE], dim=-1)
    head = points3d[:, HEAD_CENTRE] + HEAD_OFFSET * towards_neck
    joints3d[:, HEAD_JOINT] = torch.where(head_centre_seen[:, None], head, joints3d[:, HEAD_JOINT])
    origin, axes = _hip_frame(joints3d)
    joints3d[:, _PELVIS] = origin + _PELVIS_IN_HIP_FRAME.to(joints3d) @ axes
    origin, axes = _chest_frame(joints3d)
    joints3d[:, _COLLARS] = origin[:, None] + _COLLARS_IN_CHEST_FRAME.to(joints3d) @ axes
    return joints3d


# ------------------------------------------------------------------------------------ estimate


def _check_inputs(rgb: torch.Tensor, rig: CameraRig, framing: Framing) -> None:
    if not isinstance(rig, CameraRig):
        raise TypeError(f"rig: expected a CameraRig, got {type(rig).__name__}")
    square_rgb = isinstance(rgb, torch.Tensor) and rgb.ndim == 5 and rgb.shape[2] == 3 \
        and rgb.shape[-1] == rgb.shape[-2]
    if not square_rgb:
        shape = tuple(rgb.shape) if isinstance(rgb, torch.Tensor) else type(rgb).__name__
        raise ValueError(f"rgb: expected square RGB images of shape (B, V, 3, R, R), got {shape}")
    if rgb.shape[0] == 0:
        raise ValueError("rgb: expected at least one body, got an empty batch")
    if rgb.shape[1] != rig.num_views:
        raise ValueError(f"rgb: expected the rig's {rig.num_views} views in dim 1, got {rgb.shape[1]}")
    if not rgb.is_floating_point():
        raise TypeError(f"rgb: expected floating-point values in [0, 1], got {rgb.dtype}")
    if not isinstance(framing, Framing):
        raise TypeError(f"framing: expected a Framing, got {type(framing).__name__}")
    batch = rgb.shape[0]
    if tuple(framing.centre.shape) != (batch, 3) or tuple(framing.half_extent.shape) != (batch,):
        raise ValueError(
            f"framing: expected centre ({batch}, 3) and half_extent ({batch},) for the {batch} bodies "
            f"in rgb, got {tuple(framing.centre.shape)} and {tuple(framing.half_extent.shape)}"
        )


def estimate_keypoints(rgb: torch.Tensor, rig: CameraRig, framing: Framing, refinement_steps: int = 1,
                       consistency_px: float | None = None, chunk_size: int = 32) -> KeypointEstimate:
    """Body22 keypoints of the bodies in multi-view RGB images (B, V, 3, R, R) in [0, 1].

    ``rig`` and ``framing`` are those the images were rendered or generated with (the rig's V
    views; one framing per body). ``refinement_steps`` re-renders the estimate that many times to
    remove the readings' bias (module docstring, step 4): 0 skips rendering, which is about three
    times faster and leaves about 2.5 times the 3D error on clean renders; each further step costs
    as much as the first and gains less. ``consistency_px`` (default ``0.05 * R``) is how far a view's own
    estimate may lie from the triangulated joint's reprojection and still be kept in ``points2d``.
    Bodies are processed ``chunk_size`` at a time to bound memory.
    """
    _check_inputs(rgb, rig, framing)
    if isinstance(refinement_steps, bool) or not isinstance(refinement_steps, int) or refinement_steps < 0:
        raise ValueError(f"refinement_steps: expected an int >= 0, got {refinement_steps!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    size = rgb.shape[-1]
    consistency_px = 0.05 * size if consistency_px is None else float(consistency_px)
    if not consistency_px > 0:
        raise ValueError(f"consistency_px: expected > 0, got {consistency_px}")
    chunks = []
    for first in range(0, rgb.shape[0], chunk_size):
        bodies = slice(first, first + chunk_size)
        chunk_framing = Framing(framing.centre[bodies].to(rgb.device).float(),
                                framing.half_extent[bodies].to(rgb.device).float())
        chunks.append(_estimate(rgb[bodies].float(), rig, chunk_framing, refinement_steps, consistency_px))
    return KeypointEstimate(**{
        field.name: torch.cat([getattr(chunk, field.name) for chunk in chunks])
        for field in fields(KeypointEstimate)
    })


def _estimate(rgb: torch.Tensor, rig: CameraRig, framing: Framing, refinement_steps: int,
              consistency_px: float) -> KeypointEstimate:
    """:func:`estimate_keypoints` for one chunk of bodies, with checked arguments."""
    batch, views, _, size, _ = rgb.shape
    pixels_per_metre = (size / 2 / framing.half_extent)[:, None, None]  # (B, 1, 1)
    radii_px = (torch.tensor(PART_RADII, device=rgb.device) * pixels_per_metre).expand(-1, views, -1)
    reach_px = (torch.tensor(PART_REACH, device=rgb.device) * pixels_per_metre + 2.0).expand(-1, views, -1)

    def read(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = part_map(images).reshape(batch * views, size, size)
        positions, weights, counts = _view_readings(
            labels, radii_px.reshape(batch * views, -1), reach_px.reshape(batch * views, -1))
        return (positions.reshape(batch, views, -1, 2), weights.reshape(batch, views, -1),
                counts.reshape(batch, views, -1))

    observed, observed_weights, part_pixels = read(rgb)
    # Body pixels (at least half part colour: the smallest channel at most 0.5), grown by one pixel.
    silhouettes = torch.nn.functional.max_pool2d(
        (rgb.amin(2) <= 0.5).float().reshape(batch * views, 1, size, size), 3, 1, 1
    ).reshape(batch, views, size, size) > 0
    readings, weights = observed, observed_weights
    for step in range(refinement_steps + 1):
        points3d, per_view = _triangulate_readings(rig, readings, weights, silhouettes, size, framing)
        seen = _combine_readings(readings, weights)[1].clamp(max=1.0)
        joints3d = _joints_from_points(points3d, (seen[..., HEAD_CENTRE] > 0).sum(1) >= 2)
        if step == refinement_steps:
            break
        synthetic, synthetic_weights, _ = read(render_bodies(joints3d, rig, size, framing=framing).rgb)
        points = torch.cat([joints3d, _head_centre(joints3d)[:, None]], 1)
        projected, _ = rig.project(points, size, framing)
        bias = synthetic - projected[:, :, _READING_POINTS.to(rgb.device)]
        readings = observed - bias
        weights = torch.minimum(observed_weights, synthetic_weights)

    # Per view, the head joint lies on the segment from the head centre to the neck at the fraction
    # it does in 3D (exact for orthographic views, which keep ratios along a line).
    neck_to_centre = (points3d[:, HEAD_CENTRE] - joints3d[:, NECK_JOINT]).norm(dim=-1).clamp_min(1e-6)
    fraction = (HEAD_OFFSET / neck_to_centre)[:, None, None]
    centre2d, neck2d = per_view[..., HEAD_CENTRE, :], per_view[..., NECK_JOINT, :]
    raw2d = per_view[..., :NUM_BODY_JOINTS, :].clone()
    raw2d[..., HEAD_JOINT, :] = centre2d + fraction * (neck2d - centre2d)
    raw_confidence = seen[..., :NUM_BODY_JOINTS].clone()
    raw_confidence[..., HEAD_JOINT] = torch.minimum(seen[..., HEAD_CENTRE], seen[..., NECK_JOINT])
    raw2d = torch.where(raw_confidence[..., None] > 0, raw2d, torch.nan)

    reprojected2d, _ = rig.project(joints3d, size, framing)
    distance = (raw2d - reprojected2d).norm(dim=-1).nan_to_num(torch.inf)
    trusted = (distance <= consistency_px) & (raw_confidence >= 0.5)
    return KeypointEstimate(
        points2d=torch.where(trusted[..., None], raw2d, reprojected2d),
        confidence=raw_confidence * torch.exp(-0.5 * (distance / consistency_px) ** 2),
        joints3d=joints3d,
        raw2d=raw2d,
        raw_confidence=raw_confidence,
        reprojected2d=reprojected2d,
        part_pixels=part_pixels,
    )
