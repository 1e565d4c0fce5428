"""The database: one schema for SQLite and SQL Server, created idempotently at start-up.

Times are stored as naive UTC (``to_db_time``); SQLite has no time zones and SQL Server's
``DATETIME2`` none either, so the convention is kept at this boundary and nowhere else.
"""

import json
import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from functools import cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection, Engine

from churn_stream.events import Event

log = logging.getLogger(__name__)

metadata = sa.MetaData()
# SQLite only autoincrements an INTEGER PRIMARY KEY; elsewhere the ids may grow past 2**31.
RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

user_activity = sa.Table(
    "user_activity",
    metadata,
    sa.Column("event_id", sa.String(36), primary_key=True),
    sa.Column("user_id", sa.String(128), nullable=False),
    sa.Column("event_type", sa.String(48), nullable=False),
    sa.Column("ts", sa.DateTime, nullable=False),
    sa.Column("numeric_values", sa.JSON, nullable=False),
    sa.Column("categorical_values", sa.JSON, nullable=False),
    sa.Column("ingested_at", sa.DateTime, nullable=False),
    sa.Index("ix_user_activity_user_ts", "user_id", "ts"),
    sa.Index("ix_user_activity_ts", "ts"),
    # The dashboard's ingestion rate: rows stored in the last minutes, whatever their event time.
    sa.Index("ix_user_activity_ingested", "ingested_at"),
)

predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", RowId, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.String(128), nullable=False),
    sa.Column("scored_at", sa.DateTime, nullable=False),
    sa.Column("event_ts", sa.DateTime, nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("score_rf", sa.Float),
    sa.Column("score_xgb", sa.Float),
    sa.Column("score_seq", sa.Float),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Index("ix_predictions_user_scored", "user_id", "scored_at"),
    sa.Index("ix_predictions_scored", "scored_at"),
    sa.Index("ix_predictions_user_event", "user_id", "event_ts"),
)

feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("feedback_id", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.String(128), nullable=False),
    sa.Column("churned", sa.Boolean, nullable=False),
    sa.Column("observed_at", sa.DateTime, nullable=False),
    sa.Column("source", sa.String(64)),
    sa.Column("received_at", sa.DateTime, nullable=False),
    sa.Column("published_at", sa.DateTime),
    sa.Index("ix_feedback_user", "user_id"),
    sa.Index("ix_feedback_unpublished", "published_at"),
)

model_runs = sa.Table(
    "model_runs",
    metadata,
    sa.Column("id", RowId, primary_key=True, autoincrement=True),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("instance", sa.String(128), nullable=False),
    sa.Column("reason", sa.String(16), nullable=False),
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("seconds", sa.Float, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("promoted", sa.Boolean, nullable=False),
    sa.Column("error", sa.Text),
)

drift_reports = sa.Table(
    "drift_reports",
    metadata,
    sa.Column("id", RowId, primary_key=True, autoincrement=True),
    sa.Column("evaluated_at", sa.DateTime, nullable=False),
    sa.Column("instance", sa.String(128), nullable=False),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("feature", sa.String(128), nullable=False),
    sa.Column("statistic", sa.String(16), nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("drifted", sa.Boolean, nullable=False),
    sa.Column("n_reference", sa.Integer, nullable=False),
    sa.Column("n_current", sa.Integer, nullable=False),
    sa.Index("ix_drift_reports_evaluated", "evaluated_at"),
)

model_performance = sa.Table(
    "model_performance",
    metadata,
    sa.Column("id", RowId, primary_key=True, autoincrement=True),
    sa.Column("computed_at", sa.DateTime, nullable=False),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("n_labelled", sa.Integer, nullable=False),
    sa.Column("n_churned", sa.Integer, nullable=False),
    sa.Column("roc_auc", sa.Float),
    sa.Column("brier", sa.Float),
    sa.Column("precision_at_k", sa.Float),
    sa.Column("k", sa.Integer),
    sa.Column("calibration_error", sa.Float),
)


def to_db_time(value: datetime) -> datetime:
    """Naive UTC, the form every time column holds."""
    if value.tzinfo is None:
        return value
    return value.astimezone(UTC).replace(tzinfo=None)


def from_db_time(value: datetime) -> datetime:
    """An aware UTC datetime from a time column."""
    return value.replace(tzinfo=UTC)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine with the per-dialect settings this project relies on."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, parsed.database, **kwargs)
    if parsed.get_backend_name() == "mssql":
        kwargs.setdefault("fast_executemany", True)
    return sa.create_engine(url, pool_pre_ping=True, **kwargs)


def _sqlite_engine(url: str, path: str | None, **kwargs: Any) -> Engine:
    if path and path != ":memory:":
        from pathlib import Path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, **kwargs)

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        # WAL lets the dashboard read while the services write; the busy timeout turns a
        # brief lock into a wait instead of an error.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.close()

    return engine


def create_schema(engine: Engine) -> None:
    """Create any missing table; safe to call from every service at start-up."""
    try:
        metadata.create_all(engine, checkfirst=True)
    except sa.exc.OperationalError:
        # Two services starting together may race on CREATE TABLE; the loser checks again.
        log.info("schema creation raced with another process; checking again")
        metadata.create_all(engine, checkfirst=True)


def event_row(event: Event, ingested_at: datetime) -> dict[str, Any]:
    """The ``user_activity`` row of an event."""
    return {
        "event_id": str(event.event_id),
        "user_id": event.user_id,
        "event_type": event.event_type,
        "ts": to_db_time(event.ts),
        "numeric_values": dict(event.numeric),
        "categorical_values": dict(event.categorical),
        "ingested_at": to_db_time(ingested_at),
    }


def insert_idempotent(conn: Connection, table: sa.Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert rows whose primary key is not stored yet; the others are left as they are."""
    if rows:
        conn.execute(idempotent_insert(table, conn.dialect.name), list(rows))


def idempotent_insert(table: sa.Table, dialect_name: str) -> sa.Executable:
    """An INSERT that skips rows whose primary key exists, in the dialect's own idiom."""
    (key,) = table.primary_key.columns
    if dialect_name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=[key.name])
    # SQL Server has no ON CONFLICT: insert from a one-row SELECT guarded by NOT EXISTS.
    # UPDLOCK+HOLDLOCK keeps two writers of the same key from both passing the check.
    values = [sa.bindparam(c.name, type_=c.type) for c in table.columns]
    guard = (
        sa.select(sa.literal_column("1"))
        .select_from(table)
        .with_hint(table, "WITH (UPDLOCK, HOLDLOCK)", "mssql")
        .where(key == sa.bindparam(key.name, type_=key.type))
    )
    source = sa.select(*values).where(~sa.exists(guard))
    return sa.insert(table).from_select([c.name for c in table.columns], source)


EventRecord = tuple[str, str, str, str, str, str]
"""An event as the consumer holds it until it is stored: ``event_id``, ``user_id``,
``event_type``, ``ts`` as naive UTC text and the JSON text of ``numeric`` and
``categorical``, the values SQLite stores. A tuple of strings is invisible to Python's
cyclic garbage collector, which an ``Event`` (six container objects) is not: with batches of
thousands of events in hand, the collector's full passes over them, and over everything
else the process holds, took 30% of the consumer's time in bench/ingest.py (2.9 of 9.5 s;
0.9 of 5.6 s with records)."""
RECORD_COLUMNS = ("event_id", "user_id", "event_type", "ts", "numeric_values",
                  "categorical_values")
"""The ``user_activity`` columns of an ``EventRecord``, in its order."""


def event_record(event: Event) -> EventRecord:
    """The values of an event's ``user_activity`` row but ``ingested_at``, as text."""
    return (str(event.event_id), event.user_id, event.event_type, _sqlite_time(event.ts),
            _json_text(event.numeric), _json_text(event.categorical))


def write_events(engine: Engine, events: Iterable[Event], ingested_at: datetime) -> int:
    """Store a batch of events in one transaction, each ``event_id`` once; returns the count."""
    return write_records(engine, map(event_record, events), ingested_at)


def write_records(engine: Engine, records: Iterable[EventRecord], ingested_at: datetime) -> int:
    """``write_events`` for events already made records."""
    with engine.begin() as conn:
        return insert_records(conn, records, ingested_at)


def insert_records(conn: Connection, records: Iterable[EventRecord],
                   ingested_at: datetime) -> int:
    """Insert events in ``conn``'s open transaction, each ``event_id`` once (the last of a
    repeated one), and return the count; committing is the caller's."""
    unique = {record[0]: record for record in records}
    if conn.dialect.name == "sqlite":
        _insert_records_sqlite(conn, unique.values(), ingested_at)
    else:
        insert_idempotent(conn, user_activity,
                          [record_row(r, ingested_at) for r in unique.values()])
    return len(unique)


def record_row(record: EventRecord, ingested_at: datetime) -> dict[str, Any]:
    """The ``user_activity`` row of a record, typed as ``event_row`` types it."""
    event_id, user_id, event_type, ts, numeric, categorical = record
    return {"event_id": event_id, "user_id": user_id, "event_type": event_type,
            "ts": datetime.fromisoformat(ts), "numeric_values": json.loads(numeric),
            "categorical_values": json.loads(categorical),
            "ingested_at": to_db_time(ingested_at)}


def _insert_records_sqlite(conn: Connection, records: Iterable[EventRecord],
                           ingested_at: datetime) -> None:
    """The SQLite form of the idempotent insert, binding the records' text as it is.

    The values are the ones SQLAlchemy's column types would bind (its SQLite ``DateTime``
    text, JSON from ``json.dumps``), so the rows are the same byte for byte (a test holds
    them equal); what is skipped is its per-row parameter processing, which took half of
    the consumer's time per event (12 of 22 microseconds a row, measured here).
    """
    # Event ids are random and users interleave, so a batch inserts into the primary key
    # and the user index at thousands of scattered pages; SQLite's 2 MB default cache did
    # not hold them, and rows read pages back from the OS (10 against 6 microseconds a row
    # at 200,000 rows, here). 64 MB for this connection; it grows only as pages are used.
    conn.exec_driver_sql("PRAGMA cache_size = -65536")
    stored_at = (_sqlite_time(ingested_at),)
    conn.exec_driver_sql(_sqlite_event_insert(), [record + stored_at for record in records])


@cache
def _sqlite_event_insert() -> str:
    """The compiled INSERT ... ON CONFLICT DO NOTHING, its parameters in record order
    followed by ``ingested_at``."""
    compiled = idempotent_insert(user_activity, "sqlite").compile(
        dialect=sqlite.dialect(), column_keys=[c.name for c in user_activity.columns])
    order = tuple(compiled.positiontup or ())
    assert order == (*RECORD_COLUMNS, "ingested_at"), order
    return str(compiled)


def _sqlite_time(value: datetime) -> str:
    """A time as SQLAlchemy's SQLite ``DateTime`` stores it: naive UTC text, microseconds."""
    if value.tzinfo is UTC:
        # What validated events hold; the text without its "+00:00" is the naive form
        # (four-digit years always), faster than converting first.
        return value.isoformat(" ", "microseconds")[:26]
    return to_db_time(value).isoformat(" ", "microseconds")


def _json_text(value: dict[str, Any]) -> str:
    return json.dumps(value) if value else "{}"
