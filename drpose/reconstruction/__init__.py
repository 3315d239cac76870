"""Single image to 3D human: generated views -> a watertight coloured mesh, and its accuracy against the truth."""

from .reconstruct import (METRICS, Reconstruction, ReconstructionSettings, SampleScore, oracle_views, reconstruct,
                          reconstruct_and_score)
from .surface import CapsuleSurface

__all__ = ["METRICS", "CapsuleSurface", "Reconstruction", "ReconstructionSettings", "SampleScore", "oracle_views",
           "reconstruct", "reconstruct_and_score"]
