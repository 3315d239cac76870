"""The half-cosine learning-rate factor shared by the trainer and the tiny world's build."""

from __future__ import annotations

import math


def half_cosine(progress: float, floor: float = 0.0) -> float:
    """1 at ``progress`` 0, falling along a half cosine to ``floor`` at 1 (and staying there after)."""
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
