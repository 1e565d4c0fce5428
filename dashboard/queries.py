"""Read-only queries behind the dashboard, each bounded by a time window or a row limit.

Every query is SQLAlchemy Core with bound parameters, so the same code reads SQLite and SQL
Server. Windows end at the newest row of their own table rather than at the wall clock: a
replay of old data then looks like a live stream, and an idle stack still shows its last
hours. Results come back as DataFrames with aware UTC times.
"""

from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from churn_stream.storage import (
    drift_reports,
    model_performance,
    model_runs,
    predictions,
    to_db_time,
    user_activity,
)

DASHBOARD_TABLES = (user_activity, predictions, model_runs, drift_reports, model_performance)
BUCKET_WIDTHS_S = (10, 30, 60, 300, 600, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86_400)
SCORE_COLUMNS = ("score", "score_rf", "score_xgb", "score_seq")
MAX_ROWS = 200_000
"""Most rows one aggregate reads, whatever the window: the newest ones count."""


class epoch_seconds(FunctionElement):  # noqa: N801 - SQL functions read lower case
    """Whole seconds since 1970 of a naive-UTC time column, in the dialect's own idiom."""

    type = sa.BigInteger()
    inherit_cache = True
    name = "epoch_seconds"


@compiles(epoch_seconds, "sqlite")
def _epoch_seconds_sqlite(element: epoch_seconds, compiler: Any, **kw: Any) -> str:
    # SQLite keeps times to the millisecond and would round 59.9996 s up to the next
    # second; cutting the stored text at whole seconds truncates, as SQL Server does.
    column = compiler.process(element.clauses, **kw)
    return f"CAST(strftime('%s', substr({column}, 1, 19)) AS INTEGER)"


@compiles(epoch_seconds, "mssql")
def _epoch_seconds_mssql(element: epoch_seconds, compiler: Any, **kw: Any) -> str:
    return f"DATEDIFF_BIG(second, '19700101', {compiler.process(element.clauses, **kw)})"


@compiles(epoch_seconds)
def _epoch_seconds_default(element: epoch_seconds, compiler: Any, **kw: Any) -> str:
    return f"CAST(EXTRACT(EPOCH FROM {compiler.process(element.clauses, **kw)}) AS BIGINT)"


def missing_tables(engine: Engine) -> list[str]:
    """The dashboard's tables that the database does not have yet."""
    present = set(sa.inspect(engine).get_table_names())
    return [table.name for table in DASHBOARD_TABLES if table.name not in present]


def newest(conn: Connection, column: sa.Column) -> datetime | None:
    """The largest value of a time column, naive UTC; ``None`` for an empty table."""
    return conn.execute(sa.select(sa.func.max(column))).scalar()


def bucket_width_s(hours: float, buckets: int = 120) -> int:
    """The smallest round bucket width that splits ``hours`` into at most ``buckets``."""
    span_s = hours * 3600 / buckets
    return next((w for w in BUCKET_WIDTHS_S if w >= span_s), BUCKET_WIDTHS_S[-1])


def time_window(conn: Connection, column: sa.Column, hours: float) -> tuple[datetime, int] | None:
    """Start of the newest ``hours`` of ``column`` and a bucket width for the data in it.

    The width follows the span the rows really cover, so that a stack started minutes ago
    gets minute-wide buckets, not quarter hours. ``None`` for an empty table.
    """
    until = newest(conn, column)
    if until is None:
        return None
    since = until - timedelta(hours=hours)
    first = conn.execute(sa.select(sa.func.min(column)).where(column >= since)).scalar()
    return since, bucket_width_s((until - first).total_seconds() / 3600)


def _frame(conn: Connection, query: sa.Select, times: tuple[str, ...] = ()) -> pd.DataFrame:
    result = conn.execute(query)
    frame = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
    for name in times:
        frame[name] = pd.to_datetime(frame[name], utc=True)
    return frame


def _bucket_frame(frame: pd.DataFrame) -> pd.DataFrame:
    frame["bucket"] = pd.to_datetime(frame["bucket"].astype("int64"), unit="s", utc=True)
    return frame


def users_tracked(conn: Connection) -> int:
    """Distinct users with at least one stored event: a scan of the (user_id, ts) index."""
    return conn.execute(
        sa.select(sa.func.count(sa.distinct(user_activity.c.user_id)))
    ).scalar_one()


def activity_summary(
    conn: Connection, rate_window_min: float = 5.0, now: datetime | None = None
) -> dict[str, Any]:
    """Events stored per minute over the last ``rate_window_min`` minutes, and the last time.

    Measured on ``ingested_at``, the wall clock, so that a backfill or a replay of old events
    shows its real throughput and a stalled stream shows zero.
    """
    now_db = to_db_time(now or datetime.now(UTC))
    since = now_db - timedelta(minutes=rate_window_min)
    stored = sa.select(sa.func.count()).where(user_activity.c.ingested_at >= since)
    return {
        "events_per_min": conn.execute(stored).scalar_one() / rate_window_min,
        "last_ingested_at": newest(conn, user_activity.c.ingested_at),
    }


def latest_scores(conn: Connection, hours: float, max_rows: int = MAX_ROWS) -> pd.DataFrame:
    """Each user's latest score among the newest ``max_rows`` of the window, riskiest first.

    "Latest" is the highest row id, the order in which predictions were written: cheaper
    than ranking by time, and the same for one predictor or several writing as they score.
    Only ``id``, ``user_id`` and ``score`` come back; ``prediction_rows`` has the rest.
    """
    until = newest(conn, predictions.c.scored_at)
    if until is None:
        return pd.DataFrame(columns=["id", "user_id", "score"])
    recent = (
        sa.select(predictions.c.id, predictions.c.user_id)
        .where(predictions.c.scored_at >= until - timedelta(hours=hours))
        .order_by(predictions.c.scored_at.desc())
        .limit(max_rows)
        .subquery()
    )
    latest_ids = (
        sa.select(sa.func.max(recent.c.id).label("id")).group_by(recent.c.user_id).subquery()
    )
    query = sa.select(predictions.c.id, predictions.c.user_id, predictions.c.score).join(
        latest_ids, predictions.c.id == latest_ids.c.id
    )
    scores = _frame(conn, query)
    return scores.sort_values(["score", "user_id"], ascending=[False, True], ignore_index=True)


def prediction_rows(conn: Connection, ids: tuple[int, ...]) -> pd.DataFrame:
    """Whole ``predictions`` rows by id, in the order of ``ids``."""
    columns = ["id", "user_id", "scored_at", *SCORE_COLUMNS, "model_version", "latency_ms"]
    if not ids:
        return pd.DataFrame(columns=columns)
    query = sa.select(*(predictions.c[c] for c in columns)).where(
        predictions.c.id.in_(list(ids))
    )
    rows = _frame(conn, query, times=("scored_at",)).set_index("id")
    return rows.loc[list(ids)].reset_index()


def promoted_model(conn: Connection) -> dict[str, Any] | None:
    """The newest promoted run of ``model_runs``: the model being served."""
    query = (
        sa.select(model_runs)
        .where(model_runs.c.promoted == sa.true())
        .order_by(model_runs.c.started_at.desc(), model_runs.c.id.desc())
        .limit(1)
    )
    row = conn.execute(query).mappings().first()
    return dict(row) if row else None


def model_runs_frame(conn: Connection, limit: int = 50) -> pd.DataFrame:
    """The newest training runs, each metric of ``metrics`` as a ``<model> <metric>`` column."""
    query = (
        sa.select(model_runs)
        .order_by(model_runs.c.started_at.desc(), model_runs.c.id.desc())
        .limit(limit)
    )
    runs = _frame(conn, query, times=("started_at",))
    return flatten_metrics(runs)


def flatten_metrics(runs: pd.DataFrame) -> pd.DataFrame:
    """Spread each run's ``metrics`` JSON into ``<model> <metric>`` columns.

    The predictor writes ``{"models": {model: {metric: value}}, "weights": {model: w}}``;
    a flat ``{model: {metric: value}}`` reads the same.
    """
    flat = [_flat_metrics(metrics) for metrics in runs.get("metrics", [])]
    spread = pd.DataFrame(flat, index=runs.index)
    return pd.concat([runs.drop(columns=["metrics"], errors="ignore"), spread], axis=1)


def _flat_metrics(metrics: Any) -> dict[str, float]:
    if not isinstance(metrics, dict):
        return {}
    models = metrics.get("models")
    per_model = models if isinstance(models, dict) else metrics
    flat = {
        f"{model} {name}": value
        for model, values in per_model.items()
        if isinstance(values, dict) and model not in ("weights", "promotion")
        for name, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    weights = metrics.get("weights")
    if isinstance(weights, dict):
        flat.update({f"{model} weight": w for model, w in weights.items()
                     if isinstance(w, int | float)})
    return flat


def live_performance(conn: Connection, limit: int = 2000) -> pd.DataFrame:
    """The newest live-performance evaluations of the feedback loop."""
    query = (
        sa.select(model_performance)
        .order_by(model_performance.c.computed_at.desc(), model_performance.c.id.desc())
        .limit(limit)
    )
    return _frame(conn, query, times=("computed_at",))


def activity_by_type(conn: Connection, hours: float, max_rows: int = MAX_ROWS) -> pd.DataFrame:
    """Event counts per time bucket and event type over the newest ``hours`` of event time.

    Only the newest ``max_rows`` events count, so a busy stream costs a bounded scan; the
    chart then starts later than the window.
    """
    window = time_window(conn, user_activity.c.ts, hours)
    if window is None:
        return pd.DataFrame(columns=["bucket", "event_type", "events"])
    since, width_s = window
    recent = (
        sa.select(user_activity.c.ts, user_activity.c.event_type)
        .where(user_activity.c.ts >= since)
        .order_by(user_activity.c.ts.desc())
        .limit(max_rows)
        .subquery()
    )
    # Grouping on a subquery's column keeps SQL Server from comparing two copies of the
    # bucket expression, each with its own bound parameters.
    rows = sa.select(
        ((epoch_seconds(recent.c.ts) // width_s) * width_s).label("bucket"), recent.c.event_type
    ).subquery()
    query = (
        sa.select(rows.c.bucket, rows.c.event_type, sa.func.count().label("events"))
        .group_by(rows.c.bucket, rows.c.event_type)
        .order_by(rows.c.bucket, rows.c.event_type)
    )
    return _bucket_frame(_frame(conn, query))


def risk_over_time(conn: Connection, hours: float, max_rows: int = MAX_ROWS) -> pd.DataFrame:
    """Mean blended and per-model score per bucket over the newest ``max_rows`` of the window."""
    window = time_window(conn, predictions.c.scored_at, hours)
    if window is None:
        return pd.DataFrame(columns=["bucket", "predictions", *SCORE_COLUMNS])
    since, width_s = window
    recent = (
        sa.select(predictions.c.scored_at, *(predictions.c[c] for c in SCORE_COLUMNS))
        .where(predictions.c.scored_at >= since)
        .order_by(predictions.c.scored_at.desc())
        .limit(max_rows)
        .subquery()
    )
    rows = sa.select(
        ((epoch_seconds(recent.c.scored_at) // width_s) * width_s).label("bucket"),
        *(recent.c[c] for c in SCORE_COLUMNS),
    ).subquery()
    query = (
        sa.select(
            rows.c.bucket,
            sa.func.count().label("predictions"),
            *(sa.func.avg(rows.c[c]).label(c) for c in SCORE_COLUMNS),
        )
        .group_by(rows.c.bucket)
        .order_by(rows.c.bucket)
    )
    return _bucket_frame(_frame(conn, query))


def psi_history(conn: Connection, hours: float, max_rows: int = 20_000) -> pd.DataFrame:
    """PSI evaluations per feature over the newest ``hours`` of drift reports."""
    until = newest(conn, drift_reports.c.evaluated_at)
    columns = ["evaluated_at", "feature", "score", "threshold", "drifted", "model_version"]
    if until is None:
        return pd.DataFrame(columns=columns)
    query = (
        sa.select(*(drift_reports.c[c] for c in columns))
        .where(drift_reports.c.statistic == "psi")
        .where(drift_reports.c.evaluated_at >= until - timedelta(hours=hours))
        .order_by(drift_reports.c.evaluated_at.desc())
        .limit(max_rows)
    )
    return _frame(conn, query, times=("evaluated_at",))


def recent_latencies(conn: Connection, max_rows: int = 20_000) -> pd.DataFrame:
    """Scoring latency of the newest predictions."""
    query = (
        sa.select(predictions.c.scored_at, predictions.c.latency_ms, predictions.c.model_version)
        .order_by(predictions.c.scored_at.desc())
        .limit(max_rows)
    )
    return _frame(conn, query, times=("scored_at",))


def user_events(conn: Connection, user_id: str, max_rows: int = 500) -> pd.DataFrame:
    """One user's newest events."""
    query = (
        sa.select(
            user_activity.c.ts,
            user_activity.c.event_type,
            user_activity.c.numeric_values,
            user_activity.c.categorical_values,
        )
        .where(user_activity.c.user_id == user_id)
        .order_by(user_activity.c.ts.desc())
        .limit(max_rows)
    )
    return _frame(conn, query, times=("ts",))


def user_scores(conn: Connection, user_id: str, max_rows: int = 1000) -> pd.DataFrame:
    """One user's newest predictions."""
    query = (
        sa.select(
            predictions.c.scored_at,
            *(predictions.c[c] for c in SCORE_COLUMNS),
            predictions.c.model_version,
        )
        .where(predictions.c.user_id == user_id)
        .order_by(predictions.c.scored_at.desc())
        .limit(max_rows)
    )
    return _frame(conn, query, times=("scored_at",))
