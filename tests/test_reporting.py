"""The simulated CRM: which outcomes it reports, when, and that re-sends store nothing twice."""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
import uvicorn
from pydantic import SecretStr

from churn_stream import storage
from churn_stream.api import create_app
from churn_stream.reporting import (
    FeedbackClient,
    OutcomeReporter,
    Report,
    feedback_id_for,
    plan_reports,
)
from churn_stream.settings import Settings
from churn_stream.simulator import Simulator, SimUser
from tests.brokers import free_port
from tests.conftest import count_rows, wait_until

START = datetime(2025, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)


def hand_made_simulator() -> Simulator:
    """Two users over 70 days: one churns on day 40, one stays."""
    simulator = Simulator(0, START, 70, seed=0)
    simulator.users = [
        SimUser("leaver", "basic", tenure_days=25, engagement=0.5, churn_at=START + 40 * DAY,
                decline_days=10, goes_silent=False),
        SimUser("stayer", "premium", tenure_days=0, engagement=0.5, churn_at=None,
                decline_days=10, goes_silent=False),
    ]
    return simulator


def test_every_renewal_and_the_churn_are_planned() -> None:
    reports = plan_reports(hand_made_simulator(), share=1.0, delay_s=0)
    noon = timedelta(hours=12)
    assert [(r.user_id, r.churned, r.observed_at) for r in reports] == [
        ("stayer", False, START + noon),
        ("leaver", False, START + 5 * DAY + noon),
        ("stayer", False, START + 30 * DAY + noon),
        ("leaver", False, START + 35 * DAY + noon),
        ("leaver", True, START + 40 * DAY),
        ("stayer", False, START + 60 * DAY + noon),
    ]
    assert all(r.due_at == r.observed_at for r in reports)
    assert len({r.feedback_id for r in reports}) == 6


def test_reports_come_after_a_delay_of_half_to_one_and_a_half_times() -> None:
    reports = plan_reports(hand_made_simulator(), share=1.0, delay_s=3600)
    delays_s = [(r.due_at - r.observed_at).total_seconds() for r in reports]
    assert all(1800 <= d <= 5400 for d in delays_s)
    assert reports == sorted(reports)


def test_the_plan_is_the_same_for_the_same_seed() -> None:
    simulator = Simulator(200, START, 120, seed=4)
    first = plan_reports(simulator, share=0.4, delay_s=600, seed=9)
    assert plan_reports(simulator, share=0.4, delay_s=600, seed=9) == first
    reported = {r.user_id for r in first}
    assert 60 <= len(reported) <= 100  # about 40% of 200
    assert plan_reports(simulator, share=0.0, delay_s=600) == []
    everyone = {r.user_id for r in plan_reports(simulator, share=1.0, delay_s=600)}
    assert everyone == {u.user_id for u in simulator.users}


def test_feedback_ids_name_the_user_and_outcome() -> None:
    at = START + 3 * DAY
    assert feedback_id_for("u1", True, at) == feedback_id_for("u1", True, at + DAY)
    assert feedback_id_for("u1", False, at) != feedback_id_for("u1", False, at + DAY)
    assert feedback_id_for("u1", True, at) != feedback_id_for("u2", True, at)
    assert feedback_id_for("u1", True, at) != feedback_id_for("u1", False, at)


@contextmanager
def serving(settings: Settings, engine: sa.Engine, port: int) -> Iterator[str]:
    """The feedback API on a real loopback port, in a thread."""
    app = create_app(settings, engine, publish=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started, timeout_s=10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def due_reports(n: int) -> list[Report]:
    """Report i is observed and due at START + i hours; every third one is a churn."""
    at = [START + timedelta(hours=i) for i in range(n)]
    return [Report(at[i], feedback_id_for(f"u{i}", i % 3 == 0, at[i]), f"u{i}", i % 3 == 0, at[i])
            for i in range(n)]


def run_reporter(url: str, reports: list[Report], now: datetime, **client_options) -> int:
    stopping = threading.Event()
    client = FeedbackClient(url, stopping, **client_options)
    try:
        return OutcomeReporter(reports, client, stopping, clock=lambda: now).run()
    finally:
        client.close()


@pytest.mark.timeout(60)
def test_reports_reach_the_api_and_a_resend_stores_nothing_new(
    settings: Settings, engine: sa.Engine
) -> None:
    reports = due_reports(1203)  # three batches
    with serving(settings, engine, free_port()) as url:
        assert run_reporter(url, reports, now=START + 2000 * HOUR) == 1203
        assert count_rows(engine, storage.feedback) == 1203
        assert run_reporter(url, reports, now=START + 2000 * HOUR) == 1203
    assert count_rows(engine, storage.feedback) == 1203
    with engine.connect() as conn:
        churned = conn.execute(sa.select(sa.func.count()).where(storage.feedback.c.churned))
        assert churned.scalar_one() == 401


@pytest.mark.timeout(60)
def test_only_due_reports_are_sent(settings: Settings, engine: sa.Engine) -> None:
    reports = due_reports(10)
    with serving(settings, engine, free_port()) as url:
        stopping = threading.Event()
        client = FeedbackClient(url, stopping)
        reporter = OutcomeReporter(reports, client, stopping, clock=lambda: START + 4.5 * HOUR)
        thread = threading.Thread(target=reporter.run)
        thread.start()
        assert wait_until(lambda: count_rows(engine, storage.feedback) == 5, timeout_s=10)
        time.sleep(1.5)
        stopping.set()
        thread.join(5)
        client.close()
    assert count_rows(engine, storage.feedback) == 5
    assert [r.user_id for r in reporter.pending] == [f"u{i}" for i in range(5, 10)]


@pytest.mark.timeout(60)
def test_reports_wait_for_an_api_that_is_not_up_yet(settings: Settings, engine: sa.Engine) -> None:
    port = free_port()
    result: list[int] = []
    sender = threading.Thread(target=lambda: result.append(
        run_reporter(f"http://127.0.0.1:{port}", due_reports(20), now=START + 100 * HOUR)))
    sender.start()
    time.sleep(2)
    assert count_rows(engine, storage.feedback) == 0
    with serving(settings, engine, port):
        sender.join(30)
    assert result == [20]
    assert count_rows(engine, storage.feedback) == 20


@pytest.mark.timeout(60)
def test_a_refused_batch_is_dropped_not_retried(settings: Settings, engine: sa.Engine) -> None:
    keyed = settings.model_copy(update={"churn_api_key": SecretStr("right-key")})
    with serving(keyed, engine, free_port()) as url:
        assert run_reporter(url, due_reports(3), now=START + 10 * HOUR, api_key="wrong") == 0
        assert count_rows(engine, storage.feedback) == 0
        assert run_reporter(url, due_reports(3), now=START + 10 * HOUR, api_key="right-key") == 3
    assert count_rows(engine, storage.feedback) == 3
