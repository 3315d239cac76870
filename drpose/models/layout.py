"""The multi-view batch layout of PSHuman-style models, and the conversions every other part uses.

A batch of UNet rows holds ``2 domains x G groups x V views`` images, domain-major:

    row = V * G * domain + V * group + view

Domain 0 holds normal maps, domain 1 RGB ("color") images. A group is one object; under classifier-free
guidance the groups of a batch are ``[uncond objects..., cond objects...]`` inside each domain. Views are
``VIEW_NAMES``: six orthographic body views (elevation 0) and a face close-up, which is generated but
never scored. Everything that turns rows into per-view tensors goes through the helpers here, so the
layout is written down once.
"""

from __future__ import annotations

import torch

DOMAINS = ("normal", "color")
NORMAL, COLOR = 0, 1
VIEW_NAMES = ("front", "front_right", "right", "back", "left", "front_left", "face")
BODY_VIEW_AZIMUTHS = (0.0, 45.0, 90.0, 180.0, 270.0, 315.0)  # degrees, views 0..5
FACE_VIEW = 6
NUM_BODY_VIEWS = 6


def check_rows(rows: int, num_views: int, what: str = "batch") -> int:
    """The number of groups G in a batch of ``rows`` rows, or a ValueError that says why it is not one."""
    per_group = len(DOMAINS) * num_views
    if rows <= 0 or rows % per_group:
        raise ValueError(f"{what} has {rows} rows; a multi-view batch holds 2 domains x G groups x {num_views} views "
                         f"= a positive multiple of {per_group} rows")
    return rows // per_group


def rows_to_grid(x: torch.Tensor, num_views: int) -> torch.Tensor:
    """(2 * G * V, ...) rows -> (2, G, V, ...)."""
    groups = check_rows(x.shape[0], num_views)
    return x.reshape(len(DOMAINS), groups, num_views, *x.shape[1:])


def grid_to_rows(x: torch.Tensor) -> torch.Tensor:
    """(2, G, V, ...) -> (2 * G * V, ...) rows."""
    if x.shape[0] != len(DOMAINS):
        raise ValueError(f"expected a leading domain axis of size {len(DOMAINS)}, got shape {tuple(x.shape)}")
    return x.reshape(-1, *x.shape[3:])


def body_views(x: torch.Tensor, num_views: int) -> torch.Tensor:
    """Rows (2 * G * V, c, h, w) -> (G, 6, 2 * c, h, w): each body view's normal and RGB latents on channels,
    the input of g_skel. The face view is dropped (it is generated, not scored)."""
    grid = rows_to_grid(x, num_views)[:, :, :NUM_BODY_VIEWS]  # (2, G, 6, c, h, w)
    return grid.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)


def expand_per_group(values: torch.Tensor, num_views: int) -> torch.Tensor:
    """(G, ...) per-group values -> (2 * G * V, ...) rows (the same value for every view of both domains)."""
    groups = values.shape[0]
    grid = values[None, :, None].expand(len(DOMAINS), groups, num_views, *values.shape[1:])
    return grid.reshape(-1, *values.shape[1:])
