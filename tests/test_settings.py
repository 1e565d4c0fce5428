"""Settings from the environment: empty means unset, a bad value stops a service in one line."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from churn_stream.errors import ConfigurationError
from churn_stream.settings import Settings, get_settings
from tests.brokers import free_port
from tests.conftest import ROOT

ENTRY_POINTS = {
    "consumer": [str(ROOT / "consumer.py")],
    "predictor": [str(ROOT / "predictor.py")],
    "feedback loop": [str(ROOT / "feedback_loop.py")],
    "producer": [str(ROOT / "producer.py")],
    "feedback API": [str(ROOT / "feedback_api.py")],
    "churn up": ["-c", "from churn_stream.cli import app; app()", "up"],
}


def run_with(tmp_path: Path, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """Run an entry point in an empty directory (no ``.env``) with ``env`` added."""
    environment = {k: v for k, v in os.environ.items() if k != "LOG_LEVEL"} | env
    return subprocess.run([sys.executable, "-u", *argv], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=90)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("argv", ENTRY_POINTS.values(), ids=ENTRY_POINTS.keys())
def test_a_bad_setting_is_one_error_line_naming_it_and_exit_1(
    tmp_path: Path, argv: list[str]
) -> None:
    done = run_with(tmp_path, argv, PREDICTOR_FIRST_RUN_USERS="-1")
    output = done.stdout + done.stderr
    errors = [line for line in output.splitlines() if "ERROR" in line.split()]
    assert done.returncode == 1, output
    assert "Traceback" not in output and "pydantic" not in output, output
    assert len(errors) == 1, output
    assert "PREDICTOR_FIRST_RUN_USERS='-1'" in errors[0]
    assert "greater than or equal to 0" in errors[0]


def test_every_bad_variable_is_named_with_its_value_cut_short(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOPIC_PARTITIONS", "0")
    monkeypatch.setenv("BATCH_MAX_RECORDS", "x" * 500)
    monkeypatch.setenv("MSSQL_PORT", "not-a-port")
    get_settings.cache_clear()
    with pytest.raises(ConfigurationError) as caught:
        get_settings()
    assert str(caught.value).startswith("invalid setting MSSQL_PORT='not-a-port': ")
    monkeypatch.delenv("MSSQL_PORT")
    with pytest.raises(ConfigurationError) as caught:
        get_settings()
    message = str(caught.value)
    assert "TOPIC_PARTITIONS='0': Input should be greater than or equal to 1" in message
    assert f"BATCH_MAX_RECORDS='{'x' * 40}': Input should be a valid integer" in message
    get_settings.cache_clear()


@pytest.mark.parametrize("variable", ["PREDICTOR_FIRST_RUN_USERS", "TOPIC_PARTITIONS",
                                      "DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "MSSQL_HOST"])
def test_an_empty_variable_means_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, "")
    settings = Settings()
    assert settings.predictor_first_run_users == 1000 and settings.topic_partitions == 6
    assert settings.resolved_database_url() == "sqlite:///data/churn.db"
    assert settings.bootstrap_servers == "127.0.0.1:19092"


@pytest.mark.parametrize("variable", ["PREDICTOR_PORT", "DASHBOARD_PORT", "MSSQL_PORT",
                                      "EMBEDDED_BROKER_PORT", "CONSUMER_METRICS_PORT"])
def test_a_port_outside_0_to_65535_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, "70000")
    get_settings.cache_clear()
    with pytest.raises(ConfigurationError, match=f"{variable}='70000': Input should be less"):
        get_settings()
    get_settings.cache_clear()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["predictor", "churn up"])
def test_an_unknown_log_level_is_one_error_line_and_exit_1(tmp_path: Path, name: str) -> None:
    done = run_with(tmp_path, ENTRY_POINTS[name], LOG_LEVEL="loud")
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output, output
    (line,) = [line for line in output.splitlines() if "ERROR" in line.split()]
    assert "LOG_LEVEL='LOUD'" in line and "DEBUG" in line


@pytest.mark.timeout(120)
@pytest.mark.parametrize("taken", ["port", "host"])
def test_an_address_the_predictor_cannot_listen_on_is_one_error_line_naming_it(
    tmp_path: Path, taken: str
) -> None:
    no_broker = f"127.0.0.1:{free_port()}"  # the address is checked before the broker
    host = "127.0.0.1" if taken == "port" else "not_a_host"
    with socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]
        done = run_with(tmp_path, ENTRY_POINTS["predictor"], PREDICTOR_PORT=str(port),
                        PREDICTOR_HTTP_HOST=host, KAFKA_BOOTSTRAP_SERVERS=no_broker)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output, output
    (line,) = [line for line in output.splitlines() if "ERROR" in line.split()]
    if taken == "port":
        assert f"127.0.0.1:{port} (PREDICTOR_HTTP_HOST, PREDICTOR_PORT) is in use" in line
    else:
        assert "PREDICTOR_HTTP_HOST='not_a_host' does not resolve" in line
