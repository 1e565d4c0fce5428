"""Live metrics on a hand-made dataset, the retrain policy, and the loop through a real broker."""

import json
import logging
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import sqlalchemy as sa
from kafka import KafkaConsumer
from prometheus_client import REGISTRY

from churn_stream import live_metrics, storage
from churn_stream.control import RetrainCommand, last_command, parse_control
from churn_stream.errors import InvalidCommand
from churn_stream.retrain_policy import Decision, LoopObservation, RetrainPolicy, decide
from churn_stream.settings import Settings
from feedback_loop import FeedbackLoop, validation_roc_auc

T0 = datetime(2025, 3, 1, tzinfo=UTC)
DAY = timedelta(days=1)

# user: (score of v1 two days before the outcome, churned). By hand, for v1:
#   ROC-AUC: churners a, c, e against retained b, d, f win 3 + 2 + 1 of 9 pairs = 2/3
#   Brier: (.01 + .64 + .09 + .09 + .64 + .01) / 6 = 1.48 / 6
#   precision at k=2: a (churned), b (retained) -> 0.5
#   calibration: every score in a bin of its own -> (.1 + .8 + .3 + .3 + .8 + .1) / 6 = 0.4
HAND_MADE = {"a": (0.9, True), "b": (0.8, False), "c": (0.7, True),
             "d": (0.3, False), "e": (0.2, True), "f": (0.1, False)}


def predict(user: str, version: str, score: float, event_ts: datetime) -> dict:
    return {"user_id": user, "scored_at": storage.to_db_time(T0 + 30 * DAY),
            "event_ts": storage.to_db_time(event_ts), "score": score, "score_rf": None,
            "score_xgb": None, "score_seq": None, "model_version": version, "latency_ms": 1.0}


def report(user: str, churned: bool, observed_at: datetime, n: int = 0) -> dict:
    return {"feedback_id": f"{user}-{n}", "user_id": user, "churned": churned,
            "observed_at": storage.to_db_time(observed_at), "source": "test",
            "received_at": storage.to_db_time(observed_at + DAY), "published_at": None}


def seed_hand_made(engine: sa.Engine) -> None:
    """v1 scored everyone; the rows that must not count carry absurd scores."""
    outcome_at = T0 + 10 * DAY
    # Scored twice from one event (a replayed batch): the later row, further down, wins.
    predictions, feedback = [predict("f", "v1", 0.95, outcome_at - 2 * DAY)], []
    for user, (score, churned) in HAND_MADE.items():
        predictions += [
            predict(user, "v1", 0.5, outcome_at - 5 * DAY),      # older than the newest
            predict(user, "v1", score, outcome_at - 2 * DAY),    # the one that counts
            predict(user, "v1", 1.0 - score, outcome_at - DAY / 2),  # inside the lead time
            predict(user, "v1", 1.0 - score, outcome_at + DAY),  # after the outcome
        ]
        feedback.append(report(user, churned, outcome_at, n=1))
    # An earlier "still subscribed" for a churner is superseded by the newer churn.
    feedback.append(report("a", False, outcome_at - 20 * DAY, n=0))
    # v2 saw only a and b: one churner is too few for metrics.
    predictions += [predict("a", "v2", 0.6, outcome_at - 3 * DAY),
                    predict("b", "v2", 0.4, outcome_at - 3 * DAY)]
    # A score for a user without an outcome is not labelled.
    predictions.append(predict("z", "v1", 0.99, outcome_at - 3 * DAY))
    with engine.begin() as conn:
        conn.execute(sa.insert(storage.predictions), predictions)
        conn.execute(sa.insert(storage.feedback), feedback)


def test_live_metrics_exact_values(engine: sa.Engine, caplog: pytest.LogCaptureFixture) -> None:
    seed_hand_made(engine)
    caplog.set_level(logging.INFO)
    v1, v2 = live_metrics.compute_live_performance(
        engine, top_k=2, min_per_class=2, min_lead_s=86_400
    )
    assert (v1.model_version, v1.n_labelled, v1.n_churned, v1.k) == ("v1", 6, 3, 2)
    assert v1.roc_auc == pytest.approx(2 / 3, abs=1e-12)
    assert v1.brier == pytest.approx(1.48 / 6, abs=1e-12)
    assert v1.precision_at_k == 0.5
    assert v1.calibration_error == pytest.approx(0.4, abs=1e-12)
    assert v2 == live_metrics.LivePerformance("v2", n_labelled=2, n_churned=1)
    assert "model v2: no live metrics yet: 2 labelled users, 1 churned, 1 retained" in caplog.text


def test_live_metrics_are_stored_and_exported(engine: sa.Engine) -> None:
    seed_hand_made(engine)
    results = live_metrics.compute_live_performance(engine, 2, 2, 86_400)
    live_metrics.store_performance(engine, results, T0 + 40 * DAY)
    live_metrics.export_gauges(results)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(storage.model_performance)
                            .order_by(storage.model_performance.c.model_version)).all()
    assert [(r.model_version, r.n_labelled, r.n_churned, r.k) for r in rows] == [
        ("v1", 6, 3, 2), ("v2", 2, 1, None)]
    assert rows[0].roc_auc == pytest.approx(2 / 3) and rows[1].roc_auc is None
    gauge = REGISTRY.get_sample_value
    assert gauge("model_live_roc_auc", {"model_version": "v1"}) == pytest.approx(2 / 3)
    assert gauge("model_live_roc_auc", {"model_version": "v2"}) is None
    assert gauge("model_live_labelled_users", {"model_version": "v2"}) == 2


@pytest.mark.parametrize("labels", [[], [True], [False] * 8, [True] * 8, [True] + [False] * 7])
def test_too_few_of_a_class_gives_no_metric_never_nan(labels: list[bool]) -> None:
    result = live_metrics.evaluate("v", [0.5] * len(labels), labels, top_k=5, min_per_class=2)
    assert not result.available
    assert (result.roc_auc, result.brier, result.precision_at_k, result.calibration_error) == (
        None, None, None, None)


def test_metrics_are_finite_on_constant_scores() -> None:
    result = live_metrics.evaluate("v", [0.3] * 6, [True, False] * 3, top_k=10, min_per_class=1)
    assert result.roc_auc == 0.5 and result.k == 6
    assert all(math.isfinite(v) for v in (result.brier, result.precision_at_k,
                                          result.calibration_error))


def test_calibration_error_of_a_perfectly_calibrated_bin() -> None:
    scores = np.array([0.25, 0.25, 0.25, 0.25, 0.95])
    labels = np.array([1, 0, 0, 0, 1])
    assert live_metrics.calibration_error(scores, labels) == pytest.approx(0.05 / 5)


POLICY = RetrainPolicy(min_new_outcomes=100, min_per_class=10, degradation_margin=0.05,
                       max_model_age_s=3600, cooldown_s=600)
NOW = datetime(2025, 6, 1, 12, tzinfo=UTC)


def seen(**changes: object) -> LoopObservation:
    """A healthy, recently trained model with plenty of outcomes of both kinds, nothing new."""
    base = dict(now=NOW, model_trained_at=NOW - timedelta(minutes=30), last_request_at=None,
                new_outcomes=0, n_churned=50, n_retained=400, live_roc_auc=0.84,
                validation_roc_auc=0.85)
    return LoopObservation(**{**base, **changes})


@pytest.mark.parametrize("observation,expected", [
    (seen(), (False, None, None)),
    (seen(new_outcomes=99), (False, None, None)),
    (seen(new_outcomes=100), (True, "feedback", "new_outcomes")),
    (seen(live_roc_auc=0.80), (False, None, None)),  # exactly at the margin
    (seen(live_roc_auc=0.79), (True, "feedback", "degraded")),
    (seen(live_roc_auc=None, new_outcomes=5), (False, None, None)),
    (seen(validation_roc_auc=None, live_roc_auc=0.5), (False, None, None)),
    (seen(model_trained_at=NOW - timedelta(seconds=3601)), (True, "schedule", "max_age")),
    (seen(model_trained_at=NOW - timedelta(seconds=3600)), (False, None, None)),
    (seen(model_trained_at=None, new_outcomes=500), (False, None, None)),
])
def test_policy_decisions(observation: LoopObservation, expected: tuple) -> None:
    decision = decide(POLICY, observation)
    assert (decision.retrain, decision.reason, decision.trigger) == expected


@pytest.mark.parametrize("n_churned,n_retained", [(0, 400), (1, 400), (9, 400), (50, 9)])
def test_too_few_of_a_class_means_no_feedback_retrain(n_churned: int, n_retained: int) -> None:
    decision = decide(POLICY, seen(n_churned=n_churned, n_retained=n_retained,
                                   new_outcomes=1000, live_roc_auc=0.5))
    assert not decision.retrain
    assert decision.why.startswith("too few ")
    assert f"{min(n_churned, n_retained)} < 10" in decision.why


def test_cooldown_holds_every_trigger_back() -> None:
    hot = dict(new_outcomes=1000, live_roc_auc=0.5, model_trained_at=NOW - timedelta(days=9))
    within = decide(POLICY, seen(last_request_at=NOW - timedelta(seconds=599), **hot))
    assert (within.retrain, within.why) == (False, "cooldown: 1 s left")
    after = decide(POLICY, seen(last_request_at=NOW - timedelta(seconds=600), **hot))
    assert (after.retrain, after.trigger) == (True, "max_age")


@pytest.mark.parametrize("metrics,expected", [
    ({"models": {"blend": {"roc_auc": 0.83}, "rf": {"roc_auc": 0.9}}}, 0.83),
    ({"blend": {"roc_auc": 0.83}}, 0.83), ({"blend": {"roc_auc": float("nan")}}, None),
    ({"blend": {"roc_auc": True}}, None), ({"rf": {"roc_auc": 0.8}}, None), ([], None),
])
def test_validation_figure_is_read_defensively(metrics: object, expected: float | None) -> None:
    assert validation_roc_auc(metrics) == expected


def test_control_messages_round_trip_and_reject_garbage() -> None:
    command = RetrainCommand(reason="feedback", detail="250 new outcomes")
    assert parse_control(command.to_bytes()) == command
    for raw in (None, b"", b"{", b'{"command": "retrain"}', b'{"command": "delete", '
                b'"reason": "feedback"}', b'{"command": "retrain", "reason": "feedback", "x": 1}',
                b"x" * 20_000):
        with pytest.raises(InvalidCommand):
            parse_control(raw)


def promote(engine: sa.Engine, version: str, trained_at: datetime, auc: float) -> None:
    with engine.begin() as conn:
        conn.execute(sa.insert(storage.model_runs), [{
            "model_version": version, "instance": "test", "reason": "start",
            "started_at": storage.to_db_time(trained_at - timedelta(seconds=60)),
            "seconds": 60.0, "rows": 1000, "metrics": {"models": {"blend": {"roc_auc": auc}}},
            "promoted": True, "error": None}])


@pytest.mark.timeout(90)
def test_loop_requests_a_retrain_once_then_cools_down(topics: Settings, engine: sa.Engine) -> None:
    settings = topics.model_copy(update={
        "retrain_min_new_outcomes": 6, "retrain_min_per_class": 3, "live_metrics_top_k": 2,
        "live_metrics_min_per_class": 2, "retrain_cooldown_s": 600,
        "retrain_max_model_age_s": 10 * 86_400})
    seed_hand_made(engine)
    now = T0 + 40 * DAY
    loop = FeedbackLoop(engine, settings)
    assert decide(loop.policy, loop.observe(now, [])).why == "no promoted model yet"
    promote(engine, "v1", now - DAY, auc=0.9)

    first = loop.tick(now)
    assert (first.retrain, first.reason, first.trigger) == (True, "feedback", "degraded")
    second = loop.tick(now + timedelta(seconds=60))
    assert (second.retrain, second.why) == (False, "cooldown: 540 s left")
    loop.close()

    commands = read_commands(settings)
    assert [(c.reason, c.requested_at) for c in commands] == [("feedback", now)]
    assert "below validation 0.900" in commands[0].detail
    restarted = FeedbackLoop(engine, settings)
    restarted.restore()
    assert restarted.last_request_at == now
    assert last_command(settings.bootstrap_servers, settings.topic_control) == commands[0]
    with engine.connect() as conn:
        stored = conn.execute(sa.select(sa.func.count()).select_from(storage.model_performance))
        assert stored.scalar_one() == 4  # v1 and v2, two ticks


def read_commands(settings: Settings) -> list[RetrainCommand]:
    consumer = KafkaConsumer(settings.topic_control, bootstrap_servers=settings.bootstrap_servers,
                             group_id=None, auto_offset_reset="earliest",
                             consumer_timeout_ms=3000)
    commands = [parse_control(record.value) for record in consumer]
    consumer.close()
    return commands


def test_new_outcomes_trigger_once_both_classes_suffice(
    topics: Settings, engine: sa.Engine
) -> None:
    settings = topics.model_copy(update={"retrain_min_new_outcomes": 4,
                                         "retrain_min_per_class": 2})
    now = T0 + 40 * DAY
    promote(engine, "v1", now - DAY, auc=0.8)
    loop = FeedbackLoop(engine, settings)
    with engine.begin() as conn:
        conn.execute(sa.insert(storage.feedback),
                     [report(f"r{i}", False, T0 + i * DAY) for i in range(5)])
    assert loop.tick(now).why == "too few churned outcomes to learn from: 0 < 2"
    with engine.begin() as conn:
        conn.execute(sa.insert(storage.feedback),
                     [report(f"c{i}", True, T0 + i * DAY) for i in range(2)])
    decision = loop.tick(now)
    assert (decision.retrain, decision.trigger, decision.why) == (
        True, "new_outcomes", "7 new outcomes since the last request")
    loop.close()
    assert json.loads(read_commands_raw(settings)[0])["reason"] == "feedback"


def read_commands_raw(settings: Settings) -> list[bytes]:
    consumer = KafkaConsumer(settings.topic_control, bootstrap_servers=settings.bootstrap_servers,
                             group_id=None, auto_offset_reset="earliest",
                             consumer_timeout_ms=3000)
    values = [record.value for record in consumer]
    consumer.close()
    return values


def test_decision_is_a_plain_value() -> None:
    assert Decision(False, "x") == Decision(False, "x", None, None)
