"""Live model performance: reported outcomes joined with the scores made before them.

For each user the newest outcome counts (a churn reported after an earlier "still
subscribed" wins). It is matched, per model version, with the newest prediction whose
activity (``event_ts``) came at least ``min_lead_s`` before the outcome was observed: the
score from what was known then. Backfilled history is scored after the fact but only from
the activity of its time, which is why ``event_ts`` and not ``scored_at`` decides.

A version with fewer than ``min_per_class`` churned or retained users gets no metric and a
log line saying so: ROC-AUC is undefined with one class, and a handful of churners gives a
figure too noisy to act on.
"""

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

import numpy as np
import sqlalchemy as sa
from prometheus_client import Gauge
from sklearn.metrics import brier_score_loss, roc_auc_score

from churn_stream import storage

log = logging.getLogger(__name__)

CALIBRATION_BINS = 10
USERS_PER_QUERY = 400  # SQLite joins at most 500 SELECTs; SQL Server takes 2100 parameters

LIVE_ROC_AUC = Gauge("model_live_roc_auc", "ROC-AUC on reported outcomes", ["model_version"])
LIVE_BRIER = Gauge("model_live_brier", "Brier score on reported outcomes", ["model_version"])
LIVE_PRECISION_AT_K = Gauge(
    "model_live_precision_at_k", "Share of churners among the k riskiest labelled users",
    ["model_version"],
)
LIVE_CALIBRATION_ERROR = Gauge(
    "model_live_calibration_error", "Expected calibration error (10 equal-width bins)",
    ["model_version"],
)
LIVE_LABELLED = Gauge(
    "model_live_labelled_users", "Users with an outcome and an earlier score", ["model_version"]
)
METRIC_GAUGES = {
    "roc_auc": LIVE_ROC_AUC,
    "brier": LIVE_BRIER,
    "precision_at_k": LIVE_PRECISION_AT_K,
    "calibration_error": LIVE_CALIBRATION_ERROR,
}


@dataclass(frozen=True)
class LivePerformance:
    """How one model version scored the users whose outcome is known; None = not enough."""

    model_version: str
    n_labelled: int
    n_churned: int
    roc_auc: float | None = None
    brier: float | None = None
    precision_at_k: float | None = None
    k: int | None = None
    calibration_error: float | None = None

    @property
    def available(self) -> bool:
        """Whether the metrics could be computed."""
        return self.roc_auc is not None


def calibration_error(
    scores: np.ndarray, labels: np.ndarray, n_bins: int = CALIBRATION_BINS
) -> float:
    """Expected calibration error: |churn rate - mean score| per score bin, weighted by size.

    >>> calibration_error(np.array([0.1, 0.9]), np.array([0, 1]))
    0.1
    """
    bins = np.minimum((scores * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        inside = bins == b
        total += inside.sum() * abs(labels[inside].mean() - scores[inside].mean())
    return round(float(total / len(scores)), 12)


def precision_at_k(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of churners among the ``k`` highest scores (ties keep the input order)."""
    top = np.argsort(-scores, kind="stable")[:k]
    return float(labels[top].mean())


def evaluate(
    model_version: str,
    scores: Sequence[float],
    labels: Sequence[bool],
    top_k: int,
    min_per_class: int,
) -> LivePerformance:
    """The live metrics of one version, or counts only when a class has too few users."""
    y = np.asarray(labels, dtype=int)
    p = np.clip(np.asarray(scores, dtype=float), 0.0, 1.0)
    n_churned = int(y.sum())
    counts = LivePerformance(model_version, n_labelled=len(y), n_churned=n_churned)
    if min(n_churned, len(y) - n_churned) < min_per_class or not np.isfinite(p).all():
        return counts
    k = min(top_k, len(y))
    return LivePerformance(
        model_version,
        n_labelled=len(y),
        n_churned=n_churned,
        roc_auc=float(roc_auc_score(y, p)),
        brier=float(brier_score_loss(y, p)),
        precision_at_k=precision_at_k(p, y, k),
        k=k,
        calibration_error=calibration_error(p, y),
    )


def labelled_scores(
    engine: sa.Engine, min_lead_s: float
) -> list[tuple[str, float, bool]]:
    """``(model_version, score, churned)``: per user with an outcome, one row per version."""
    outcomes = newest_outcomes(engine)
    lead = timedelta(seconds=min_lead_s)
    found: list[tuple[str, float, bool]] = []
    users = sorted(outcomes)
    with engine.connect() as conn:
        for start in range(0, len(users), USERS_PER_QUERY):
            cutoffs = [(u, outcomes[u][1] - lead) for u in users[start : start + USERS_PER_QUERY]]
            seen: set[tuple[str, str]] = set()
            for row in conn.execute(_newest_scores_before(cutoffs)):
                if (row.user_id, row.model_version) not in seen:
                    seen.add((row.user_id, row.model_version))
                    found.append((row.model_version, row.score, outcomes[row.user_id][0]))
    return found


def newest_outcomes(engine: sa.Engine) -> dict[str, tuple[bool, datetime]]:
    """Each user's newest outcome: ``user_id -> (churned, observed_at)`` (naive UTC)."""
    fb = storage.feedback
    ranked = sa.select(
        fb.c.user_id, fb.c.churned, fb.c.observed_at,
        sa.func.row_number().over(
            partition_by=fb.c.user_id,
            order_by=(fb.c.observed_at.desc(), fb.c.received_at.desc(), fb.c.feedback_id.desc()),
        ).label("rank"),
    ).subquery()
    query = sa.select(ranked.c.user_id, ranked.c.churned, ranked.c.observed_at).where(
        ranked.c.rank == 1
    )
    with engine.connect() as conn:
        return {r.user_id: (bool(r.churned), r.observed_at) for r in conn.execute(query)}


def _newest_scores_before(cutoffs: list[tuple[str, datetime]]) -> sa.Select:
    # Each user's cutoff travels in as a small UNION ALL table: SQLite stores times as text,
    # so "observed_at minus the lead" cannot be computed inside the query portably, and it
    # has no column list for a VALUES alias.
    pr = storage.predictions
    limits = sa.union_all(*[
        sa.select(sa.literal(user, sa.String(128)).label("user_id"),
                  sa.literal(cutoff, sa.DateTime).label("cutoff"))
        for user, cutoff in cutoffs
    ]).subquery("limits")
    # GROUP BY + MAX plans faster than a window over every score of every user here.
    newest = (
        sa.select(pr.c.user_id, pr.c.model_version, sa.func.max(pr.c.event_ts).label("event_ts"))
        .join(limits, sa.and_(pr.c.user_id == limits.c.user_id, pr.c.event_ts <= limits.c.cutoff))
        .group_by(pr.c.user_id, pr.c.model_version)
        .subquery()
    )
    return (
        sa.select(pr.c.user_id, pr.c.model_version, pr.c.score)
        .join(newest, sa.and_(pr.c.user_id == newest.c.user_id,
                              pr.c.model_version == newest.c.model_version,
                              pr.c.event_ts == newest.c.event_ts))
        # Two scores of one event (a replayed batch) tie on event_ts: the newest row wins.
        .order_by(pr.c.user_id, pr.c.model_version, pr.c.id.desc())
    )


def compute_live_performance(
    engine: sa.Engine, top_k: int, min_per_class: int, min_lead_s: float
) -> list[LivePerformance]:
    """The live performance of every model version that scored a user with an outcome."""
    by_version: dict[str, tuple[list[float], list[bool]]] = defaultdict(lambda: ([], []))
    for version, score, churned in labelled_scores(engine, min_lead_s):
        by_version[version][0].append(score)
        by_version[version][1].append(churned)
    results = []
    for version in sorted(by_version):
        scores, labels = by_version[version]
        result = evaluate(version, scores, labels, top_k, min_per_class)
        if not result.available:
            log.info(
                "model %s: no live metrics yet: %d labelled users, %d churned, %d retained; "
                "each class needs at least %d",
                version, result.n_labelled, result.n_churned,
                result.n_labelled - result.n_churned, min_per_class,
            )
        results.append(result)
    return results


def store_performance(
    engine: sa.Engine, results: Iterable[LivePerformance], computed_at: datetime
) -> None:
    """Append one ``model_performance`` row per version; metrics NULL when not available."""
    rows = [{**asdict(r), "computed_at": storage.to_db_time(computed_at)} for r in results]
    if rows:
        with engine.begin() as conn:
            conn.execute(sa.insert(storage.model_performance), rows)


def export_gauges(results: Iterable[LivePerformance]) -> None:
    """Set the gauges of each version; a version without metrics has none (never NaN)."""
    for result in results:
        LIVE_LABELLED.labels(result.model_version).set(result.n_labelled)
        for name, gauge in METRIC_GAUGES.items():
            value = getattr(result, name)
            if value is not None and math.isfinite(value):
                gauge.labels(result.model_version).set(value)
            else:
                _forget(gauge, result.model_version)


def _forget(gauge: Gauge, model_version: str) -> None:
    try:
        gauge.remove(model_version)
    except KeyError:
        pass
