"""Two-sample Kolmogorov-Smirnov distance for numeric features (scipy).

The score is the KS statistic D, the largest gap between the two empirical distribution
functions, not its p-value: on windows of thousands of rows the p-value flags differences
too small to matter, while D reads the same whatever the sample sizes.
"""

import numpy as np
from scipy.stats import ks_2samp

from churn_stream.drift.base import DriftResult, finite, is_constant, register

DEFAULT_THRESHOLD = 0.1


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
    score = float(ks_2samp(reference, current).statistic)
    drifted = score > threshold and not is_constant(reference)
    return DriftResult("ks", score, threshold, drifted, reference.size, current.size)
