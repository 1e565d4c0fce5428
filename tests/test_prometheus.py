"""``prometheus.yml``: valid for promtool, one job per service on its Settings port, and a real
Prometheus (Debian's package) scraping a locally running predictor and consumer.
"""

import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml

from churn_stream import storage
from churn_stream.kafka_io import make_producer
from churn_stream.settings import Settings
from churn_stream.simulator import Simulator
from tests.brokers import free_port
from tests.conftest import settings_env, wait_until

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "prometheus.yml"
COMPOSE = ROOT / "docker-compose.yml"
OWNS_PARTITIONS = re.compile(r"own partitions \[\d")
# The Settings field that holds each compose service's /metrics port.
METRICS_PORTS = {
    "consumer": "consumer_metrics_port",
    "predictor": "predictor_port",
    "feedback-api": "feedback_api_port",
    "feedback-loop": "feedback_loop_metrics_port",
    "producer": "producer_metrics_port",
}


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def jobs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in config["scrape_configs"]}


def local_variant(config: dict[str, Any], ports: dict[str, int], prometheus_port: int,
                  interval_s: float = 1.0) -> dict[str, Any]:
    """The compose config with each service's DNS discovery replaced by 127.0.0.1:port.

    Services missing from ``ports`` are left out: a local test runs only some of them.
    """
    local = {"global": {**config["global"], "scrape_interval": f"{interval_s:g}s",
                        "scrape_timeout": f"{interval_s:g}s"}, "scrape_configs": []}
    for name in jobs(config):
        if name == "prometheus":
            target = f"127.0.0.1:{prometheus_port}"
        elif name in ports:
            target = f"127.0.0.1:{ports[name]}"
        else:
            continue
        local["scrape_configs"].append({"job_name": name,
                                        "static_configs": [{"targets": [target]}]})
    return local


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return binary


@pytest.mark.timeout(60)
def test_promtool_accepts_the_config() -> None:
    done = subprocess.run([promtool(), "check", "config", str(CONFIG)],
                          capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(60)
def test_promtool_accepts_the_local_variant(tmp_path: Path) -> None:
    defaults = Settings()
    ports = {name: getattr(defaults, field) for name, field in METRICS_PORTS.items()}
    path = tmp_path / "prometheus.local.yml"
    path.write_text(yaml.safe_dump(local_variant(load(CONFIG), ports, 9090)))
    done = subprocess.run([promtool(), "check", "config", str(path)],
                          capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_service_is_scraped_under_its_compose_name_on_its_settings_port() -> None:
    defaults = Settings()
    scraped = jobs(load(CONFIG))
    assert set(scraped) == {"prometheus", *METRICS_PORTS}
    assert scraped["prometheus"]["static_configs"] == [{"targets": ["localhost:9090"]}]
    services = set(load(COMPOSE)["services"])
    for name, field in METRICS_PORTS.items():
        (discovery,) = scraped[name]["dns_sd_configs"]
        assert discovery == {"names": [name], "type": "A", "port": getattr(defaults, field),
                             "refresh_interval": "15s"}
        assert name in services


def test_local_variant_targets_loopback_ports() -> None:
    local = local_variant(load(CONFIG), {"predictor": 18000}, prometheus_port=19090)
    assert local["scrape_configs"] == [
        {"job_name": "prometheus", "static_configs": [{"targets": ["127.0.0.1:19090"]}]},
        {"job_name": "predictor", "static_configs": [{"targets": ["127.0.0.1:18000"]}]},
    ]
    assert local["global"]["scrape_interval"] == "1s"


# --- a real Prometheus against a running predictor and consumer ---------------------------------

def seed_history(engine: sa.Engine, users: int, days: float, seed: int) -> list:
    """Store all but the last day of a simulated history; return that last day's events."""
    start = datetime.now(UTC) - timedelta(days=days)
    live_from = start + timedelta(days=days - 1)
    past, live = [], []
    for event in Simulator(users, start, days, seed=seed).events():
        (past if event.ts < live_from else live).append(event)
    storage.write_events(engine, past, datetime.now(UTC))
    return live


def send_events(settings: Settings, events: list) -> None:
    producer = make_producer(settings.bootstrap_servers)
    for event in events:
        producer.send(settings.topic_activity, key=event.key(), value=event.to_bytes())
    producer.flush()
    producer.close()


def query(prometheus: str, expression: str) -> list[dict[str, Any]]:
    """An instant query through Prometheus' HTTP API; [] while it has no data."""
    try:
        answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expression}, timeout=5)
    except httpx.HTTPError:
        return []
    return answer.json()["data"]["result"] if answer.status_code == 200 else []


def status(url: str) -> int:
    """The HTTP status of a GET, 0 while nothing answers."""
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def run_logged(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A process in the repository root whose output goes to ``log``."""
    with log.open("wb") as sink:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:]


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it does not end within 30 s."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_prometheus_reads_the_predictors_latency_histogram(
    topics: Settings, engine: sa.Engine, tmp_path: Path
) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian package prometheus)")
    if not (ROOT / "predictor.py").exists():
        pytest.skip("predictor.py is not written yet")
    settings = topics.model_copy(update={"predictor_port": free_port(),
                                         "consumer_metrics_port": free_port()})
    # Enough settled labels for the first training run: 300 users over 60 days.
    live = seed_history(engine, users=300, days=60, seed=5)
    web_port = free_port()
    config = local_variant(load(CONFIG), {"predictor": settings.predictor_port,
                                          "consumer": settings.consumer_metrics_port}, web_port)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    logs = {name: tmp_path / f"{name}.log" for name in ("predictor", "consumer", "prometheus")}
    processes = {
        "predictor": run_logged([sys.executable, "-u", "predictor.py"], logs["predictor"],
                                settings_env(settings)),
        "consumer": run_logged([sys.executable, "-u", "consumer.py"], logs["consumer"],
                               settings_env(settings)),
        "prometheus": run_logged(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{web_port}"], logs["prometheus"]),
    }
    api = f"http://127.0.0.1:{web_port}"
    try:
        health = f"http://127.0.0.1:{settings.predictor_port}/health"
        assert wait_until(lambda: status(health) == 200, 300, every_s=1), tail(logs["predictor"])
        assert wait_until(lambda: len(query(api, "up == 1")) == 3, 30), query(api, "up")
        # Without partitions the predictor scores nothing; say so rather than time out later.
        assert wait_until(lambda: OWNS_PARTITIONS.search(tail(logs["predictor"], 20_000)), 60), \
            "the predictor owns no partitions:\n" + tail(logs["predictor"])
        send_events(settings, live)
        latency = 'model_prediction_latency_seconds_count{job="predictor",model="blend"}'
        assert wait_until(lambda: any(float(r["value"][1]) > 0 for r in query(api, latency)),
                          90, every_s=1), tail(logs["predictor"])
        (series,) = query(api, latency)
        assert series["metric"]["instance"] == f"127.0.0.1:{settings.predictor_port}"
    finally:
        # How the services exit is their own tests' business; here they only need to stop.
        for process in processes.values():
            stop(process)
