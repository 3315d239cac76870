"""Figures for evaluation reports: multi-view grids with keypoints, metric bars, reward curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from drpose.skeleton import BODY22_BONES  # noqa: E402

TRUTH_COLOUR = "#00a000"
ESTIMATE_COLOUR = "#e00000"


def save_figure(figure, path: str | Path, title: str = "") -> Path:
    """Title, lay out, write (creating the folder) and close a figure; returns its path."""
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _draw_skeleton(axis, points: torch.Tensor, colour: str, style: str) -> None:
    for parent, child in BODY22_BONES:
        axis.plot(points[[parent, child], 0], points[[parent, child], 1], style, color=colour, lw=0.9, alpha=0.9)
    axis.scatter(points[:, 0], points[:, 1], s=4, c=colour, zorder=3)


def keypoint_grid(rows: list[dict], view_names: tuple[str, ...], path: str | Path, title: str = "") -> Path:
    """One row per entry ``{"label", "images" (V, 3, R, R), "estimate" (V, 22, 2) or None, "truth" (V, 22, 2)}``:
    the images with the true skeleton (green, dashed) and the estimated one (red)."""
    views = len(view_names)
    figure, axes = plt.subplots(len(rows), views, figsize=(1.6 * views, 1.7 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for v in range(views):
            axis = axes[r][v]
            axis.imshow(row["images"][v].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            if row.get("truth") is not None:
                _draw_skeleton(axis, row["truth"][v], TRUTH_COLOUR, "--")
            if row.get("estimate") is not None:
                _draw_skeleton(axis, row["estimate"][v], ESTIMATE_COLOUR, "-")
            axis.set_xticks([])
            axis.set_yticks([])
            size = row["images"].shape[-1]
            axis.set_xlim(-0.5, size - 0.5)
            axis.set_ylim(size - 0.5, -0.5)
            if r == 0:
                axis.set_title(view_names[v], fontsize=8)
            if v == 0:
                axis.set_ylabel(row["label"], fontsize=7)
    return save_figure(figure, path, title and title + "  (green dashed: truth, red: keypoints read from the image)")


def metric_bars(results: dict[str, dict[str, dict]], path: str | Path) -> Path:
    """``results[set][model] = metrics``: bars of PCK@0.05, PCK@0.1 (higher is better) and MPJPE,
    PA-MPJPE in mm (lower is better) for every set and model."""
    groups = [("pck@0.05", "PCK@0.05"), ("pck@0.1", "PCK@0.1"), ("mpjpe", "MPJPE (mm)"), ("pa_mpjpe", "PA-MPJPE (mm)")]
    sets = list(results)
    models = list(next(iter(results.values())))
    figure, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.0))
    width = 0.8 / len(models)
    for axis, (key, label) in zip(axes, groups):
        for m, model in enumerate(models):
            values = [results[s][model][key] for s in sets]
            bars = axis.bar([i + m * width for i in range(len(sets))], values, width, label=model)
            axis.bar_label(bars, fmt="%.2f" if key.startswith("pck") else "%.0f", fontsize=7)
        axis.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(sets))], sets)
        axis.set_title(label, fontsize=9)
    axes[0].legend(fontsize=8)
    return save_figure(figure, path)


def reward_curve(rows: list[dict], path: str | Path, smooth: int = 10) -> Path:
    """Reward (PoseScore) and KL over training steps from the trainer's metrics.jsonl rows, and the
    preservation loss where the run logged one."""
    steps = [r["step"] for r in rows]
    panels = [("reward", "PoseScore (reward)"), ("kl", "KL to the base model (training poses)")]
    if all("preserve_loss" in r for r in rows):
        panels.append(("preserve_loss", "preservation loss (pretraining poses)"))
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3))
    for axis, (key, label) in zip(axes, panels):
        values = torch.tensor([r[key] for r in rows], dtype=torch.float64)
        axis.plot(steps, values, color="#9ab", lw=0.8, label="per step")
        if len(values) >= smooth:
            kernel = torch.ones(smooth, dtype=torch.float64) / smooth
            smoothed = torch.nn.functional.conv1d(values.view(1, 1, -1), kernel.view(1, 1, -1)).flatten()
            axis.plot(steps[smooth - 1 :], smoothed, color="#135", lw=1.6, label=f"mean of {smooth}")
        axis.set_xlabel("optimizer step")
        axis.set_title(label, fontsize=9)
        axis.legend(fontsize=7)
    return save_figure(figure, path)
