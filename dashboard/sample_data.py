"""Seeded rows for every table the dashboard reads, for its tests and its screenshot.

Activity comes from the real simulator; predictions, training runs, drift reports and live
performance are drawn around it the way the predictor and the feedback loop write them: the
users who will churn score higher as they decline, a behaviour shift 20 hours before ``now``
makes the session and purchase features drift, and a retrain on drift resets the reference.
"""

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import sqlalchemy as sa

from churn_stream import storage
from churn_stream.simulator import Simulator

PSI_THRESHOLD = 0.2
CATCH_UP = timedelta(hours=1)
DRIFTING_FEATURES = ("session_end.duration_s.mean_7d", "purchase.amount.mean_30d")
STEADY_FEATURES = ("login.count_7d", "page_view.count_7d", "support_ticket.count_30d")


@dataclass(frozen=True)
class SampleSummary:
    """What was written, for tests to compare the dashboard against."""

    users: int
    events: int
    ingested_recently: int
    """Events stored in the minute before ``now``; all others were stored an hour earlier."""
    now: datetime
    """The moment the seeded rows end at."""
    predictions: int
    latest_scores: dict[str, float]
    served_version: str
    live_roc_auc: float
    retrain_times: list[datetime]


def seed_sample_data(
    engine: sa.Engine, now: datetime, n_users: int = 200, days: float = 3.0, seed: int = 7
) -> SampleSummary:
    """Write seeded rows ending at ``now`` (aware UTC) into every table the dashboard reads."""
    storage.create_schema(engine)
    rng = np.random.default_rng(seed)
    start = now - timedelta(days=days)
    shift_at = now - timedelta(hours=20)
    retrain_at = now - timedelta(hours=12)
    simulator = Simulator(n_users, start, days, seed=seed, churn_share=0.4, drift_at=shift_at)
    events = [e for e in simulator.events() if e.ts <= now]
    activity = _activity_rows(events, now)
    active = {e.user_id for e in events}
    scores = _prediction_rows(simulator, active, now, retrain_at, rng)
    runs = _model_runs(start, retrain_at, now)
    with engine.begin() as conn:
        storage.insert_idempotent(conn, storage.user_activity, activity)
        conn.execute(sa.insert(storage.predictions), scores)
        conn.execute(sa.insert(storage.model_runs), runs)
        drift = _drift_rows(start, shift_at, retrain_at, now, rng)
        conn.execute(sa.insert(storage.drift_reports), drift)
        performance = _performance_rows(start, retrain_at, now, rng)
        conn.execute(sa.insert(storage.model_performance), performance)
    latest = {row["user_id"]: row["score"] for row in sorted(scores, key=lambda r: r["scored_at"])}
    return SampleSummary(
        users=len({e.user_id for e in events}),
        events=len(events),
        ingested_recently=sum(e.ts > now - CATCH_UP for e in events),
        predictions=len(scores),
        latest_scores=latest,
        served_version="v2",
        live_roc_auc=performance[-1]["roc_auc"],
        retrain_times=[storage.to_db_time(retrain_at)],
        now=now,
    )


def _activity_rows(events: list, now: datetime) -> list[dict]:
    """History stored by a backfill an hour ago; the last hour's events in the last minute,
    as a consumer catching up after a restart would. The ingestion rate over the five minutes
    ending at ``now``, or up to four minutes after it, is then the same."""
    rows = []
    backfilled_at = now - CATCH_UP
    recent = [e for e in events if e.ts > backfilled_at]
    for index, event in enumerate(recent, start=1):
        stored_at = now - timedelta(seconds=55 - 50 * index / len(recent))
        rows.append(storage.event_row(event, stored_at))
    rows.extend(storage.event_row(e, backfilled_at) for e in events if e.ts <= backfilled_at)
    return rows


def _prediction_rows(
    simulator: Simulator, active: set[str], now: datetime, retrain_at: datetime,
    rng: np.random.Generator,
) -> list[dict]:
    """Users with events scored every two hours over the last 20 h, churners rising as they
    decline; the predictor only ever scores users it has seen events of."""
    rows = []
    for hours_ago in range(20, -1, -2):
        at = now - timedelta(hours=hours_ago, minutes=float(rng.uniform(1, 30)))
        version = "v2" if at >= retrain_at else "v1"
        for user in simulator.users:
            if user.user_id not in active or (user.churn_at is not None and user.churn_at < at):
                continue
            risk = 1.0 - user.decline(at + timedelta(days=7))
            logit = -2.2 + 4.5 * risk + 1.2 * (0.5 - user.engagement) + rng.normal(0, 0.5)
            blend = 1 / (1 + math.exp(-logit))
            parts = np.clip(blend + rng.normal(0, 0.05, size=3), 0.0, 1.0)
            rows.append({
                "user_id": user.user_id,
                "scored_at": storage.to_db_time(at),
                "event_ts": storage.to_db_time(at - timedelta(seconds=2)),
                "score": round(blend, 4),
                "score_rf": float(parts[0]),
                "score_xgb": float(parts[1]),
                "score_seq": float(parts[2]),
                "model_version": version,
                "latency_ms": float(rng.lognormal(math.log(4.0), 0.45)),
            })
    return rows


def _metrics(rng_seed: int, level: float) -> dict[str, dict]:
    """Validation metrics in the predictor's shape: per model, and the blend's weights."""
    rng = np.random.default_rng(rng_seed)
    models = {
        model: {
            "roc_auc": round(level + offset + float(rng.normal(0, 0.01)), 4),
            "pr_auc": round(level - 0.2 + offset, 4),
            "brier": round(0.16 - offset / 2, 4),
            "log_loss": round(0.48 - offset, 4),
        }
        for model, offset in (("rf", -0.01), ("xgb", 0.0), ("seq", -0.03), ("blend", 0.01))
    }
    return {"models": models, "weights": {"rf": 0.3, "xgb": 0.45, "seq": 0.25}}


def _model_runs(start: datetime, retrain_at: datetime, now: datetime) -> list[dict]:
    def run(version: str, reason: str, at: datetime, promoted: bool, level: float) -> dict:
        return {
            "model_version": version, "instance": "predictor-0", "reason": reason,
            "started_at": storage.to_db_time(at), "seconds": 41.5, "rows": 18_000,
            "metrics": _metrics(len(version) + int(level * 100), level),
            "promoted": promoted, "error": None,
        }

    return [
        run("v1", "start", start, True, 0.84),
        run("v2", "drift", retrain_at, True, 0.86),
        run("v3", "feedback", now - timedelta(hours=5), False, 0.83),
    ]


def _drift_rows(
    start: datetime, shift_at: datetime, retrain_at: datetime, now: datetime,
    rng: np.random.Generator,
) -> list[dict]:
    """PSI every half hour: the shifted features climb after ``shift_at`` until the retrain."""
    rows = []
    at = start + timedelta(hours=1)
    while at <= now:
        version = "v2" if at >= retrain_at else "v1"
        for feature in (*DRIFTING_FEATURES, *STEADY_FEATURES):
            drifting = feature in DRIFTING_FEATURES and shift_at <= at < retrain_at
            hours_in = (at - shift_at) / timedelta(hours=1)
            score = abs(rng.normal(0.04, 0.015)) + (0.06 * hours_in if drifting else 0.0)
            rows.append({
                "evaluated_at": storage.to_db_time(at), "instance": "predictor-0",
                "model_version": version, "feature": feature, "statistic": "psi",
                "score": round(score, 4), "threshold": PSI_THRESHOLD,
                "drifted": score > PSI_THRESHOLD, "n_reference": 18_000, "n_current": 2_000,
            })
        at += timedelta(minutes=30)
    return rows


def _performance_rows(
    start: datetime, retrain_at: datetime, now: datetime, rng: np.random.Generator
) -> list[dict]:
    """Live ROC-AUC every hour, sagging under the shift and recovering after the retrain."""
    rows = []
    at = start + timedelta(hours=6)
    labelled = 0
    while at <= now:
        labelled += int(rng.integers(5, 15))
        version = "v2" if at >= retrain_at else "v1"
        sag = 0.06 if version == "v1" and at > retrain_at - timedelta(hours=6) else 0.0
        rows.append({
            "computed_at": storage.to_db_time(at), "model_version": version,
            "n_labelled": labelled, "n_churned": labelled // 3,
            "roc_auc": round(0.83 - sag + float(rng.normal(0, 0.01)), 4),
            "brier": round(0.15 + sag / 2, 4), "precision_at_k": round(0.6 - sag, 4), "k": 50,
            "calibration_error": round(0.04 + sag / 3, 4),
        })
        at += timedelta(hours=1)
    return rows
