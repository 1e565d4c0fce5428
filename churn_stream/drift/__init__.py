"""Drift of live traffic against a model's training data, and when to retrain because of it.

One small module per statistic, each registered in ``REGISTRY`` and returning a
``DriftResult`` (score, threshold, drifted): ``psi.psi``, ``ks.ks``; ``score_drift`` compares the
served scores. ``ReferenceProfile`` compares windows of live rows with a model's reference;
``DriftPolicy`` decides when drift is confirmed.
"""

from churn_stream.drift import ks, psi  # noqa: F401  (registers the statistics)
from churn_stream.drift.base import REGISTRY, DriftResult
from churn_stream.drift.monitor import (
    DriftWindow,
    FeatureDrift,
    ReferenceProfile,
    Thresholds,
    WindowReport,
)
from churn_stream.drift.policy import DriftPolicy, Verdict
from churn_stream.drift.score import SCORE_FEATURE, score_drift

__all__ = [
    "REGISTRY", "SCORE_FEATURE", "DriftPolicy", "DriftResult", "DriftWindow", "FeatureDrift",
    "ReferenceProfile", "Thresholds", "Verdict", "WindowReport", "score_drift",
]
