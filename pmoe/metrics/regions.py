"""Anomalous regions of the ground truth: the 8-connected components of each mask.

PRO averages the overlap over regions, so each anomalous pixel weighs
``1 / (number of regions of the class * size of its region)``; the weights are computed once
per class (one labelling of the whole stack), never inside a threshold loop.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# 8-connectivity inside each (H, W) mask and none across masks of the (N, H, W) stack.
IN_PLANE_8_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE_8_CONNECTED[1] = True


def region_weights(masks: np.ndarray) -> np.ndarray:
    """PRO weight of every anomalous pixel, in the order of ``masks[masks]`` (row-major).

    ``masks`` is a boolean (N, H, W) array; the weights sum to 1 (empty when no region).
    """
    anomalous = masks[masks.any(axis=(1, 2))]  # images without defects hold no region
    regions, count = ndimage.label(anomalous, structure=IN_PLANE_8_CONNECTED)
    region_of_pixel = regions[anomalous]
    sizes = np.bincount(region_of_pixel)
    return 1.0 / (count * sizes[region_of_pixel].astype(np.float64))
