"""Micro-batches of user-activity records, bounded by size and by time, parsed into events.

A record that is not a valid event is skipped here with a counter: the consumer service
owns dead-lettering, and the same rules (``parse_event``) decide validity in both places.
"""

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from kafka.consumer.fetcher import ConsumerRecord

from churn_stream.errors import InvalidEvent
from churn_stream.events import Event, parse_event
from churn_stream.predictor.metrics import EVENTS, EVENTS_SKIPPED

log = logging.getLogger(__name__)

Poll = Callable[[int, int], Sequence[ConsumerRecord]]
"""``(timeout_ms, max_records) -> records``: one poll of the consumer, flattened."""


@dataclass(frozen=True)
class Received:
    """A valid event, the partition it came from and its Kafka timestamp (ms since epoch)."""

    event: Event
    partition: int
    timestamp_ms: int


@dataclass
class MicroBatch:
    """The valid events of one micro-batch, in the order they were consumed."""

    received: list[Received] = field(default_factory=list)
    records: int = 0
    skipped: int = 0


def collect(poll: Poll, sink: list[ConsumerRecord], max_records: int, max_wait_ms: int,
            stopping: threading.Event, clock: Callable[[], float] = time.monotonic) -> None:
    """Poll into ``sink`` until it holds ``max_records`` or ``max_wait_ms`` passed since the
    first record came.

    With nothing to read it returns after ``max_wait_ms`` with ``sink`` empty, so the
    caller's loop keeps turning (stop flag, control commands, drift windows). ``sink`` is the
    caller's list so that a rebalance inside a poll can hand back what is in hand.
    """
    sink.extend(poll(max_wait_ms, max_records))
    deadline_s = clock() + max_wait_ms / 1000
    while sink and len(sink) < max_records and not stopping.is_set():
        left_ms = int((deadline_s - clock()) * 1000)
        if left_ms <= 0:
            return
        more = poll(left_ms, max_records - len(sink))
        if not more:
            return
        sink.extend(more)


def parse_batch(records: Sequence[ConsumerRecord], max_ahead_s: float,
                now: datetime) -> MicroBatch:
    """The valid events of ``records``; invalid ones are counted and skipped."""
    batch = MicroBatch(records=len(records))
    for record in records:
        try:
            event = parse_event(record.value, max_ahead_s, now)
        except InvalidEvent as exc:
            EVENTS_SKIPPED.labels(exc.reason).inc()
            batch.skipped += 1
            log.debug("skipping %s[%d]@%d: %s", record.topic, record.partition, record.offset, exc)
            continue
        batch.received.append(Received(event, record.partition, record.timestamp))
    EVENTS.inc(len(batch.received))
    return batch
