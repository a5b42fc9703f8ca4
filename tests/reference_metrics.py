"""Slow, obviously correct metric references, and the synthetic classes they are checked on.

The fast metrics of :mod:`pmoe.metrics` must equal these to 1e-6 (tests/test_metrics.py) and
are timed against them (benchmarks/metrics.py imports this module). They follow the
definitions literally: a loop over thresholds that labels the masks with
``skimage.measure.label`` at every threshold, as the literature's code does; the MVTec AD
sort-and-cumulate AU-PRO; a loop over every distinct score for the exact PRO curve; and
scikit-learn for AUROC, AP and F1-max.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import measure
from sklearn.metrics import auc, precision_recall_curve
from tqdm import tqdm


def aupro_anomalyclip_loop(masks, maps, fpr_limit=0.3, steps=200, progress=False):
    """The literature's AU-PRO: 200 thresholds, the masks relabelled at every threshold."""
    masks = np.asarray(masks).astype(bool)
    normal = ~masks
    low, high = maps.min(), maps.max()
    fprs, pros = [], []
    for threshold in tqdm(np.arange(low, high, (high - low) / steps), disable=not progress,
                          desc="reference threshold loop"):
        positive = maps > threshold
        overlaps = []
        for mask, image_positive in zip(masks, positive):
            regions = measure.label(mask, connectivity=2)
            for region in range(1, regions.max() + 1):
                overlaps.append(image_positive[regions == region].mean())
        fprs.append((normal & positive).sum() / normal.sum())
        pros.append(np.mean(overlaps))
    fprs, pros = np.array(fprs), np.array(pros)
    kept = fprs < fpr_limit
    fprs = fprs[kept]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return auc(fprs, pros[kept])


def aupro_exact_sorted(masks, maps, fpr_limit=0.3):
    """The MVTec AD AU-PRO: per-pixel curve increments, sorted by score and accumulated."""
    masks = np.asarray(masks).astype(bool)
    fpr_step = np.zeros(masks.shape)
    pro_step = np.zeros(masks.shape)
    fpr_step[~masks] = 1.0 / (~masks).sum()
    regions = [ndimage.label(mask, structure=np.ones((3, 3)))[0] for mask in masks]
    count = sum(int(r.max()) for r in regions)
    for image, image_regions in enumerate(regions):
        for region in range(1, image_regions.max() + 1):
            inside = image_regions == region
            pro_step[image][inside] = 1.0 / (count * inside.sum())
    order = np.argsort(maps, axis=None, kind="stable")[::-1]
    scores = maps.ravel()[order]
    fprs = np.cumsum(fpr_step.ravel()[order])
    pros = np.cumsum(pro_step.ravel()[order])
    last_of_tie = np.append(np.diff(scores) != 0, True)
    fprs = np.concatenate([[0.0], fprs[last_of_tie]])
    pros = np.concatenate([[0.0], pros[last_of_tie]])
    return trapezoid_up_to(fprs, pros, fpr_limit) / fpr_limit


def aupro_exact_loop(masks, maps, fpr_limit=0.3):
    """The exact AU-PRO by definition: one curve point per distinct score (tiny inputs only)."""
    masks = np.asarray(masks).astype(bool)
    regions = [measure.label(mask, connectivity=2) for mask in masks]
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        positive = maps >= threshold
        overlaps = [positive[i][labels == r].mean()
                    for i, labels in enumerate(regions) for r in range(1, labels.max() + 1)]
        fprs.append((positive & ~masks).sum() / (~masks).sum())
        pros.append(np.mean(overlaps))
    return trapezoid_up_to(np.array(fprs), np.array(pros), fpr_limit) / fpr_limit


def trapezoid_up_to(x, y, limit):
    """Trapezoid area under (x, y), x non-decreasing, up to ``limit`` (interpolated there)."""
    inside = x <= limit
    area = np.sum((x[inside][1:] - x[inside][:-1]) * (y[inside][1:] + y[inside][:-1]) / 2)
    if limit not in x:
        after = np.searchsorted(x, limit, side="right")
        y_limit = y[after - 1] + (y[after] - y[after - 1]) * (limit - x[after - 1]) / (
            x[after] - x[after - 1])
        area += (limit - x[after - 1]) * (y_limit + y[after - 1]) / 2
    return area


def f1_max_sklearn(labels, scores):
    """F1-max as AnomalyCLIP computes it from scikit-learn's precision-recall curve."""
    precision, recall, _ = precision_recall_curve(np.ravel(labels), np.ravel(scores))
    with np.errstate(invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return np.max(f1[np.isfinite(f1)])


def synthetic_class(rng, n_images=8, height=64, width=48, anomalous_fraction=0.5,
                    blobs=(1, 3), radius=(2, 10), dtype=np.float32):
    """A class of images with random elliptic defects and maps that partly find them.

    Returns (labels, scores, masks, maps): per-image 0/1 labels and max-of-map scores, and
    (N, H, W) boolean masks and smooth float maps that are higher on the defects. Unless
    ``anomalous_fraction`` is 0 or 1, the first image is anomalous and the last one normal.
    """
    rows, cols = np.mgrid[:height, :width]
    masks = np.zeros((n_images, height, width), dtype=bool)
    labels = rng.random(n_images) < anomalous_fraction
    labels[[0, -1]] = [anomalous_fraction > 0, anomalous_fraction == 1]
    for image in np.flatnonzero(labels):
        for _ in range(rng.integers(blobs[0], blobs[1] + 1)):
            center = rng.uniform((0, 0), (height, width))
            radii = rng.uniform(radius[0], radius[1], size=2)
            masks[image] |= (((rows - center[0]) / radii[0]) ** 2
                             + ((cols - center[1]) / radii[1]) ** 2) <= 1
    labels = masks.any(axis=(1, 2))
    noise = ndimage.gaussian_filter(rng.normal(size=masks.shape), sigma=(0, 3, 3))
    signal = ndimage.gaussian_filter(masks.astype(float), sigma=(0, 2, 2))
    maps = (signal + 2 * noise).astype(dtype)
    return labels, maps.max(axis=(1, 2)), masks, maps
