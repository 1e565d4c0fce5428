"""Session fixtures: one real broker for the run, a unique namespace and database per test."""

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from churn_stream import storage
from churn_stream.kafka_io import ensure_topics
from churn_stream.settings import Settings
from tests.brokers import start_broker

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def broker() -> Iterator:
    """The real broker every Kafka test of this run talks to."""
    running = start_broker()
    print(f"\ntest broker: {running.kind} at {running.bootstrap_servers}")
    yield running
    running.close()


@pytest.fixture
def settings(broker, tmp_path: Path) -> Settings:
    """Settings with topics, groups and a SQLite file of this test's own."""
    tag = uuid.uuid4().hex[:8]
    return Settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        database_url=f"sqlite:///{tmp_path / 'churn.db'}",
        topic_activity=f"user-activity-{tag}",
        topic_dead_letter=f"user-activity-{tag}.dlq",
        topic_predictions=f"churn-predictions-{tag}",
        topic_feedback=f"churn-feedback-{tag}",
        topic_control=f"model-control-{tag}",
        topic_partitions=3,
        consumer_group=f"churn-consumer-{tag}",
        predictor_group=f"churn-predictor-{tag}",
        consumer_metrics_port=0,
        producer_metrics_port=0,
        feedback_loop_metrics_port=0,
    )


@pytest.fixture
def topics(settings: Settings) -> Settings:
    """The test's topics, created on the broker."""
    ensure_topics(settings)
    return settings


@pytest.fixture
def engine(settings: Settings) -> Iterator[sa.Engine]:
    """The test's database with the schema in place."""
    db = storage.make_engine(settings.resolved_database_url())
    storage.create_schema(db)
    yield db
    db.dispose()


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that gives a service process these settings."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return env | settings.environment() | extra


def start_service(script: str, settings: Settings, *args: str, **env: str) -> subprocess.Popen:
    """Run one of the top-level services as a real process with the test's settings."""
    return subprocess.Popen(
        [sys.executable, "-u", str(ROOT / script), *args],
        cwd=ROOT,
        env=settings_env(settings, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def wait_until(condition: Callable[[], bool], timeout_s: float, every_s: float = 0.2) -> bool:
    """Poll ``condition`` until it holds or time runs out; returns whether it held."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return condition()


def count_rows(engine: sa.Engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
