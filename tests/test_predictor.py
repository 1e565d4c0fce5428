"""Micro-batching and run records of the predictor: the parts that need no model."""

import threading
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from kafka.consumer.fetcher import ConsumerRecord

from churn_stream import storage
from churn_stream.events import Event
from churn_stream.predictor import runs
from churn_stream.predictor.batching import collect, parse_batch

pytestmark = pytest.mark.timeout(30)
NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)


def record(value: bytes | None, partition: int = 0, offset: int = 0,
           timestamp_ms: int = 1_000) -> ConsumerRecord:
    return ConsumerRecord("user-activity", partition, None, offset, timestamp_ms, 0, b"k",
                          value, [], None, 1, len(value or b""), 0)


def event_bytes(user_id: str = "u1", minutes: int = 0, **extra) -> bytes:
    event = Event(user_id=user_id, event_type="login", ts=NOW - timedelta(minutes=minutes),
                  **extra)
    return event.to_bytes()


class ScriptedPoll:
    """Returns prepared batches of records, advancing a fake clock by each poll's timeout."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches
        self.now_s = 0.0
        self.calls: list[tuple[int, int]] = []

    def __call__(self, timeout_ms: int, max_records: int) -> list[int]:
        self.calls.append((timeout_ms, max_records))
        if not self.batches:
            self.now_s += timeout_ms / 1000
            return []
        self.now_s += 0.010
        return self.batches.pop(0)[:max_records]


def test_collect_stops_at_the_size_bound() -> None:
    poll = ScriptedPoll([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    sink: list = []
    collect(poll, sink, max_records=5, max_wait_ms=1000, stopping=threading.Event(),
            clock=lambda: poll.now_s)
    assert sink == [1, 2, 3, 4, 5]
    assert [c[1] for c in poll.calls] == [5, 2]


def test_collect_stops_at_the_time_bound_from_the_first_record() -> None:
    poll = ScriptedPoll([[1]] * 100)
    sink: list = []
    collect(poll, sink, max_records=1000, max_wait_ms=50, stopping=threading.Event(),
            clock=lambda: poll.now_s)
    # Each poll takes 10 ms of the fake clock: the first record is in hand at 10 ms, so the
    # deadline is 60 ms and five more polls end by then.
    assert sink == [1] * 6


def test_collect_returns_after_one_empty_poll() -> None:
    poll = ScriptedPoll([])
    sink: list = []
    collect(poll, sink, max_records=10, max_wait_ms=200, stopping=threading.Event(),
            clock=lambda: poll.now_s)
    assert sink == [] and poll.calls == [(200, 10)]


def test_collect_stops_when_asked() -> None:
    poll = ScriptedPoll([[1], [2], [3]])
    stopping = threading.Event()
    stopping.set()
    sink: list = []
    collect(poll, sink, max_records=10, max_wait_ms=1000, stopping=stopping,
            clock=lambda: poll.now_s)
    assert sink == [1]


def test_parse_batch_keeps_valid_events_and_skips_the_rest() -> None:
    records = [
        record(event_bytes("u1"), partition=2, offset=0, timestamp_ms=111),
        record(b"{not json", offset=1),
        record(None, offset=2),
        record(event_bytes("u2", minutes=-3 * 24 * 60), offset=3),  # three days ahead
        record(b'{"user_id": "u3", "event_type": "Bad Type", "ts": "2026-03-01T12:00:00Z"}'),
        record(event_bytes("u4", numeric={"amount": 9.5}), partition=1, timestamp_ms=222),
    ]
    batch = parse_batch(records, max_ahead_s=86_400, now=NOW)
    assert (batch.records, batch.skipped) == (6, 4)
    assert [(r.event.user_id, r.partition, r.timestamp_ms) for r in batch.received] == [
        ("u1", 2, 111), ("u4", 1, 222)]


def test_a_run_is_recorded_when_it_starts_and_when_it_ends(engine: sa.Engine) -> None:
    first_id, first = runs.start_run(engine, "host-1", "start")
    second_id, second = runs.start_run(engine, "host-1", "drift")
    assert (first, second) == (f"v{first_id}", f"v{second_id}") and second_id == first_id + 1
    runs.finish_run(engine, second_id, 12.5, 400, {"blend": {"roc_auc": float("nan")}},
                    promoted=True, error=None)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(storage.model_runs).order_by("id")).mappings().all()
    assert [(r["model_version"], r["reason"], r["error"]) for r in rows] == [
        (first, "start", runs.UNFINISHED), (second, "drift", None)]
    assert (rows[1]["seconds"], rows[1]["rows"], rows[1]["promoted"]) == (12.5, 400, True)
    assert rows[1]["metrics"] == {"blend": {"roc_auc": None}}


def test_version_numbers() -> None:
    assert runs.version_number("v12") == 12 and runs.version_number("dev") == 0
