"""The consumer's work: validate records, dead-letter the bad ones, store the good ones.

Ordering is what makes it safe. For each batch: dead-letter records are sent, the good
events are written in one transaction, the dead-letter sends are flushed, and only then
are offsets committed. A crash anywhere before the commit replays the batch, and the
idempotent insert stores each event once however often it is replayed.
"""

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa
from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import Counter, Gauge, Histogram
from tenacity import RetryError, Retrying, retry_if_exception, wait_exponential

from churn_stream import storage
from churn_stream.errors import InvalidEvent
from churn_stream.events import Event, parse_event
from churn_stream.kafka_io import commit_offsets, poll_records

log = logging.getLogger(__name__)

EVENTS_INGESTED = Counter("events_ingested_total", "Valid events written to user_activity")
EVENTS_DEAD_LETTERED = Counter(
    "events_dead_lettered_total", "Records sent to the dead-letter topic", ["reason"]
)
BATCH_WRITE_SECONDS = Histogram("batch_write_seconds", "Seconds to write one batch")
DB_RETRIES = Counter("db_write_retries_total", "Batch writes retried after a database error")
CONSUMER_LAG = Gauge("consumer_lag_records", "Records behind the partition end", ["partition"])


class StopRequested(RetryError):
    """A stop was asked for while a write was being retried; nothing was committed."""


@dataclass
class BatchResult:
    """What one batch did."""

    stored: int = 0
    dead_lettered: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def is_transient_db_error(exc: BaseException) -> bool:
    """Database errors that a later attempt may not hit: lost connections, locks, outages."""
    return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError) or (
        isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated
    )


class ActivityIngestor:
    """Moves records from ``user-activity`` into the ``user_activity`` table."""

    def __init__(
        self,
        consumer: KafkaConsumer,
        dlq_producer: KafkaProducer,
        engine: sa.Engine,
        dead_letter_topic: str,
        max_event_ahead_s: float,
        max_batch_wait_ms: int = 500,
    ) -> None:
        self.consumer = consumer
        self.dlq_producer = dlq_producer
        self.engine = engine
        self.dead_letter_topic = dead_letter_topic
        self.max_event_ahead_s = max_event_ahead_s
        self.max_batch_wait_ms = max_batch_wait_ms
        self.stopping = threading.Event()

    def run(self) -> None:
        """Consume until ``stopping`` is set; the batch in hand is finished and committed."""
        last_lag_at = 0.0
        while not self.stopping.is_set():
            records = poll_records(self.consumer, self.max_batch_wait_ms)
            if records:
                try:
                    self.process(records)
                except StopRequested:
                    log.info("stopping during a database outage; the batch stays uncommitted")
                    return
                commit_offsets(self.consumer, self.stopping)
            if time.monotonic() - last_lag_at > 5:
                self._export_lag()
                last_lag_at = time.monotonic()

    def process(self, records: Sequence[ConsumerRecord]) -> BatchResult:
        """Validate, dead-letter and store one batch; offsets are the caller's to commit."""
        result = BatchResult()
        events: list[Event] = []
        now = datetime.now(UTC)
        for record in records:
            try:
                events.append(parse_event(record.value, self.max_event_ahead_s, now))
            except InvalidEvent as exc:
                self._dead_letter(record, exc)
                result.dead_lettered += 1
                result.reasons[exc.reason] = result.reasons.get(exc.reason, 0) + 1
        result.stored = self._write(events)
        # The dead-letter records must be on the broker before the offsets move past them.
        self.dlq_producer.flush()
        return result

    def _dead_letter(self, record: ConsumerRecord, exc: InvalidEvent) -> None:
        log.warning(
            "dead-lettering %s[%d]@%d: %s", record.topic, record.partition, record.offset, exc
        )
        headers = [
            ("reason", exc.reason.encode()),
            ("detail", exc.detail[:1000].encode()),
            ("source", f"{record.topic}:{record.partition}:{record.offset}".encode()),
        ]
        self.dlq_producer.send(
            self.dead_letter_topic, key=record.key, value=record.value or b"", headers=headers
        )
        EVENTS_DEAD_LETTERED.labels(exc.reason).inc()

    def _write(self, events: list[Event]) -> int:
        if not events:
            return 0
        retrying = Retrying(
            retry=retry_if_exception(is_transient_db_error),
            wait=wait_exponential(multiplier=0.1, max=5),
            stop=lambda _state: self.stopping.is_set(),
            before_sleep=self._log_retry,
            retry_error_cls=StopRequested,
        )
        started = time.perf_counter()
        stored = retrying(storage.write_events, self.engine, events, datetime.now(UTC))
        BATCH_WRITE_SECONDS.observe(time.perf_counter() - started)
        EVENTS_INGESTED.inc(stored)
        log.debug("stored a batch of %d events", stored)
        return stored

    @staticmethod
    def _log_retry(state: object) -> None:
        DB_RETRIES.inc()
        outcome = getattr(state, "outcome", None)
        error = outcome.exception() if outcome else None
        log.warning("database write failed (%s); retrying, nothing committed", error)

    def _export_lag(self) -> None:
        for partition in self.consumer.assignment():
            end = self.consumer.highwater(partition)
            position = self.consumer.position(partition)
            if end is not None and position is not None:
                CONSUMER_LAG.labels(str(partition.partition)).set(max(0, end - position))
