"""The schema and the idempotent insert, on SQLite for real and as SQL Server would get it."""

import re
from datetime import UTC, datetime, timedelta, timezone

import sqlalchemy as sa
from sqlalchemy.dialects import mssql

from churn_stream import storage
from churn_stream.events import Event
from churn_stream.settings import MssqlSettings, Settings
from mssql_config import mssql_url
from tests.conftest import count_rows

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def make_events(n: int) -> list[Event]:
    return [Event(user_id=f"u{i % 7}", event_type="login", ts=NOW) for i in range(n)]


def test_the_schema_names_every_table_and_creating_it_twice_is_harmless(tmp_path) -> None:
    engine = storage.make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    storage.create_schema(engine)
    storage.create_schema(engine)
    names = set(sa.inspect(engine).get_table_names())
    assert {"user_activity", "predictions", "feedback", "model_runs", "drift_reports"} <= names


def test_sqlite_runs_in_wal_mode(engine) -> None:
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_a_batch_written_twice_is_stored_once(engine) -> None:
    events = make_events(50)
    storage.write_events(engine, events, NOW)
    storage.write_events(engine, events[10:] + make_events(5), NOW)
    assert count_rows(engine, storage.user_activity) == 55


def test_duplicates_inside_one_batch_are_stored_once(engine) -> None:
    events = make_events(20)
    assert storage.write_events(engine, events + events, NOW) == 20
    assert count_rows(engine, storage.user_activity) == 20


def test_the_sqlite_fast_path_stores_what_the_column_types_would(tmp_path) -> None:
    # Times with and without microseconds, in another zone, empty and filled properties,
    # text that JSON must escape.
    events = [
        Event(user_id="u1", event_type="login", ts=datetime(2026, 6, 1, 12, 0, tzinfo=UTC)),
        Event(user_id="u2", event_type="purchase",
              ts=datetime(2026, 6, 1, 14, 30, 5, 120, tzinfo=timezone(timedelta(hours=2))),
              numeric={"amount": 12.5, "items": 3.0}, categorical={"plan": 'b"ä\\sic'}),
        Event(user_id="ü3", event_type="plan_change", ts=datetime(2001, 12, 31, 23, 59, 59,
              999999, tzinfo=UTC), categorical={"plan": "pro"}),
    ]
    ingested = datetime(2026, 6, 1, 15, 0, 0, 5, tzinfo=UTC)
    typed = storage.make_engine(f"sqlite:///{tmp_path / 'typed.db'}")
    fast = storage.make_engine(f"sqlite:///{tmp_path / 'fast.db'}")
    for engine in (typed, fast):
        storage.create_schema(engine)
    with typed.begin() as conn:
        storage.insert_idempotent(conn, storage.user_activity,
                                  [storage.event_row(e, ingested) for e in events])
    assert storage.write_events(fast, events, ingested) == 3

    def raw(engine: sa.Engine) -> list[tuple]:
        with engine.connect() as conn:
            return conn.exec_driver_sql("SELECT * FROM user_activity ORDER BY event_id").all()

    assert raw(fast) == raw(typed)
    assert len(raw(fast)) == 3


def test_a_record_gives_other_databases_the_row_an_event_gives() -> None:
    # SQL Server is written through the column types from records, as from events before.
    events = [
        Event(user_id="u1", event_type="login", ts=datetime(2026, 6, 1, 12, 0, tzinfo=UTC)),
        Event(user_id="ü2", event_type="purchase",
              ts=datetime(2001, 1, 1, 0, 30, 5, 120, tzinfo=timezone(timedelta(hours=2))),
              numeric={"amount": 12.5, "items": 3.0, "tiny": 1e-300},
              categorical={"plan": 'b"ä\\sic\n'}),
    ]
    ingested = datetime(2026, 6, 1, 15, 0, 0, 5, tzinfo=UTC)
    for event in events:
        row = storage.record_row(storage.event_record(event), ingested)
        assert row == storage.event_row(event, ingested)
        assert [type(v) for v in row.values()] == [
            type(v) for v in storage.event_row(event, ingested).values()]


def test_rows_keep_their_values(engine) -> None:
    event = Event(
        user_id="u9",
        event_type="purchase",
        ts=NOW,
        numeric={"amount": 12.5},
        categorical={"plan": "basic"},
    )
    storage.write_events(engine, [event], NOW)
    with engine.connect() as conn:
        row = conn.execute(sa.select(storage.user_activity)).one()
    assert row.event_id == str(event.event_id)
    assert storage.from_db_time(row.ts) == NOW
    assert row.numeric_values == {"amount": 12.5}
    assert row.categorical_values == {"plan": "basic"}


def test_sql_server_gets_a_guarded_insert_with_bound_parameters() -> None:
    dialect = mssql.pyodbc.dialect(paramstyle="qmark")
    statement = storage.idempotent_insert(storage.user_activity, "mssql")
    sql = str(statement.compile(dialect=dialect))
    flat = " ".join(sql.split())
    assert flat.startswith("INSERT INTO user_activity (event_id, user_id, event_type, ts,")
    assert "WHERE NOT (EXISTS (SELECT" in flat
    assert "FROM user_activity WITH (UPDLOCK, HOLDLOCK) WHERE user_activity.event_id = ?" in flat
    # Every value is a bound parameter: seven columns, and the key again in the guard.
    assert flat.count("?") == 8
    assert not re.search(r"'[^']*'", flat), "no literal strings in the statement"


def test_sql_server_tables_compile_to_valid_ddl() -> None:
    dialect = mssql.pyodbc.dialect(paramstyle="qmark")
    ddl = str(sa.schema.CreateTable(storage.user_activity).compile(dialect=dialect))
    assert "event_id VARCHAR(36) NOT NULL" in ddl
    assert "ts DATETIME NOT NULL" in ddl or "ts DATETIME2 NOT NULL" in ddl
    assert "PRIMARY KEY (event_id)" in ddl


def test_mssql_url_is_assembled_from_parts_and_masked_for_logs() -> None:
    parts = MssqlSettings(
        host="db",
        port=1433,
        database="churn",
        user="sa",
        password="p@ss word;",
        driver="ODBC Driver 18 for SQL Server",
    )
    url = mssql_url(parts)
    assert url.startswith("mssql+pyodbc://sa:p%40ss word%3B@db:1433/churn?")
    parsed = sa.engine.make_url(url)
    assert parsed.password == "p@ss word;"
    assert parsed.query["driver"] == "ODBC Driver 18 for SQL Server"
    assert "p@ss" not in mssql_url(parts, masked=True)


def test_database_url_precedence(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("MSSQL_HOST", raising=False)
    monkeypatch.chdir(tmp_path)
    assert Settings().resolved_database_url() == "sqlite:///data/churn.db"
    monkeypatch.setenv("MSSQL_HOST", "sqlserver")
    monkeypatch.setenv("MSSQL_PASSWORD", "secret")
    assert Settings().resolved_database_url().startswith("mssql+pyodbc://sa:secret@sqlserver")
    assert "secret" not in str(Settings().describe())
    monkeypatch.setenv("DATABASE_URL", "sqlite:///elsewhere.db")
    assert Settings().resolved_database_url() == "sqlite:///elsewhere.db"
