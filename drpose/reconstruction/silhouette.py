"""Silhouettes of generated views: which pixels show the body, robust to the soft edges of decoded images.

A pixel's *background distance* is how far its colour is from the view's background colour, averaged over
the RGB image and the normal map (the background colour of each is the median of the image's border
pixels, so white, black or grey backgrounds all work). Otsu's threshold (scikit-image) splits the
distances of all views of a sample into background and body. The soft mask maps the background level to 0
and the threshold to 0.5: a decoded edge pixel that blends body and background gets about its coverage,
so the 0.5 level of the bilinearly sampled mask lies where the edge is, to a fraction of a pixel. Specks
(connected blobs smaller than ``min_blob`` of the largest one) are dropped.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def border_colour(image: np.ndarray) -> np.ndarray:
    """Median colour (C,) of the outermost pixel ring of an (R, R, C) image."""
    ring = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    return np.median(ring, axis=0)


def background_distance(rgb: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """(V, R, R) distance of every pixel from its view's background, averaged over the two domains; each
    domain's distance is divided by the largest distance from its background colour in the unit cube, so
    both weigh alike."""
    out = []
    for domain in (rgb, normal):
        per_view = []
        for image in domain:
            background = border_colour(image)
            farthest = np.linalg.norm(np.maximum(background, 1 - background))
            per_view.append(np.linalg.norm(image - background, axis=-1) / max(farthest, 1e-6))
        out.append(np.stack(per_view))
    return 0.5 * (out[0] + out[1])


def soft_silhouettes(rgb: np.ndarray, normal: np.ndarray, min_blob: float = 0.02) -> tuple[np.ndarray, float]:
    """Soft masks (V, R, R) in [0, 1] of the views (images (V, R, R, 3) in [0, 1], camera layout) and the
    Otsu threshold used."""
    from skimage.filters import threshold_otsu

    distance = background_distance(rgb, normal)
    if np.ptp(distance) < 1e-6:
        raise ValueError("views: every pixel has the background colour, there is no body to reconstruct")
    threshold = float(threshold_otsu(distance))
    background_level = float(np.median(distance[distance < threshold]))
    soft = np.clip(0.5 * (distance - background_level) / max(threshold - background_level, 1e-6), 0.0, 1.0)
    for view in range(len(soft)):
        labels, count = ndimage.label(soft[view] >= 0.5)
        if count > 1:
            sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, count + 1))
            specks = np.flatnonzero(sizes < min_blob * sizes.max()) + 1
            # Zero a speck and its soft rim, so it leaves no partial values behind.
            speck_area = ndimage.binary_dilation(np.isin(labels, specks), iterations=1) & ~np.isin(labels, np.flatnonzero(sizes >= min_blob * sizes.max()) + 1)
            soft[view][speck_area] = 0.0
    return soft, threshold
