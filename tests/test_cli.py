"""``churn up``'s own decisions, short of starting the stack (the end-to-end tests do that)."""

import sqlalchemy as sa

from churn_stream import storage
from churn_stream.cli import set_aside_previous_run
from churn_stream.settings import Settings


def test_an_earlier_runs_embedded_database_is_set_aside(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MSSQL_HOST", raising=False)
    path = tmp_path / "churn.db"
    settings = Settings(sqlite_path=path, database_url=None)
    assert set_aside_previous_run(settings) is None  # nothing there yet: nothing to do

    engine = storage.make_engine(settings.resolved_database_url())
    storage.create_schema(engine)
    engine.dispose()
    aside = set_aside_previous_run(settings)

    assert aside == tmp_path / "churn.previous.db"
    assert not path.exists() and aside.exists()
    assert "user_activity" in sa.inspect(storage.make_engine(f"sqlite:///{aside}")).get_table_names()


def test_a_configured_database_is_never_moved(tmp_path) -> None:
    path = tmp_path / "mine.db"
    storage.create_schema(storage.make_engine(f"sqlite:///{path}"))
    settings = Settings(sqlite_path=tmp_path / "churn.db", database_url=f"sqlite:///{path}")
    assert set_aside_previous_run(settings) is None
    assert path.exists()
