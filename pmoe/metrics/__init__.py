"""Evaluation metrics of the paper (spec section 7), exact and fast.

Usage::

    from pmoe.metrics import class_metrics, aupro
    results = class_metrics(labels, scores, masks, maps)   # {name: MetricResult(value, reason)}
    aupro(masks, maps, mode="exact")                        # MVTec AD AU-PRO

Image AUROC/AP/F1-max pool the images of a class; pixel AUROC/AP/F1-max pool every pixel of
every image; PRO has the literature's 200-threshold mode and the exact MVTec mode. Inputs may
be NumPy arrays or torch tensors (a GPU tensor is processed on its device).
"""

from pmoe.metrics.pro import PRO_MODES, aupro
from pmoe.metrics.ranking import (f1_max, image_ap, image_auroc, pixel_ap, pixel_auroc,
                                  pixel_f1_max)
from pmoe.metrics.result import MetricResult, UndefinedMetricError
from pmoe.metrics.summary import IMAGE_METRICS, KINDS, PIXEL_METRICS, class_metrics

__all__ = [
    "IMAGE_METRICS", "KINDS", "PIXEL_METRICS", "PRO_MODES", "MetricResult",
    "UndefinedMetricError", "aupro", "class_metrics", "f1_max", "image_ap", "image_auroc",
    "pixel_ap", "pixel_auroc", "pixel_f1_max",
]
