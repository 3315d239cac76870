"""Pose accuracy metrics: 2D keypoint accuracy per view and 3D joint error.

* PCK@a: the share of visible keypoints whose pixel error is at most ``a * image_size``;
* mean pixel error over visible keypoints;
* MPJPE: mean Euclidean 3D joint error (metres here, reported in millimetres);
* PA-MPJPE: MPJPE after the similarity transform (rotation, translation, scale) that best aligns the
  prediction to the truth (Procrustes), which isolates articulation from global placement.
"""

from __future__ import annotations

import torch

PCK_THRESHOLDS = (0.05, 0.1)


def keypoint_errors(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Euclidean pixel errors (...,) between (..., 2) keypoints."""
    return (pred.float() - truth.float()).norm(dim=-1)


def pck(errors: torch.Tensor, visible: torch.Tensor, image_size: int, threshold: float) -> float:
    """Share of visible keypoints within ``threshold * image_size`` pixels (NaN when none is visible)."""
    visible = visible.bool()
    if not visible.any():
        return float("nan")
    return (errors[visible] <= threshold * image_size).float().mean().item()


def keypoint_metrics(pred: torch.Tensor, truth: torch.Tensor, visible: torch.Tensor, image_size: int) -> dict:
    """PCK at ``PCK_THRESHOLDS`` and mean pixel error of (..., J, 2) keypoints over visible ones."""
    errors = keypoint_errors(pred, truth)
    metrics = {f"pck@{t}": pck(errors, visible, image_size, t) for t in PCK_THRESHOLDS}
    metrics["mean_px_error"] = errors[visible.bool()].mean().item() if visible.any() else float("nan")
    return metrics


def mpjpe(pred: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean joint error (B,) of (B, J, 3) joints, over joints marked ``valid`` (B, J)."""
    errors = (pred.double() - truth.double()).norm(dim=-1)
    if valid is None:
        return errors.mean(dim=-1)
    valid = valid.double()
    return (errors * valid).sum(-1) / valid.sum(-1).clamp_min(1)


def procrustes_align(pred: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``pred`` (B, J, 3) moved by the similarity transform that best fits ``truth`` (least squares)."""
    pred, truth = pred.double(), truth.double()
    w = torch.ones(pred.shape[:2], dtype=torch.float64, device=pred.device) if valid is None else valid.double()
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    mu_p = (w[..., None] * pred).sum(1, keepdim=True)
    mu_t = (w[..., None] * truth).sum(1, keepdim=True)
    p, t = pred - mu_p, truth - mu_t
    cov = torch.einsum("bj,bji,bjk->bik", w, t, p)  # sum_j w_j t_j p_j^T
    u, s, vh = torch.linalg.svd(cov)
    d = torch.sign(torch.linalg.det(u @ vh))
    fix = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
    rotation = u @ fix @ vh
    variance = (w * p.pow(2).sum(-1)).sum(-1)
    scale = (s * torch.diagonal(fix, dim1=-2, dim2=-1)).sum(-1) / variance.clamp_min(1e-12)
    return scale[:, None, None] * p @ rotation.transpose(1, 2) + mu_t


def pa_mpjpe(pred: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    return mpjpe(procrustes_align(pred, truth, valid), truth, valid)
