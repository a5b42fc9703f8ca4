"""AU-PRO, the per-region overlap integrated over the false-positive rate (spec section 7).

PRO at a threshold is the mean, over every 8-connected ground-truth region of every image of
a class, of the fraction of the region's pixels scored above the threshold; FPR is the
fraction of all anomaly-free pixels scored above it. Two integrations are offered:

- ``mode="anomalyclip"``, the number the literature (and Table 1 of the paper) reports:
  thresholds ``numpy.arange(min, max, (max - min) / steps)``, a pixel positive when
  ``score > threshold``, keep the thresholds with FPR < ``fpr_limit``, min-max rescale the
  kept FPRs to [0, 1], trapezoid rule.
- ``mode="exact"``, the MVTec AD definition: the exact curve through every distinct score,
  integrated up to ``fpr_limit`` (interpolating at the limit) and divided by ``fpr_limit``.

Both read PRO and FPR at any threshold off one sort of the class's pixels (see
:class:`pmoe.metrics.ranking.RankedScores`) with regions labelled once, instead of
thresholding and labelling the maps once per threshold.
"""

from __future__ import annotations

import numpy as np

from pmoe.errors import ConfigError
from pmoe.metrics.arrays import like, run_lengths
from pmoe.metrics.ranking import RankedScores, rank_pixels
from pmoe.metrics.result import UndefinedMetricError

PRO_MODES = ("anomalyclip", "exact")


def aupro(masks, maps, *, mode: str = "anomalyclip", fpr_limit: float = 0.3,
          steps: int = 200) -> float:
    """AU-PRO of one class from (N, H, W) 0/1 ``masks`` and float ``maps``.

    ``steps`` is the number of thresholds of ``mode="anomalyclip"`` (unused by "exact").
    Raises :class:`UndefinedMetricError` when the data leave it undefined.
    """
    check_pro_options(mode, fpr_limit, steps)
    return aupro_of(rank_pixels(masks, maps, with_regions=True), mode=mode,
                    fpr_limit=fpr_limit, steps=steps)


def check_pro_options(mode: str, fpr_limit: float, steps: int) -> None:
    """Raise :class:`ConfigError` for an unknown mode or an out-of-range limit or step count."""
    if mode not in PRO_MODES:
        raise ConfigError(f"unknown PRO mode {mode!r}; use one of {PRO_MODES}")
    if not 0 < fpr_limit <= 1:
        raise ConfigError(f"fpr_limit must lie in (0, 1], got {fpr_limit}")
    if int(steps) != steps or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps}")


def aupro_of(ranked: RankedScores, *, mode: str, fpr_limit: float, steps: int) -> float:
    """AU-PRO from pixels ranked with their region weights (``rank_pixels(..., True)``)."""
    if ranked.n_positives == 0:
        raise UndefinedMetricError("no anomalous region in the masks: PRO needs at least one")
    if ranked.n_negatives == 0:
        raise UndefinedMetricError("no normal pixel in the masks: the FPR is undefined")
    if mode == "anomalyclip":
        return _aupro_anomalyclip(ranked, fpr_limit, steps)
    return _aupro_exact(ranked, fpr_limit)


def _aupro_anomalyclip(ranked: RankedScores, fpr_limit: float, steps: int) -> float:
    """The literature's 200-threshold AU-PRO with rescaled FPRs."""
    thresholds = like(literature_thresholds(ranked, steps), ranked.negatives)
    fpr = ranked.negatives_above(thresholds, inclusive=False) / ranked.n_negatives
    pro = ranked.positive_mass_above(thresholds, inclusive=False)
    kept = fpr < fpr_limit
    if kept.sum() < 2:
        raise UndefinedMetricError(f"fewer than two of the {len(fpr)} thresholds have FPR < "
                                   f"{fpr_limit}: no area to integrate")
    fpr, pro = fpr[kept], pro[kept]
    span = fpr.max() - fpr.min()
    if span == 0:
        raise UndefinedMetricError(f"every threshold with FPR < {fpr_limit} has the same FPR: "
                                   "the min-max rescale is undefined")
    fpr = (fpr - fpr.min()) / span
    return float(np.sum((fpr[:-1] - fpr[1:]) * (pro[:-1] + pro[1:]) / 2))


def literature_thresholds(ranked: RankedScores, steps: int) -> np.ndarray:
    """``numpy.arange(min, max, (max - min) / steps)`` in the scores' dtype, ascending.

    The thresholds are computed with the very expression of the literature and then expressed
    in the scores' dtype so that ``score > threshold`` keeps NumPy's own comparison: NumPy 1
    rounds a float64 threshold to float32 maps' precision, NumPy 2 compares in float64, which
    for float32 scores equals comparing with the largest float32 not above the threshold.
    """
    low, high = ranked.score_range()
    if low == high:
        raise UndefinedMetricError("every pixel has the same score: no threshold lies between "
                                   "the smallest and the largest score")
    thresholds = np.arange(low, high, (high - low) / steps)
    dtype = low.dtype
    if np.result_type(np.empty(0, dtype), thresholds[0]) == dtype:
        return thresholds.astype(dtype)
    rounded = thresholds.astype(dtype)
    return np.where(rounded > thresholds, np.nextafter(rounded, dtype.type(-np.inf)), rounded)


def _aupro_exact(ranked: RankedScores, fpr_limit: float) -> float:
    """The MVTec AD AU-PRO: the exact curve integrated to ``fpr_limit``, normalised by it.

    The curve is a polyline: at each distinct anomalous-pixel score v (descending) it runs from
    (FPR and PRO of scores > v) to (FPR and PRO of scores >= v), and between two such scores
    PRO stays flat while FPR grows; (0, 0) starts it and (1, 1) ends it.
    """
    values, _ = run_lengths(ranked.positives)
    fprs = [ranked.negatives_above(values, inclusive) / ranked.n_negatives
            for inclusive in (False, True)]
    pros = [ranked.positive_mass_above(values, inclusive) for inclusive in (False, True)]
    fpr = np.concatenate([[0.0], np.stack(fprs, axis=1)[::-1].ravel(), [1.0]])
    pro = np.concatenate([[0.0], np.stack(pros, axis=1)[::-1].ravel(), [ranked.positive_mass[-1]]])
    return area_up_to(fpr, pro, fpr_limit) / fpr_limit


def area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under the polyline (x, y) for x in [x[0], limit]; x is non-decreasing.

    When ``limit`` falls inside a segment, y is linearly interpolated there.
    """
    end = int(np.searchsorted(x, limit, side="right"))
    area = np.sum((x[1:end] - x[:end - 1]) * (y[1:end] + y[:end - 1]) / 2)
    if x[end - 1] < limit:
        fraction = (limit - x[end - 1]) / (x[end] - x[end - 1])
        at_limit = y[end - 1] + fraction * (y[end] - y[end - 1])
        area += (limit - x[end - 1]) * (at_limit + y[end - 1]) / 2
    return float(area)
