"""drpose_kernels: the PoseScore reward as a fused, drop-in op.

    from drpose_kernels import pose_score
    reward = pose_score(logits, segments, weights, sigma=2.0, num_views=6)  # (B,) float32, <= 0

``heatmap_divergence`` gives the per-(row, channel) divergences; ``PoseScore`` is the module form;
``reference`` holds the pure-PyTorch ground truth. Backends: "triton" (fused, CUDA, or CPU under
TRITON_INTERPRET=1), "reference", "auto" (fused on CUDA, reference otherwise).
"""

from . import reference
from .pose_score_op import HAS_TRITON, HeatmapDivergenceFunction, PoseScore, heatmap_divergence, pose_score
from .reference import heatmap_targets

__all__ = [
    "HAS_TRITON",
    "HeatmapDivergenceFunction",
    "PoseScore",
    "heatmap_divergence",
    "heatmap_targets",
    "pose_score",
    "reference",
]
