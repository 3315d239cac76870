"""Comparison helpers that say where and by how much two tensors differ."""

from __future__ import annotations

import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    a, e = actual.detach().double(), expected.detach().double()
    diff = (a - e).norm().item()
    ref = e.norm().item()
    if ref == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / ref


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, count: int = 5) -> str:
    a, e = actual.detach().double().flatten(), expected.detach().double().flatten()
    err = (a - e).abs()
    worst = torch.topk(err, min(count, err.numel())).indices
    rows = []
    for flat in worst.tolist():
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), actual.shape))
        rows.append(f"  at {index}: actual={a[flat].item():.9g} expected={e[flat].item():.9g}")
    nonfinite = (~torch.isfinite(a)).sum().item()
    return "\n".join(rows) + (f"\n  non-finite elements in actual: {nonfinite}" if nonfinite else "")


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """Norm-wise relative error <= tol, shapes equal, and every element finite where expected is."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    finite = torch.isfinite(expected)
    assert torch.isfinite(actual[finite]).all(), f"{what}: non-finite values\n{describe_mismatch(actual, expected)}"
    err = relative_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}\n{describe_mismatch(actual, expected)}"
