"""``churn up``'s own decisions, short of starting the stack (the end-to-end tests do that)."""

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from churn_stream import storage
from churn_stream.cli import LOCK_NAME, running_alone, set_aside_previous_run
from churn_stream.settings import Settings
from tests.brokers import free_port


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


# -- a start that is refused touches nothing in data/ ------------------------------------------

SERVICE_PORTS = ("PREDICTOR_PORT", "FEEDBACK_API_PORT", "DASHBOARD_PORT", "CONSUMER_METRICS_PORT",
                 "PRODUCER_METRICS_PORT", "FEEDBACK_LOOP_METRICS_PORT")
UNSET = ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "MSSQL_HOST", "SQLITE_PATH", "LOG_LEVEL")


@pytest.fixture
def listening() -> Iterator[Callable[[], int]]:
    """Opens a listening socket on a free loopback port and returns the port; all are closed
    after the test."""
    sockets: list[socket.socket] = []

    def listen() -> int:
        sockets.append(socket.create_server(("127.0.0.1", 0)))
        return sockets[-1].getsockname()[1]

    yield listen
    for sock in sockets:
        sock.close()


@pytest.fixture
def earlier_run(tmp_path: Path, listening: Callable[[], int]) -> dict[str, str]:
    """An earlier run's databases under ``tmp_path/data``, and the environment of a ``churn up``
    there: the embedded database and broker, every port free but the broker's, which is taken
    so that a start that got past its checks stops there instead of running a stack."""
    data = tmp_path / "data"
    data.mkdir()
    for name, user_id in (("churn.db", "current"), ("churn.previous.db", "older")):
        engine = storage.make_engine(f"sqlite:///{data / name}")
        storage.create_schema(engine)
        with engine.begin() as conn:
            conn.execute(storage.feedback.insert().values(
                feedback_id=user_id, user_id=user_id, churned=True,
                observed_at=storage.to_db_time(datetime.now(UTC)),
                received_at=storage.to_db_time(datetime.now(UTC)), source="test"))
        engine.dispose()
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    return env | {name: str(free_port()) for name in SERVICE_PORTS} | {
        "EMBEDDED_BROKER_PORT": str(listening())}


def data_files(tmp_path: Path) -> dict[str, bytes]:
    """Every file under data/ but the lock, with its bytes."""
    return {path.name: path.read_bytes() for path in (tmp_path / "data").iterdir()
            if path.name != LOCK_NAME}


def churn_up(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-u", "-c", "from churn_stream.cli import app; app()",
                           "up", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    return done.returncode, done.stdout + done.stderr


def the_error_line(output: str) -> str:
    assert "Traceback" not in output, output
    (line,) = [line for line in output.splitlines() if "ERROR" in line.split()]
    return line


@pytest.mark.timeout(90)
def test_a_second_churn_up_leaves_the_running_ones_database_alone(
    tmp_path: Path, earlier_run: dict[str, str]
) -> None:
    before = data_files(tmp_path)
    with running_alone(Settings(sqlite_path=tmp_path / "data" / "churn.db")):
        code, output = churn_up(tmp_path, earlier_run)
    assert code == 1, output
    assert data_files(tmp_path) == before, output
    assert f"another `churn up` (pid {os.getpid()})" in the_error_line(output)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("refusal", ["broker port", "service port", "host", "replay"])
def test_a_refused_start_leaves_the_earlier_run_alone(
    tmp_path: Path, earlier_run: dict[str, str], listening: Callable[[], int], refusal: str
) -> None:
    before = data_files(tmp_path)
    args: list[str] = []
    if refusal == "broker port":
        port = int(earlier_run["EMBEDDED_BROKER_PORT"])
        expected = f"127.0.0.1:{port} (EMBEDDED_BROKER_PORT) is in use"
    elif refusal == "service port":
        earlier_run["PREDICTOR_PORT"] = str(port := listening())
        expected = f"127.0.0.1:{port} (PREDICTOR_HTTP_HOST, PREDICTOR_PORT) is in use"
    elif refusal == "host":
        earlier_run["PREDICTOR_HTTP_HOST"] = "not_a_host"
        expected = "PREDICTOR_HTTP_HOST='not_a_host' does not resolve"
    else:
        args = [f"--replay={tmp_path / 'missing.csv'}"]
        expected = f"no replay named '{tmp_path / 'missing.csv'}'"

    code, output = churn_up(tmp_path, earlier_run, *args)

    assert code == 1, output
    assert data_files(tmp_path) == before, output
    assert expected in the_error_line(output)
