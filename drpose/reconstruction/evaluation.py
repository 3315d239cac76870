"""Reconstruction metrics of a batch for the evaluator and the report: per-sample scores, summaries, figures.

    batch = score_batch(rgb, normal, joints, rig)          # generated views in the model's layout
    oracle = score_batch(*oracle_views(joints, rig, R), joints, rig)
    batch.summary()   # {"chamfer": mean over the reconstructed samples, ..., "failures": n, "samples": B}
    mesh_comparison([{"truth": truth_mesh(j), "base": m0, "fine-tuned": m1}, ...], "meshes.png")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import trimesh

from drpose.models.rig import ViewRig

from .mesh import turntable_images
from .reconstruct import METRICS, ReconstructionSettings, SampleScore, reconstruct_and_score

SUMMARY_METRICS = METRICS + ("seconds",)


@dataclass
class BatchScores:
    """Scores of every sample of a batch, in order."""

    samples: list[SampleScore]

    def select(self, index) -> "BatchScores":
        """The samples at ``index`` (a boolean mask or indices)."""
        picked = np.arange(len(self.samples))[np.asarray(index)]
        return BatchScores([self.samples[i] for i in picked])

    @property
    def failures(self) -> int:
        return sum(s.reconstruction is None for s in self.samples)

    def metric(self, name: str) -> np.ndarray:
        return np.array([s.metrics.get(name, math.nan) for s in self.samples], dtype=np.float64)

    def summary(self) -> dict:
        """Means over the samples that were reconstructed, the number that were not, and the sample count."""
        out = {}
        for name in SUMMARY_METRICS:
            values = self.metric(name)
            values = values[np.isfinite(values)]
            out[name] = float(values.mean()) if len(values) else math.nan
        out["failures"] = self.failures
        out["samples"] = len(self.samples)
        return out

    def meshes(self, count: int | None = None) -> list[trimesh.Trimesh | None]:
        return [None if s.reconstruction is None else s.reconstruction.mesh for s in self.samples[:count]]


def score_batch(rgb, normal, joints, rig: ViewRig, settings: ReconstructionSettings | None = None,
                num_samples: int = 10000, executor=None) -> BatchScores:
    """Reconstruct and score generated body views (B, 6, 3, R, R), model layout, of bodies ``joints`` (B, 22, 3)
    (on ``executor``, a :func:`~drpose.reconstruction.reconstruct.reconstruction_pool`, when given)."""
    return BatchScores(reconstruct_and_score(rgb, normal, joints, rig, settings=settings, num_samples=num_samples,
                                             executor=executor))


def truth_mesh(joints, sections: int = 24) -> trimesh.Trimesh:
    """A display mesh of the true capsule body (B = 1 joints (22, 3)), coloured by part as the renderer colours it."""
    from drpose.render import PART_COLOURS, body_capsules

    starts, ends, radii = body_capsules(torch.as_tensor(joints, dtype=torch.float64).reshape(1, -1, 3))
    parts = []
    for k, (a, b, r) in enumerate(zip(starts[0].numpy(), ends[0].numpy(), radii.numpy())):
        length = float(np.linalg.norm(b - a))
        part = trimesh.creation.capsule(height=length, radius=float(r), count=[sections, sections])
        axis = (b - a) / length if length > 0 else np.array([0.0, 0.0, 1.0])
        transform = trimesh.geometry.align_vectors([0.0, 0.0, 1.0], axis)
        transform[:3, 3] = (a + b) / 2
        part.apply_transform(transform)
        colour = np.append(np.rint(PART_COLOURS[k].numpy() * 255), 255).astype(np.uint8)
        part.visual.vertex_colors = np.tile(colour, (len(part.vertices), 1))
        parts.append(part)
    return trimesh.util.concatenate(parts)


def mesh_comparison(rows: list[dict[str, trimesh.Trimesh | None]], path: str | Path, angles: int = 3, size: int = 128,
                    title: str = "", labels: list[str] | None = None) -> Path:
    """One row per sample (labelled ``labels``, default ``#0, #1, ...``), one column group per named mesh (e.g.
    truth, base, fine-tuned), each seen from ``angles`` azimuths; a missing mesh (failed reconstruction) is a
    blank labelled panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from drpose.evaluation.figures import save_figure

    names = list(rows[0])
    figure, axes = plt.subplots(len(rows), len(names) * angles, figsize=(1.1 * len(names) * angles, 1.6 * len(rows)),
                                squeeze=False)
    for r, row in enumerate(rows):
        for n, name in enumerate(names):
            images = turntable_images(row[name], size, angles) if row[name] is not None else [None] * angles
            for a, image in enumerate(images):
                axis = axes[r][n * angles + a]
                if image is not None:
                    axis.imshow(image, interpolation="bilinear")
                else:
                    axis.text(0.5, 0.5, "failed", ha="center", va="center", fontsize=7, transform=axis.transAxes)
                axis.set_xticks([])
                axis.set_yticks([])
                if r == 0 and a == 0:
                    axis.set_title(name, fontsize=8, loc="left")
                if n == 0 and a == 0:
                    axis.set_ylabel(labels[r] if labels else f"#{r}", fontsize=7)
    return save_figure(figure, path, title)


def markdown_rows(set_name: str, summaries: dict[str, dict]) -> list[str]:
    """Table rows ``| set | model | Chamfer | P2S | S2P | NC | F@1cm | F@2cm | PSNR | SSIM | failed |`` for
    ``summaries[model] = BatchScores.summary()``."""
    return [f"| {set_name} | {model} | {m['chamfer']:.2f} | {m['p2s']:.2f} | {m['s2p']:.2f} | "
            f"{m['normal_consistency']:.3f} | {m['fscore@1cm']:.3f} | {m['fscore@2cm']:.3f} | {m['psnr']:.2f} | "
            f"{m['ssim']:.3f} | {m['failures']}/{m['samples']} |" for model, m in summaries.items()]


TABLE_HEADER = ["| set | model | Chamfer (cm) | P2S (cm) | S2P (cm) | normal consistency | F@1cm | F@2cm | PSNR (dB) | SSIM | failed |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
