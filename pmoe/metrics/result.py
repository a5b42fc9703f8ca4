"""A metric's value, or why it has none.

Each metric raises :class:`UndefinedMetricError` when the data leave it undefined (a class with
one label only, no anomalous region, no normal pixel, too few thresholds below the FPR limit).
:func:`pmoe.metrics.class_metrics` turns that into ``MetricResult(nan, reason)``: an undefined
metric is reported as missing with its reason, never as 0 and never as a crash.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from pmoe.errors import DataError


class UndefinedMetricError(DataError):
    """The metric has no value on these data; the message is the reason."""


class MetricResult(NamedTuple):
    """A metric as a fraction in [0, 1], or NaN with the reason it is undefined."""

    value: float
    reason: str = ""

    @property
    def defined(self) -> bool:
        """True when the metric has a value."""
        return not math.isnan(self.value)
