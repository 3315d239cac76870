"""Pure-PyTorch reference for the PoseScore op: the ground truth that the fused kernels must match.

Conventions (DESIGN.md section 4):

* heatmap pixel (row i, col j) has its centre at (x, y) = (j, i); keypoints are float (x, y) in heatmap
  pixels and may lie outside the map;
* channel c of row n has a target segment [a, b]; a joint is the zero-length segment a == b;
* target ``T(p) = exp(-e)`` with ``e = d(p, [a, b])^2 / (2 sigma^2)``: peak 1, unnormalised;
* per-pixel divergence ``D(l, T) = softplus(l) - l T - H(T)`` (the Bernoulli KL divergence between the
  target and ``sigmoid(l)``), so ``D >= 0`` and ``D = 0`` exactly when ``sigmoid(l) = T``;
* ``div[n, c]`` is the mean of ``D`` over the H*W pixels;
* ``pose_score``: ``S_b = -sum_{v,c} w div / max(sum_{v,c} w, eps)``, 0 for a sample with no weight.

``T log T`` is written as ``-e T`` and ``1 - T`` as ``-expm1(-e)``: exact where the naive forms lose
digits, and free of ``log(0)`` so that autograd gives finite gradients for keypoints sitting exactly on
a pixel centre. Everything runs in float32 (float64 when the logits are float64, for gradcheck); the
result is float32 for float32/float16/bfloat16 logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import check_inputs, check_values, check_weights

WEIGHT_EPS = 1e-12
"""Floor of the per-sample weight sum in ``pose_score``: a sample with no weight scores exactly 0."""


def compute_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def _xlogx(u: torch.Tensor) -> torch.Tensor:
    """u log u with 0 log 0 = 0 and a finite (masked) gradient at u = 0."""
    positive = u > 0
    safe = torch.where(positive, u, torch.ones_like(u))
    return torch.where(positive, safe * torch.log(safe), torch.zeros_like(u))


def segment_exponent(segments: torch.Tensor, sigma, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """e = d(p, [a, b])^2 / (2 sigma^2) for every pixel centre p: (N, C, 2, 2) -> (N, C, H, W)."""
    seg = segments.to(dtype)
    ax, ay = seg[..., 0, 0, None, None], seg[..., 0, 1, None, None]
    abx = (seg[..., 1, 0] - seg[..., 0, 0])[..., None, None]
    aby = (seg[..., 1, 1] - seg[..., 0, 1])[..., None, None]
    len2 = abx * abx + aby * aby
    has_length = len2 > 0
    inv_len2 = torch.where(has_length, 1.0 / torch.where(has_length, len2, torch.ones_like(len2)), torch.zeros_like(len2))
    px = torch.arange(width, device=seg.device, dtype=dtype).view(1, 1, 1, width) - ax
    py = torch.arange(height, device=seg.device, dtype=dtype).view(1, 1, height, 1) - ay
    t = ((px * abx + py * aby) * inv_len2).clamp(0.0, 1.0)
    dx = px - t * abx
    dy = py - t * aby
    if isinstance(sigma, torch.Tensor):
        two_sigma2 = 2.0 * sigma.to(dtype).view(1, -1, 1, 1) ** 2
    else:
        two_sigma2 = 2.0 * float(sigma) ** 2
    return (dx * dx + dy * dy) / two_sigma2


def heatmap_targets(segments: torch.Tensor, sigma, height: int, width: int) -> torch.Tensor:
    """Target heatmaps T (N, C, H, W) in [0, 1] for (N, C, 2, 2) segments or (N, C, 2) joints."""
    if segments.dim() == 3:
        segments = torch.stack((segments, segments), dim=2)
    return torch.exp(-segment_exponent(segments, sigma, height, width, compute_dtype(segments.dtype)))


def divergence_from_checked(logits: torch.Tensor, segments: torch.Tensor, sigma) -> torch.Tensor:
    """The reference computation on already-validated, canonical inputs."""
    dtype = compute_dtype(logits.dtype)
    height, width = logits.shape[-2:]
    e = segment_exponent(segments, sigma, height, width, dtype)
    target = torch.exp(-e)
    one_minus_target = -torch.expm1(-e)
    l = logits.to(dtype)
    per_pixel = F.softplus(l) - l * target - e * target + _xlogx(one_minus_target)
    return per_pixel.mean(dim=(-2, -1))


def heatmap_divergence(logits: torch.Tensor, segments: torch.Tensor, sigma) -> torch.Tensor:
    """Mean per-pixel Bernoulli KL between target heatmaps and sigmoid(logits): (N, C) float32."""
    checked = check_inputs(logits, segments, sigma)
    check_values(checked.segments, checked.sigma)
    return divergence_from_checked(checked.logits, checked.segments, checked.sigma)


def reduce_pose_score(divergence: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted per-sample reward from row divergences (N, C) and weights (B, V, C): (B,)."""
    b = weights.shape[0]
    w = weights.to(divergence.dtype).reshape(b, -1)
    d = divergence.reshape(b, -1)
    return -(w * d).sum(dim=1) / w.sum(dim=1).clamp_min(WEIGHT_EPS)


def pose_score(logits: torch.Tensor, segments: torch.Tensor, weights: torch.Tensor, sigma, num_views: int) -> torch.Tensor:
    """PoseScore per sample (B,) with N = B * num_views rows; <= 0, and 0 is a perfect match."""
    checked = check_inputs(logits, segments, sigma)
    weights = check_weights(weights, checked.logits, num_views)
    check_values(checked.segments, checked.sigma, weights)
    return reduce_pose_score(divergence_from_checked(checked.logits, checked.segments, checked.sigma), weights)
