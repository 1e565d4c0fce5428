"""Producer -> broker -> consumer -> database, through a real broker, counted exactly."""

import json
import logging
import signal
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest
import sqlalchemy as sa
from kafka import KafkaAdminClient, KafkaConsumer

from churn_stream import storage
from churn_stream.events import Event
from churn_stream.ingest import DB_RETRIES, ActivityIngestor
from churn_stream.kafka_io import make_consumer, make_producer
from churn_stream.settings import Settings
from churn_stream.simulator import Simulator
from tests.conftest import count_rows, start_service, wait_until

START = datetime.now(UTC) - timedelta(days=3)


def simulated(n_users: int = 40, days: float = 2, seed: int = 1) -> list[Event]:
    return list(Simulator(n_users, START, days, seed=seed).events())


def send(settings: Settings, values: list[bytes], keys: list[bytes] | None = None) -> None:
    producer = make_producer(settings.bootstrap_servers)
    for i, value in enumerate(values):
        producer.send(settings.topic_activity, key=keys[i] if keys else b"k", value=value)
    producer.flush()
    producer.close()


@pytest.fixture
def ingestor(topics: Settings, engine: sa.Engine) -> Iterator[ActivityIngestor]:
    """A consumer running in a thread of the test process."""
    running = ActivityIngestor(
        make_consumer(topics.bootstrap_servers, topics.consumer_group, topics.topic_activity),
        make_producer(topics.bootstrap_servers),
        engine,
        topics.topic_dead_letter,
        topics.max_event_ahead_s,
        max_batch_wait_ms=200,
    )
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    yield running
    running.stopping.set()
    thread.join(timeout=30)
    running.consumer.close(autocommit=False)
    running.dlq_producer.close()


def stored_ids(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(storage.user_activity.c.event_id)).scalars())


def dead_letters(settings: Settings, expected: int, timeout_s: float = 30) -> list:
    consumer = KafkaConsumer(
        settings.topic_dead_letter,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=2000,
        group_id=f"dlq-reader-{uuid4().hex[:6]}",
    )
    records: list = []
    wait_until(lambda: records.extend(consumer) or len(records) >= expected, timeout_s)
    consumer.close()
    return records


@pytest.mark.timeout(120)
def test_every_produced_event_is_stored_exactly_once(ingestor, topics, engine) -> None:
    events = simulated()
    send(topics, [e.to_bytes() for e in events], [e.key() for e in events])
    assert wait_until(lambda: count_rows(engine, storage.user_activity) >= len(events), 60)
    assert sorted(stored_ids(engine)) == sorted(str(e.event_id) for e in events)


@pytest.mark.timeout(120)
def test_events_delivered_twice_are_stored_once(ingestor, topics, engine) -> None:
    events = simulated(n_users=10, days=1)
    values = [e.to_bytes() for e in events]
    send(topics, values + values[: len(values) // 2])
    assert wait_until(lambda: count_rows(engine, storage.user_activity) >= len(events), 60)
    ingestor.stopping.wait(2)  # give a wrongly stored duplicate the time to show up
    assert count_rows(engine, storage.user_activity) == len(events)


POISON = {
    "not JSON": (b"{{{ nope", "not_json"),
    "JSON array": (b'["login"]', "not_object"),
    "missing user_id": (
        json.dumps({"event_type": "login", "ts": "2026-01-01T00:00:00Z"}).encode(),
        "invalid_field",
    ),
    "wrong types": (
        json.dumps({"user_id": "u", "event_type": 3, "ts": 5}).encode(),
        "invalid_field",
    ),
    "empty event_type": (
        json.dumps({"user_id": "u", "event_type": "", "ts": "2026-01-01T00:00:00Z"}).encode(),
        "invalid_field",
    ),
    "500-char event_type": (
        json.dumps(
            {"user_id": "u", "event_type": "a" * 500, "ts": "2026-01-01T00:00:00Z"}
        ).encode(),
        "invalid_field",
    ),
    "ts far ahead": (
        json.dumps({"user_id": "u", "event_type": "login", "ts": "2060-01-01T00:00:00Z"}).encode(),
        "future_ts",
    ),
    "ts out of range": (
        json.dumps({"user_id": "u", "event_type": "login", "ts": "0001-01-01T00:00:00+01:00"}
                   ).encode(),
        "invalid_field",
    ),
    "1 MB payload": (b'{"user_id": "' + b"x" * 1_000_000 + b'"}', "too_large"),
    "invalid UTF-8": (b'{"user_id": "\xc3\x28"}', "not_utf8"),
}


@pytest.mark.timeout(120)
def test_poison_records_are_dead_lettered_with_reasons_and_the_rest_stored(
    ingestor, topics, engine
) -> None:
    good = simulated(n_users=5, days=1)
    values: list[bytes] = []
    for i, (poison, _reason) in enumerate(POISON.values()):
        values.extend(e.to_bytes() for e in good[i :: len(POISON)])
        values.append(poison)
    send(topics, values)

    records = dead_letters(topics, len(POISON), timeout_s=60)
    assert wait_until(lambda: count_rows(engine, storage.user_activity) >= len(good), 60)
    assert count_rows(engine, storage.user_activity) == len(good)
    assert len(records) == len(POISON)
    by_value = {r.value: dict(r.headers) for r in records}
    for name, (poison, reason) in POISON.items():
        assert poison in by_value, f"{name} was not dead-lettered with its original bytes"
        assert by_value[poison]["reason"] == reason.encode(), name
        assert by_value[poison]["detail"], name


@pytest.mark.timeout(120)
def test_a_poison_stream_logs_one_warning_a_batch_and_dead_letters_every_record(
    ingestor, topics, engine, caplog: pytest.LogCaptureFixture
) -> None:
    poison = [b"{not json %d" % i for i in range(300)] + [b'["login"]'] * 100
    caplog.set_level(logging.WARNING, logger="churn_stream.ingest")
    send(topics, poison)

    records = dead_letters(topics, len(poison), timeout_s=60)
    assert sorted(r.value for r in records) == sorted(poison)

    def summaries() -> list[logging.LogRecord]:
        return [r for r in caplog.records
                if r.name == "churn_stream.ingest" and r.msg.startswith("dead-lettered ")]

    # The warning follows the flush that put the records on the dead-letter topic.
    assert wait_until(lambda: sum(r.args[0] for r in summaries()) >= len(poison), 10)
    warned = [r for r in caplog.records if r.name == "churn_stream.ingest"]
    assert warned == summaries() and sum(r.args[0] for r in warned) == len(poison)
    # One a batch: how many batches 400 records make depends on the broker's fetches.
    assert 1 <= len(warned) <= len(poison) // 20, [r.getMessage() for r in warned]
    assert all("not_json=" in r.getMessage() or "not_object=" in r.getMessage()
               for r in warned)
    assert f"to {topics.topic_dead_letter} (" in warned[0].getMessage()
    assert f"first at {topics.topic_activity}:" in warned[0].getMessage()


@pytest.mark.timeout(180)
def test_a_database_outage_delays_writes_but_loses_nothing(ingestor, topics, engine) -> None:
    events = simulated(n_users=20, days=1)
    retries_before = DB_RETRIES._value.get()
    blocker = sa.create_engine(topics.resolved_database_url()).connect()
    blocker.exec_driver_sql("BEGIN EXCLUSIVE")  # every writer now gets "database is locked"
    try:
        send(topics, [e.to_bytes() for e in events])
        # SQLite waits out its busy timeout (5 s) before each failure, then the write retries.
        assert wait_until(lambda: DB_RETRIES._value.get() >= retries_before + 2, 60)
        assert committed_offsets(topics) == {}, "nothing may be committed during the outage"
    finally:
        blocker.exec_driver_sql("ROLLBACK")
        blocker.close()
    assert wait_until(lambda: count_rows(engine, storage.user_activity) >= len(events), 60)
    assert sorted(stored_ids(engine)) == sorted(str(e.event_id) for e in events)
    assert wait_until(lambda: sum(committed_offsets(topics).values()) == len(events), 30)


def committed_offsets(settings: Settings) -> dict:
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    try:
        offsets = admin.list_group_offsets(settings.consumer_group).get(settings.consumer_group, {})
    finally:
        admin.close()
    return {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_consumer_killed_mid_stream_and_restarted_stores_exactly_the_produced_set(
    topics, engine
) -> None:
    events = simulated(n_users=150, days=2, seed=4)
    head, tail = events[: len(events) * 3 // 4], events[len(events) * 3 // 4 :]
    killed = threading.Event()

    def stream() -> None:
        # The last quarter goes out only after the kill, so the kill always lands while
        # events are still arriving, however fast the first consumer drains the rest.
        send(topics, [e.to_bytes() for e in head], [e.key() for e in head])
        killed.wait(timeout=120)
        send(topics, [e.to_bytes() for e in tail], [e.key() for e in tail])

    sender = threading.Thread(target=stream, daemon=True)
    first = start_service("consumer.py", topics, BATCH_MAX_RECORDS="200")
    sender.start()
    try:
        assert wait_until(lambda: count_rows(engine, storage.user_activity) > 400, 90)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        assert count_rows(engine, storage.user_activity) <= len(head)
    finally:
        killed.set()
        first.kill()
    sender.join(timeout=60)
    second = start_service("consumer.py", topics)
    try:
        assert wait_until(lambda: count_rows(engine, storage.user_activity) >= len(events), 120)
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
    finally:
        second.kill()
    ids = stored_ids(engine)
    assert len(ids) == len(set(ids)) == len(events)
    assert set(ids) == {str(e.event_id) for e in events}
