"""Drift of the served score: PSI of live scores against the scores of the training rows."""

import numpy as np

from churn_stream.drift.base import DriftResult
from churn_stream.drift.psi import DEFAULT_BINS, DEFAULT_THRESHOLD, psi

SCORE_FEATURE = "__score__"
"""The ``feature`` name under which score drift is stored in ``drift_reports``."""


def score_drift(
    reference_scores: np.ndarray, current_scores: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD, max_bins: int = DEFAULT_BINS,
) -> DriftResult:
    """PSI of ``current_scores`` against ``reference_scores``, named ``score_psi``."""
    result = psi(reference_scores, current_scores, threshold, max_bins)
    return DriftResult("score_psi", result.score, result.threshold, result.drifted,
                       result.n_reference, result.n_current)
