"""Input checks shared by every backend of the PoseScore op.

Shapes, dtypes and devices are checked without touching the data. Value checks (sigma > 0, finite
segments, non-negative finite weights) need the data: they are batched into one small boolean tensor
so that a CUDA caller pays a single host synchronisation per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real

import torch

SUPPORTED_LOGITS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class CheckedInputs:
    """Canonical inputs: segments (N, C, 2, 2); sigma either a float or a (C,) tensor."""

    logits: torch.Tensor
    segments: torch.Tensor
    sigma: float | torch.Tensor


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_logits(logits) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor of shape (N, C, H, W), got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(
            f"logits must be float32, float16, bfloat16 (or float64 for the reference), got {logits.dtype}"
        )
    if logits.dtype not in SUPPORTED_LOGITS_DTYPES:
        raise TypeError(f"logits dtype {logits.dtype} is not supported; use float32, float16 or bfloat16")
    if logits.dim() != 4:
        raise ValueError(f"logits must have shape (N, C, H, W), got {logits.dim()} dims {_shape(logits)}")
    if logits.shape[2] == 0 or logits.shape[3] == 0:
        raise ValueError(f"logits must have non-empty heatmaps, got shape {_shape(logits)}")
    return logits


def check_segments(segments, logits: torch.Tensor) -> torch.Tensor:
    """Returns segments as (N, C, 2, 2): [..., 0, :] = a, [..., 1, :] = b, both (x, y) in pixels."""
    n, c = logits.shape[:2]
    if not isinstance(segments, torch.Tensor):
        raise TypeError(f"segments must be a torch.Tensor of shape (N, C, 2, 2) or (N, C, 2), got {type(segments).__name__}")
    if not segments.is_floating_point():
        raise TypeError(f"segments must be a floating-point tensor (float32), got {segments.dtype}")
    if segments.device != logits.device:
        raise ValueError(f"segments are on {segments.device} but logits are on {logits.device}; put both on one device")
    if segments.dim() == 3 and segments.shape[2] == 2:
        segments = segments.unsqueeze(2).expand(-1, -1, 2, -1)  # joints: zero-length segments a == b (a view)
    elif not (segments.dim() == 4 and segments.shape[2:] == (2, 2)):
        raise ValueError(
            f"segments must have shape (N, C, 2, 2) for segments or (N, C, 2) for joints, got {_shape(segments)}"
        )
    if segments.shape[0] != n:
        raise ValueError(f"segments has N={segments.shape[0]} rows but logits has N={n}")
    if segments.shape[1] != c:
        raise ValueError(f"segments has C={segments.shape[1]} channels but logits has C={c}")
    return segments


def check_sigma(sigma, logits: torch.Tensor) -> float | torch.Tensor:
    """Returns a positive float, or a (C,) tensor on the logits' device (values checked later)."""
    c = logits.shape[1]
    if isinstance(sigma, torch.Tensor):
        if not sigma.is_floating_point():
            raise TypeError(f"sigma must be a float or a floating-point tensor of shape (C,), got {sigma.dtype}")
        if sigma.device != logits.device:
            raise ValueError(f"sigma is on {sigma.device} but logits are on {logits.device}; put both on one device")
        if sigma.dim() == 0:
            sigma = sigma.reshape(1).expand(c)
        if sigma.shape != (c,):
            raise ValueError(f"sigma must be a float or a tensor of shape (C,)=({c},), got {_shape(sigma)}")
        return sigma
    if isinstance(sigma, bool) or not isinstance(sigma, Real):
        raise TypeError(f"sigma must be a positive float or a (C,) tensor, got {type(sigma).__name__}")
    sigma = float(sigma)
    if not sigma > 0.0 or sigma == float("inf"):
        raise ValueError(f"sigma must be positive and finite, got {sigma}")
    return sigma


def check_weights(weights, logits: torch.Tensor, num_views) -> torch.Tensor:
    """Returns weights as (B, V, C)."""
    n, c = logits.shape[:2]
    if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views <= 0:
        raise ValueError(f"num_views must be a positive int, got {num_views!r}")
    if n % num_views != 0:
        raise ValueError(f"num_views={num_views} does not divide N={n} rows of logits (N = batch * views)")
    b = n // num_views
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor of shape (N, C) or (B, V, C), got {type(weights).__name__}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be a floating-point tensor, got {weights.dtype}")
    if weights.device != logits.device:
        raise ValueError(f"weights are on {weights.device} but logits are on {logits.device}; put both on one device")
    if weights.dim() == 2:
        if weights.shape != (n, c):
            raise ValueError(f"weights must have shape (N, C)=({n}, {c}) or (B, V, C)=({b}, {num_views}, {c}), got {_shape(weights)}")
        weights = weights.reshape(b, num_views, c)
    elif weights.dim() == 3:
        if weights.shape != (b, num_views, c):
            raise ValueError(f"weights must have shape (N, C)=({n}, {c}) or (B, V, C)=({b}, {num_views}, {c}), got {_shape(weights)}")
    else:
        raise ValueError(f"weights must have shape (N, C) or (B, V, C), got {weights.dim()} dims {_shape(weights)}")
    return weights


def carries_values(tensor: torch.Tensor) -> bool:
    """False for tensors that carry shapes only (fake tensors under ``FakeTensorMode``, as in a dry run of
    a training step, or meta tensors): their values cannot be checked."""
    from torch._subclasses.fake_tensor import is_fake

    return not (tensor.is_meta or is_fake(tensor))


def check_values(segments: torch.Tensor, sigma: float | torch.Tensor, weights: torch.Tensor | None = None) -> None:
    """Value checks with one host synchronisation: finite segments, sigma > 0, weights >= 0 and finite.
    Shape-only inputs (:func:`carries_values`) have no values to check."""
    if not carries_values(segments):
        return
    flags = [~torch.isfinite(segments.detach()).all()]
    names = ["segments must be finite (got NaN or inf); mark unusable keypoints with weight 0 instead"]
    if isinstance(sigma, torch.Tensor):
        s = sigma.detach()
        flags.append(~((s > 0) & torch.isfinite(s)).all())
        names.append("sigma must be positive and finite in every channel")
    if weights is not None:
        w = weights.detach()
        flags.append(torch.isnan(w).any())
        names.append("weights contain NaN")
        flags.append((w < 0).any())
        names.append("weights must be non-negative")
        flags.append(torch.isinf(w).any())
        names.append("weights must be finite")
    bad = torch.stack(flags).tolist()
    for is_bad, message in zip(bad, names):
        if is_bad:
            raise ValueError(message)


def check_inputs(logits, segments, sigma) -> CheckedInputs:
    logits = check_logits(logits)
    segments = check_segments(segments, logits)
    sigma = check_sigma(sigma, logits)
    return CheckedInputs(logits=logits, segments=segments, sigma=sigma)
