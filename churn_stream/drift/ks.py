"""Two-sample Kolmogorov-Smirnov distance for numeric features.

The score is the KS statistic D, the largest gap between the two empirical distribution
functions, not its p-value: on windows of thousands of rows the p-value flags differences
too small to matter, while D reads the same whatever the sample sizes.

D is computed here from two sorted samples rather than by ``scipy.stats.ks_2samp``, which
always computes a p-value as well: for a window of 5,000 rows that p-value cost 2 to 15 ms a
feature, and with a hundred numeric features it took 88% of the predictor's time in the
throughput benchmark. The tests hold this D equal to scipy's.
"""

import numpy as np

from churn_stream.drift.base import DriftResult, finite, is_constant, register

DEFAULT_THRESHOLD = 0.1


def ks_statistic(sorted_reference: np.ndarray, current: np.ndarray) -> float:
    """D between ``sorted_reference`` (ascending, finite, non-empty) and ``current``."""
    current = np.sort(current)
    points = np.concatenate([sorted_reference, current])
    reference_cdf = np.searchsorted(sorted_reference, points, side="right") / sorted_reference.size
    current_cdf = np.searchsorted(current, points, side="right") / current.size
    return float(np.max(np.abs(reference_cdf - current_cdf)))


@register("ks")
def ks(
    reference: np.ndarray, current: np.ndarray, threshold: float = DEFAULT_THRESHOLD
) -> DriftResult:
    """KS distance of ``current`` from ``reference``; empty samples score 0 and never drift.

    >>> rng = np.random.default_rng(0)
    >>> ks(rng.normal(size=2000), rng.normal(size=2000)).drifted
    False
    """
    reference, current = finite(reference), finite(current)
    if reference.size == 0 or current.size == 0:
        return DriftResult("ks", 0.0, threshold, False, reference.size, current.size)
    score = ks_statistic(np.sort(reference), current)
    drifted = score > threshold and not is_constant(reference)
    return DriftResult("ks", score, threshold, drifted, reference.size, current.size)
