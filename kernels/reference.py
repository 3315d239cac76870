"""Pure-PyTorch reference for the PoseScore op: the ground truth that the fused kernels must match.

Conventions:

* heatmap pixel (row i, col j) has its centre at (x, y) = (j, i); keypoints are float (x, y) in heatmap
  pixels and may lie outside the map;
* channel c of row n has a target segment [a, b]; a joint is the zero-length segment a == b;
* target ``T(p) = exp(-e)`` with ``e = d(p, [a, b])^2 / (2 sigma^2)``: peak 1, unnormalised; ``e`` is
  computed as ``(k dx)^2 + (k dy)^2`` with ``k = 1 / (sqrt(2) sigma)`` held to the dtype's range, so that
  degenerate widths stay exact: sigma = 1e-30 gives T = 1 exactly on the segment and 0 elsewhere, sigma =
  1e200 gives T = 1 everywhere;
* per-pixel divergence ``D(l, T) = softplus(l) - l T - H(T)`` (the Bernoulli KL divergence between the
  target and ``sigmoid(l)``), so ``D >= 0`` and ``D = 0`` exactly when ``sigmoid(l) = T``;
* ``div[n, c]`` is the mean of ``D`` over the H*W pixels;
* ``pose_score``: ``S_b = -sum_{v,c} w div / max(sum_{v,c} w, eps)``, 0 for a sample with no weight; a
  row of weight exactly 0 adds nothing, whatever its segment holds (a keypoint at 1e20 px, or NaN).

``T log T`` is written as ``-e T`` (0 where T underflows, even for e = inf) and ``1 - T`` as
``-expm1(-e)``: exact where the naive forms lose digits, and free of ``log(0)`` so that autograd gives
finite gradients for keypoints sitting exactly on a pixel centre. Everything runs in float32 (float64 when the logits are float64, for gradcheck); the
result is float32 for float32/float16/bfloat16 logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import check_inputs, check_values, check_weights

WEIGHT_EPS = 1e-12
"""Floor of the per-sample weight sum in ``pose_score``: a sample with no weight scores exactly 0."""
SQRT1_2 = 0.7071067811865476


def compute_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def _xlogx(u: torch.Tensor) -> torch.Tensor:
    """u log u with 0 log 0 = 0 and a finite (masked) gradient at u = 0."""
    positive = u > 0
    safe = torch.where(positive, u, torch.ones_like(u))
    return torch.where(positive, safe * torch.log(safe), torch.zeros_like(u))


def sigma_scale(sigma, dtype: torch.dtype):
    """k = 1 / (sqrt(2) sigma), a float or a (C,) tensor, held to the dtype's range (no inf for tiny sigma)."""
    largest = torch.finfo(dtype).max
    if isinstance(sigma, torch.Tensor):
        return (SQRT1_2 / sigma.to(dtype)).clamp_max(largest)
    return min(SQRT1_2 / float(sigma), largest)


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
    k = sigma_scale(sigma, dtype)
    if isinstance(k, torch.Tensor):
        k = k.view(1, -1, 1, 1)
    dx = (px - t * abx) * k
    dy = (py - t * aby) * k
    return dx * dx + dy * dy


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
    e_target = torch.where(target > 0, e, torch.zeros_like(e)) * target  # e T -> 0 as e -> inf
    l = logits.to(dtype)
    per_pixel = F.softplus(l) - l * target - e_target + _xlogx(one_minus_target)
    return per_pixel.mean(dim=(-2, -1))


def heatmap_divergence(logits: torch.Tensor, segments: torch.Tensor, sigma) -> torch.Tensor:
    """Mean per-pixel Bernoulli KL between target heatmaps and sigmoid(logits): (N, C) float32."""
    checked = check_inputs(logits, segments, sigma)
    check_values(checked.segments, checked.sigma)
    return divergence_from_checked(checked.logits, checked.segments, checked.sigma)


def reduce_pose_score(divergence: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted per-sample reward from row divergences (N, C) and weights (B, V, C): (B,). Rows of weight
    exactly 0 add nothing."""
    b = weights.shape[0]
    per_sample = weights.shape[1] * weights.shape[2]
    w = weights.to(divergence.dtype).reshape(b, per_sample)
    d = divergence.reshape(b, per_sample)
    weighted = torch.where(w == 0, torch.zeros_like(d), w * d)
    return -weighted.sum(dim=1) / w.sum(dim=1).clamp_min(WEIGHT_EPS)


def pose_score_from_checked(logits: torch.Tensor, segments: torch.Tensor, sigma, weights: torch.Tensor) -> torch.Tensor:
    """The reference score on validated inputs, weights (B, V, C). The segments of zero-weight rows are
    replaced by the origin first, so that nothing they hold (NaN with ``validate=False``) reaches the
    score or its gradients."""
    n, c = logits.shape[:2]
    unused = (weights.reshape(n, c) == 0)[..., None, None]
    segments = torch.where(unused, torch.zeros_like(segments), segments)
    return reduce_pose_score(divergence_from_checked(logits, segments, sigma), weights)


def pose_score_weight_gradient(divergence: torch.Tensor, weights: torch.Tensor, weight_sums: torch.Tensor,
                               grad_scores: torch.Tensor, num_views: int) -> torch.Tensor:
    """d(sum_b g_b S_b)/dw for weights (N, C), row divergences (N, C) and per-sample weight sums (B,), as
    autograd differentiates ``reduce_pose_score``."""
    w = weights.reshape(weight_sums.shape[0], num_views * weights.shape[-1])
    d = torch.where(w == 0, torch.zeros_like(w), divergence.reshape(w.shape))
    floor = weight_sums.clamp_min(WEIGHT_EPS)
    score = -(w * d).sum(dim=1) / floor
    through_sum = torch.where(weight_sums >= WEIGHT_EPS, score, torch.zeros_like(score))
    grad = -(d + through_sum[:, None]) / floor[:, None] * grad_scores.to(floor.dtype)[:, None]
    return grad.reshape(weights.shape)


def pose_score(logits: torch.Tensor, segments: torch.Tensor, weights: torch.Tensor, sigma, num_views: int) -> torch.Tensor:
    """PoseScore per sample (B,) with N = B * num_views rows; <= 0, and 0 is a perfect match."""
    checked = check_inputs(logits, segments, sigma)
    weights = check_weights(weights, checked.logits, num_views)
    check_values(checked.segments, checked.sigma, weights)
    return pose_score_from_checked(checked.logits, checked.segments, checked.sigma, weights)
