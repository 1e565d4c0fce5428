"""Quality figures of churn scores against known outcomes."""

import numpy as np
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

from churn_stream.errors import NotEnoughData

EPSILON = 1e-6
"""Scores are kept this far from 0 and 1 so that log loss stays finite."""


def classification_metrics(y: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """ROC-AUC, PR-AUC (average precision), Brier score and log loss of ``score`` on ``y``."""
    y = np.asarray(y).astype(int)
    if y.size == 0 or y.min() == y.max():
        raise NotEnoughData(f"metrics need both outcomes; got {int(y.sum())} churned of {y.size}")
    p = np.clip(np.asarray(score, dtype=np.float64), EPSILON, 1 - EPSILON)
    return {
        "roc_auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        "brier": float(brier_score_loss(y, p)),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
    }


def mean_log_loss(y: np.ndarray, score: np.ndarray) -> float:
    """Log loss without the checks, for searching blend weights."""
    p = np.clip(score, EPSILON, 1 - EPSILON)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
