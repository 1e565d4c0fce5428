"""The predictor's drift check: live windows against the serving model's reference.

Each closed window is compared with the reference of the model that scored it, stored in
``drift_reports`` (a row per feature and statistic, the score's PSI under ``__score__``),
exported as gauges, and handed to the policy; a confirmed drift asks for a retrain.
"""

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import sqlalchemy as sa

from churn_stream import storage
from churn_stream.drift import (
    SCORE_FEATURE,
    DriftPolicy,
    DriftWindow,
    ReferenceProfile,
    Thresholds,
    Verdict,
    WindowReport,
)
from churn_stream.models import ChurnModel
from churn_stream.predictor.metrics import (
    DRIFT_WINDOWS,
    DRIFTED_SHARE,
    FEATURE_KS,
    FEATURE_PSI,
    SCORE_PSI,
)

log = logging.getLogger(__name__)
CLOCK_FEATURES = ("tenure_days",)
CLOCK_ENDINGS = (":days_since_last", ":count_all", ":sum_all")
"""Features that move with elapsed time whatever the users do: ages, recencies (which also
follow a micro-batch's span) and all-time totals, which grow as a population ages. Their
drift is reported but never counts towards a retrain."""


def is_clock(feature: str) -> bool:
    """Whether ``feature`` moves with elapsed time (see ``CLOCK_ENDINGS``)."""
    return feature in CLOCK_FEATURES or feature.endswith(CLOCK_ENDINGS)


class DriftWatch:
    """Collects scored rows and evaluates each closed window; lives on the consume loop."""

    def __init__(self, engine: sa.Engine, instance: str, window: DriftWindow,
                 policy: DriftPolicy, thresholds: Thresholds,
                 request_retrain: Callable[[str], object],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.instance = instance
        self.window = window
        self.policy = policy
        self.thresholds = thresholds
        self.request_retrain = request_retrain
        self.clock = clock
        self.profile: ReferenceProfile | None = None
        self.verdicts: list[Verdict] = []

    def add(self, model: ChurnModel, rows: np.ndarray, scores: np.ndarray,
            events: np.ndarray) -> None:
        """Scored rows of one batch; a new model starts a new window against its reference.

        A row counts once per event it answers, as in the reference (one row per event):
        otherwise how many events a micro-batch folds into one prediction, which depends on
        the traffic and the backlog, would shift the live distribution towards light users.
        """
        if self.profile is None or self.profile.model_version != model.version:
            self._start_profile(model)
        self.window.add(np.repeat(rows, events, axis=0), np.repeat(scores, events))

    def _start_profile(self, model: ChurnModel) -> None:
        self.profile = ReferenceProfile(model.version, model.space.feature_names,
                                        model.reference, model.reference_scores, self.thresholds,
                                        exempt=is_clock)
        self.window.reset()
        self.policy.streak = 0
        log.info("drift reference: model %s, %d rows, %d features", model.version,
                 len(model.reference), len(model.space.feature_names))

    def check(self, last_retrain_s: float | None = None) -> Verdict | None:
        """Evaluate the window if it closed; None if it is still open."""
        if self.profile is None or not self.window.closed():
            return None
        if last_retrain_s is not None:
            self.policy.note_retrain(max(last_retrain_s, self.policy.last_retrain_s or 0.0))
        rows, scores = self.window.take()
        if len(rows) < self.policy.min_rows:
            verdict = Verdict.INSUFFICIENT
        else:
            report = self.profile.compare(rows, scores)
            verdict = self.policy.observe(report, self.clock())
            self._publish(report, verdict)
        DRIFT_WINDOWS.labels(verdict.value).inc()
        self.verdicts.append(verdict)
        if verdict is Verdict.CONFIRMED:
            log.info("drift confirmed for model %s; retraining", self.profile.model_version)
            self.request_retrain("drift")
        return verdict

    def _publish(self, report: WindowReport, verdict: Verdict) -> None:
        for item in report.features:
            gauge = FEATURE_PSI if item.result.statistic == "psi" else FEATURE_KS
            gauge.labels(item.feature).set(item.result.score)
        SCORE_PSI.set(report.score.score)
        DRIFTED_SHARE.set(report.drifted_share)
        log.info("drift window of %d rows, model %s: %s; drifted %s; score PSI %.3f",
                 report.n_current, report.model_version, verdict.value,
                 report.drifted_features[:8], report.score.score)
        try:
            self._store(report)
        except sa.exc.SQLAlchemyError:
            log.warning("could not store the drift report of model %s", report.model_version,
                        exc_info=True)

    def _store(self, report: WindowReport) -> None:
        now = storage.to_db_time(datetime.now(UTC))
        results = [(f.feature, f.result) for f in report.features]
        results.append((SCORE_FEATURE, report.score))
        rows = [
            {"evaluated_at": now, "instance": self.instance, "model_version": report.model_version,
             "feature": feature[:128], "statistic": r.statistic, "score": r.score,
             "threshold": r.threshold, "drifted": r.drifted, "n_reference": r.n_reference,
             "n_current": r.n_current}
            for feature, r in results
        ]
        with self.engine.begin() as conn:
            conn.execute(storage.drift_reports.insert(), rows)
