"""Feedback loop service: live performance from reported outcomes, and retrain requests.

Every ``FEEDBACK_LOOP_INTERVAL_S`` it joins the outcomes in ``feedback`` with the scores
made before them, stores each model version's live metrics in ``model_performance``,
exports them as gauges, and asks every predictor to retrain (a command on
``model-control``) when ``churn_stream.retrain_policy`` says so.

    python feedback_loop.py
"""

import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from kafka import KafkaProducer
from kafka.errors import KafkaError
from prometheus_client import Counter, Gauge

from churn_stream import live_metrics, storage
from churn_stream.control import RetrainCommand, last_command, publish_command
from churn_stream.errors import ChurnStreamError
from churn_stream.kafka_io import ensure_topics, make_producer
from churn_stream.retrain_policy import Decision, LoopObservation, RetrainPolicy, decide
from churn_stream.runtime import serve_metrics, start_service
from churn_stream.settings import Settings

log = logging.getLogger("feedback_loop")

RETRAIN_REQUESTS = Counter(
    "feedback_loop_retrain_requests_total", "Retrain commands sent", ["reason", "trigger"]
)
OUTCOMES = Gauge("feedback_loop_outcomes", "Users with a reported outcome", ["outcome"])
NEW_OUTCOMES = Gauge("feedback_loop_new_outcomes", "Outcomes received since the last request")
LAST_TICK = Gauge("feedback_loop_last_tick_timestamp_seconds", "When the loop last ran")
TICK_FAILURES = Counter("feedback_loop_tick_failures_total", "Ticks that failed and were skipped")


@dataclass(frozen=True)
class ServingRun:
    """The promoted run whose model the predictors serve."""

    model_version: str
    trained_at: datetime
    validation_roc_auc: float | None


def policy_from(settings: Settings) -> RetrainPolicy:
    """The retrain policy the settings describe."""
    return RetrainPolicy(
        min_new_outcomes=settings.retrain_min_new_outcomes,
        min_per_class=settings.retrain_min_per_class,
        degradation_margin=settings.retrain_degradation_margin,
        max_model_age_s=settings.retrain_max_model_age_s,
        cooldown_s=settings.retrain_cooldown_s,
    )


def serving_run(engine: sa.Engine) -> ServingRun | None:
    """The newest promoted ``model_runs`` row, or None while there is none."""
    runs = storage.model_runs
    query = sa.select(runs).where(runs.c.promoted == sa.true()).order_by(runs.c.id.desc()).limit(1)
    with engine.connect() as conn:
        row = conn.execute(query).first()
    if row is None:
        return None
    trained_at = storage.from_db_time(row.started_at) + timedelta(seconds=row.seconds)
    return ServingRun(row.model_version, trained_at, validation_roc_auc(row.metrics))


def validation_roc_auc(metrics: Any) -> float | None:
    """The blend's ROC-AUC of a run if it is a finite number, else None.

    The predictor records ``metrics["models"]["blend"]["roc_auc"]``; a bare
    ``metrics["blend"]["roc_auc"]`` is read too.
    """
    if isinstance(metrics, dict) and isinstance(metrics.get("models"), dict):
        metrics = metrics["models"]
    blend = metrics.get("blend") if isinstance(metrics, dict) else None
    value = blend.get("roc_auc") if isinstance(blend, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def outcomes_since(engine: sa.Engine, since: datetime | None) -> int:
    """Feedback rows received after ``since`` (all of them if None)."""
    fb = storage.feedback
    query = sa.select(sa.func.count()).select_from(fb)
    if since is not None:
        query = query.where(fb.c.received_at > storage.to_db_time(since))
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


class FeedbackLoop:
    """One tick at a time: measure, store, export, decide, and maybe request a retrain."""

    def __init__(self, engine: sa.Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.policy = policy_from(settings)
        self.last_request_at: datetime | None = None
        self._producer: KafkaProducer | None = None

    def restore(self) -> None:
        """Take the time of the newest command on ``model-control`` as the last request."""
        command = last_command(self.settings.bootstrap_servers, self.settings.topic_control)
        if command is not None:
            self.last_request_at = command.requested_at
            log.info("last retrain request was %s at %s (%s)",
                     command.request_id, command.requested_at, command.reason)

    def tick(self, now: datetime | None = None) -> Decision:
        """Run one round; returns the decision taken."""
        now = now or datetime.now(UTC)
        s = self.settings
        results = live_metrics.compute_live_performance(
            self.engine, s.live_metrics_top_k, s.live_metrics_min_per_class,
            s.live_metrics_min_lead_s,
        )
        live_metrics.store_performance(self.engine, results, now)
        live_metrics.export_gauges(results)
        decision = decide(self.policy, self.observe(now, results))
        if decision.retrain:
            self.request_retrain(decision, now)
        else:
            log.info("no retrain: %s", decision.why)
        LAST_TICK.set(now.timestamp())
        return decision

    def observe(
        self, now: datetime, results: list[live_metrics.LivePerformance]
    ) -> LoopObservation:
        """What the policy needs to know, read from the database."""
        run = serving_run(self.engine)
        outcomes = live_metrics.newest_outcomes(self.engine)
        n_churned = sum(churned for churned, _ in outcomes.values())
        new = outcomes_since(self.engine, self.last_request_at)
        OUTCOMES.labels("churned").set(n_churned)
        OUTCOMES.labels("retained").set(len(outcomes) - n_churned)
        NEW_OUTCOMES.set(new)
        live = next((r.roc_auc for r in results if run and r.model_version == run.model_version),
                    None)
        return LoopObservation(
            now=now,
            model_trained_at=run.trained_at if run else None,
            last_request_at=self.last_request_at,
            new_outcomes=new,
            n_churned=n_churned,
            n_retained=len(outcomes) - n_churned,
            live_roc_auc=live,
            validation_roc_auc=run.validation_roc_auc if run else None,
        )

    def request_retrain(self, decision: Decision, now: datetime) -> RetrainCommand:
        """Publish the retrain command and remember when; raises if the broker refuses."""
        assert decision.reason is not None and decision.trigger is not None
        command = RetrainCommand(reason=decision.reason, requested_at=now, detail=decision.why)
        if self._producer is None:
            self._producer = make_producer(self.settings.bootstrap_servers)
        publish_command(self._producer, self.settings.topic_control, command)
        self.last_request_at = now
        RETRAIN_REQUESTS.labels(decision.reason, decision.trigger).inc()
        return command

    def close(self) -> None:
        """Release the producer."""
        if self._producer is not None:
            self._producer.close(timeout=5)


def main() -> None:
    settings, stopping = start_service("feedback-loop")
    serve_metrics(settings.feedback_loop_metrics_port)
    if not ensure_topics(settings, stopping=stopping):
        return
    engine = storage.make_engine(settings.resolved_database_url())
    storage.create_schema(engine)
    loop = FeedbackLoop(engine, settings)
    loop.restore()
    log.info("feedback loop started: every %.0f s, policy %s",
             settings.feedback_loop_interval_s, loop.policy)
    while not stopping.is_set():
        try:
            loop.tick()
        except (sa.exc.SQLAlchemyError, KafkaError, ChurnStreamError) as exc:
            TICK_FAILURES.inc()
            log.warning("feedback loop tick failed, trying again next time: %s", exc)
        stopping.wait(settings.feedback_loop_interval_s)
    loop.close()
    engine.dispose()
    log.info("feedback loop stopped")


if __name__ == "__main__":
    main()
