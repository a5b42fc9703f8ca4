"""Every metric of one class in one call, from one sort of its images and one of its pixels.

``class_metrics`` is what the evaluation engine calls per class. An undefined metric is
``MetricResult(nan, reason)``; values are fractions in [0, 1] (reports show percent).
Datasets without masks get ``kind="image"``, datasets with only anomalous images
``kind="pixel"`` (spec section 7).
"""

from __future__ import annotations

import math

from pmoe.errors import ConfigError
from pmoe.metrics.pro import aupro_of, check_pro_options
from pmoe.metrics.ranking import (auroc_of, average_precision_of, f1_max_of, rank_images,
                                  rank_pixels)
from pmoe.metrics.result import MetricResult, UndefinedMetricError

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pro")
KINDS = {"image": IMAGE_METRICS, "pixel": PIXEL_METRICS, "both": IMAGE_METRICS + PIXEL_METRICS}
RANKING_METRICS = (auroc_of, average_precision_of, f1_max_of)


def class_metrics(labels=None, scores=None, masks=None, maps=None, *, kind: str = "both",
                  pro_mode: str = "anomalyclip", fpr_limit: float = 0.3,
                  steps: int = 200) -> dict[str, MetricResult]:
    """The metrics of one class, named as in :data:`KINDS` ``[kind]``, in that order.

    ``labels`` (0/1) and ``scores`` hold one value per image (needed for image metrics);
    ``masks`` (0/1) and ``maps`` are (N, H, W) (needed for pixel metrics and PRO).
    ``pro_mode``, ``fpr_limit`` and ``steps`` are those of :func:`pmoe.metrics.aupro`.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown metric kind {kind!r}; use one of {tuple(KINDS)}")
    check_pro_options(pro_mode, fpr_limit, steps)
    results = {}
    if kind != "pixel":
        _require(labels, scores, "labels and scores", "image")
        ranked = rank_images(labels, scores)
        results.update({name: _result(metric, ranked)
                        for name, metric in zip(IMAGE_METRICS, RANKING_METRICS)})
    if kind != "image":
        _require(masks, maps, "masks and maps", "pixel")
        ranked = rank_pixels(masks, maps, with_regions=True)
        results.update({name: _result(metric, ranked)
                        for name, metric in zip(PIXEL_METRICS, RANKING_METRICS)})
        results["pro"] = _result(aupro_of, ranked, mode=pro_mode, fpr_limit=fpr_limit, steps=steps)
    return results


def _require(truth, scores, names: str, level: str) -> None:
    """Raise :class:`ConfigError` when the inputs of the ``level`` metrics are missing."""
    if truth is None or scores is None:
        other = "image" if level == "pixel" else "pixel"
        raise ConfigError(f"{level} metrics need {names}; pass them or use kind={other!r}")


def _result(metric, *args, **kwargs) -> MetricResult:
    """Run ``metric``; an undefined metric becomes NaN with its reason."""
    try:
        return MetricResult(metric(*args, **kwargs))
    except UndefinedMetricError as undefined:
        return MetricResult(math.nan, str(undefined))
