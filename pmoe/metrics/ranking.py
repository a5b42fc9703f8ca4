"""AUROC, AP and F1-max, exactly as scikit-learn defines them, from one sort.

The scores are split by ground truth and each part sorted once (:class:`RankedScores`). At
each distinct score ``v`` of the positives, ``tp(v)`` (positives >= v) comes from run lengths
and ``fp(v)`` (negatives >= v) from a binary search, which is all the three metrics need:

- AUROC (``roc_auc_score``): the trapezoid area of the ROC curve over distinct thresholds,
  i.e. the Mann-Whitney statistic with ties counted one half, summed in exact integers.
- AP (``average_precision_score``): ``sum over thresholds of (recall step) * precision``;
  only thresholds that hold a positive have a recall step.
- F1-max (as AnomalyCLIP computes it from ``precision_recall_curve``): the largest
  ``2 tp / (tp + fp + P)``; it is reached at a threshold that holds a positive.

Memory stays linear in the number of scores: no threshold-by-sample matrix is ever built.
Image metrics pool the images of a class; pixel metrics pool every pixel of every image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pmoe.metrics.arrays import (binary_array, cumulative, like, run_lengths, scores_array,
                                 searchsorted, sort, to_numpy)
from pmoe.metrics.regions import region_weights
from pmoe.metrics.result import UndefinedMetricError


@dataclass(frozen=True)
class RankedScores:
    """Scores split by ground truth, each part sorted ascending: the one sort metrics share.

    ``negatives`` and ``positives`` stay on their backend (NumPy, or a torch device);
    ``positive_mass`` (NumPy float64, PRO only) holds the running sums, with a leading zero, of
    the positives' region weights in the order of ``positives``. ``unit`` names a sample
    ("image" or "pixel") in the reasons of undefined metrics.
    """

    negatives: Any
    positives: Any
    unit: str
    positive_mass: np.ndarray | None = None

    @classmethod
    def build(cls, labels, scores, unit: str, positive_weights: np.ndarray | None = None):
        """Split validated ``scores`` by boolean ``labels`` and sort each part."""
        negatives = sort(scores[~labels])
        if positive_weights is None:
            return cls(negatives, sort(scores[labels]), unit)
        positives, order = sort(scores[labels], with_order=True)
        mass = to_numpy(cumulative(like(positive_weights, scores)[order]))
        return cls(negatives, positives, unit, mass)

    @property
    def n_negatives(self) -> int:
        """Number of negative samples."""
        return len(self.negatives)

    @property
    def n_positives(self) -> int:
        """Number of positive samples."""
        return len(self.positives)

    def score_range(self):
        """The smallest and largest score as NumPy scalars of the scores' dtype."""
        ends = np.concatenate([to_numpy(part[[0, -1]]) for part in (self.negatives, self.positives)
                               if len(part)])
        return ends.min(), ends.max()

    def negatives_above(self, thresholds, inclusive: bool) -> np.ndarray:
        """Number of negatives with score >= (``inclusive``) or > each threshold."""
        return self.n_negatives - searchsorted(self.negatives, thresholds, _side(inclusive))

    def positive_mass_above(self, thresholds, inclusive: bool) -> np.ndarray:
        """Summed weight of the positives with score >= (``inclusive``) or > each threshold."""
        below = searchsorted(self.positives, thresholds, _side(inclusive))
        return self.positive_mass[-1] - self.positive_mass[below]

    def require_both_labels(self) -> None:
        """Raise :class:`UndefinedMetricError` unless both labels are present."""
        if self.n_positives == 0:
            raise UndefinedMetricError(f"no anomalous {self.unit}: the metric needs both labels")
        if self.n_negatives == 0:
            raise UndefinedMetricError(f"no normal {self.unit}: the metric needs both labels")


def _side(inclusive: bool) -> str:
    """The ``searchsorted`` side that leaves the scores >= (inclusive) or > a query above it."""
    return "left" if inclusive else "right"


def rank_images(labels, scores) -> RankedScores:
    """Validate one score and one 0/1 label per image, and rank them."""
    scores = scores_array(scores, "scores", ndim=1)
    return RankedScores.build(binary_array(labels, "labels", scores), scores, "image")


def rank_pixels(masks, maps, with_regions: bool = False) -> RankedScores:
    """Validate (N, H, W) masks and maps and rank all their pixels pooled.

    With ``with_regions`` the anomalous pixels carry their PRO region weights.
    """
    maps = scores_array(maps, "maps", ndim=3)
    masks = binary_array(masks, "masks", maps)
    weights = region_weights(to_numpy(masks)) if with_regions else None
    return RankedScores.build(masks, maps, "pixel", weights)


def _operating_points(ranked: RankedScores):
    """At each distinct positive score: its count, tp (positives >=), fp >= and fp >."""
    ranked.require_both_labels()
    values, counts = run_lengths(ranked.positives)
    true_positives = ranked.n_positives - (np.cumsum(counts) - counts)
    return (counts, true_positives, ranked.negatives_above(values, inclusive=True),
            ranked.negatives_above(values, inclusive=False))


def auroc_of(ranked: RankedScores) -> float:
    """Area under the ROC curve (ties count one half, as the trapezoid rule gives)."""
    counts, _, fp_at_least, fp_above = _operating_points(ranked)
    n = ranked.n_negatives
    twice_wins = np.sum(counts * (2 * n - fp_at_least - fp_above))
    return float(twice_wins / (2 * ranked.n_positives * n))


def average_precision_of(ranked: RankedScores) -> float:
    """Step-wise average precision: sum of (recall step) * precision over thresholds."""
    counts, tp, fp_at_least, _ = _operating_points(ranked)
    return float(np.sum(counts * (tp / (tp + fp_at_least))) / ranked.n_positives)


def f1_max_of(ranked: RankedScores) -> float:
    """The best F1 score over all thresholds."""
    _, tp, fp_at_least, _ = _operating_points(ranked)
    return float(np.max(2 * tp / (tp + fp_at_least + ranked.n_positives)))


def image_auroc(labels, scores) -> float:
    """Image AUROC of one class: ``labels`` 0/1 per image, ``scores`` the image scores."""
    return auroc_of(rank_images(labels, scores))


def image_ap(labels, scores) -> float:
    """Image average precision of one class (scikit-learn's step-wise definition)."""
    return average_precision_of(rank_images(labels, scores))


def f1_max(labels, scores) -> float:
    """Image F1-max of one class: the best F1 over every threshold on the image scores."""
    return f1_max_of(rank_images(labels, scores))


def pixel_auroc(masks, maps) -> float:
    """Pixel AUROC of one class over all pixels of all its (N, H, W) maps pooled."""
    return auroc_of(rank_pixels(masks, maps))


def pixel_ap(masks, maps) -> float:
    """Pixel average precision of one class over all pixels pooled."""
    return average_precision_of(rank_pixels(masks, maps))


def pixel_f1_max(masks, maps) -> float:
    """Pixel F1-max of one class over all pixels pooled."""
    return f1_max_of(rank_pixels(masks, maps))
