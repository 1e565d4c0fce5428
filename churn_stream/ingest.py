"""The consumer's work: validate records, dead-letter the bad ones, store the good ones.

Ordering is what makes it safe. For each batch: dead-letter records are sent, the good
events are written in one transaction, the dead-letter sends are flushed, and only then
are the offsets of exactly that batch's records committed. A crash anywhere before the
commit replays the batch, and the idempotent insert stores each event once however often
it is replayed.

Two batches overlap, in one way only: while a batch's transaction commits on a thread of
its own, the loop polls and validates the next. The driver lets go of the GIL for the whole
COMMIT, which is where SQLite writes the WAL and runs its checkpoints: about half of its
time per row (15 of 29 microseconds, batches of 2,000, measured here). The insert stays on
the loop's thread: ``executemany`` takes the GIL back after every row, and a thread that
wants it while another runs Python waits a switch interval (5 ms) for it, row after row.
The next insert starts only after the commit before it, so transactions and offset commits
keep their order.
"""

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import Counter, Gauge, Histogram
from tenacity import RetryError, Retrying, retry_if_exception, wait_exponential

from churn_stream import storage
from churn_stream.errors import InvalidEvent
from churn_stream.events import parse_event
from churn_stream.kafka_io import commit_offsets, poll_records

log = logging.getLogger(__name__)

EVENTS_INGESTED = Counter("events_ingested_total", "Valid events written to user_activity")
EVENTS_DEAD_LETTERED = Counter(
    "events_dead_lettered_total", "Records sent to the dead-letter topic", ["reason"]
)
BATCH_WRITE_SECONDS = Histogram("batch_write_seconds", "Seconds to write one batch")
DB_RETRIES = Counter("db_write_retries_total", "Batch writes retried after a database error")
CONSUMER_LAG = Gauge("consumer_lag_records", "Records behind the partition end", ["partition"])
POLL_WHILE_COMMITTING_MS = 10
"""How long a poll waits for records while a commit runs, so that a finished commit is
answered (its offsets committed) within about this much."""


class StopRequested(RetryError):
    """A stop was asked for while a write was being retried; nothing was committed."""


@dataclass
class Batch:
    """Records taken from the broker and not committed yet: the valid events (as storage
    records, which the garbage collector does not follow), the next offset to read of each
    partition, and what was dead-lettered."""

    events: list[storage.EventRecord] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    """The next offset to read of each (topic, partition)."""
    taken: int = 0
    """Records taken from the broker, valid or not."""
    dead_lettered: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    first_dead_letter: str | None = None
    """Where the batch's first invalid record was (topic:partition:offset)."""


@dataclass
class Committing:
    """A batch whose transaction commits on the commit thread (``done`` is ``None`` when the
    batch held no valid event, so there is nothing to commit but its offsets)."""

    batch: Batch
    stored: int
    done: Future[None] | None


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
        max_batch_records: int = 5000,
    ) -> None:
        self.consumer = consumer
        self.dlq_producer = dlq_producer
        self.engine = engine
        self.dead_letter_topic = dead_letter_topic
        self.max_event_ahead_s = max_event_ahead_s
        self.max_batch_wait_ms = max_batch_wait_ms
        self.max_batch_records = max_batch_records
        self.stopping = threading.Event()

    def run(self) -> None:
        """Consume until ``stopping`` is set; the batches in hand are finished and committed."""
        with ThreadPoolExecutor(1, thread_name_prefix="ingest-commit") as committer:
            try:
                self._consume(committer)
            except StopRequested:
                log.info("stopping during a database outage; the batch stays uncommitted")

    def _consume(self, committer: ThreadPoolExecutor) -> None:
        pending, committing = Batch(), None
        last_lag_at = 0.0
        while not self.stopping.is_set():
            room = self.max_batch_records - pending.taken
            polled = 0
            if room > 0:
                wait_ms = POLL_WHILE_COMMITTING_MS if committing else self.max_batch_wait_ms
                records = poll_records(self.consumer, wait_ms, max_records=room)
                polled = self._take(records, pending)
            # Records that come while a commit runs join the next batch, up to its limit.
            if committing and (not polled or pending.taken >= self.max_batch_records
                               or committing.done is None or committing.done.done()):
                self._finish(committing)
                committing = None
            if committing is None and pending.taken:
                committing, pending = self._start(pending, committer), Batch()
            if time.monotonic() - last_lag_at > 5:
                self._export_lag()
                last_lag_at = time.monotonic()
        if committing:
            self._finish(committing)
        if pending.taken:
            self._finish(self._start(pending, committer))

    def _take(self, records: Sequence[ConsumerRecord], batch: Batch) -> int:
        """Validate records into ``batch``, dead-lettering the invalid ones; their count."""
        now = datetime.now(UTC)
        for record in records:
            try:
                event = parse_event(record.value, self.max_event_ahead_s, now)
            except InvalidEvent as exc:
                source = self._dead_letter(record, exc)
                batch.dead_lettered += 1
                batch.reasons[exc.reason] = batch.reasons.get(exc.reason, 0) + 1
                batch.first_dead_letter = batch.first_dead_letter or source
            else:
                batch.events.append(storage.event_record(event))
            # A plain tuple equals its TopicPartition, and costs a tenth of building one.
            batch.offsets[record.topic, record.partition] = record.offset + 1
        batch.taken += len(records)
        return len(records)

    def _dead_letter(self, record: ConsumerRecord, exc: InvalidEvent) -> str:
        """Send ``record`` to the dead-letter topic; returns its source (topic:partition:offset).

        Each record is logged at DEBUG only: a poison stream would flood the log with one
        WARNING a record, so ``_finish`` logs one a batch instead.
        """
        source = f"{record.topic}:{record.partition}:{record.offset}"
        log.debug("dead-lettering %s: %s", source, exc)
        headers = [
            ("reason", exc.reason.encode()),
            ("detail", exc.detail[:1000].encode()),
            ("source", source.encode()),
        ]
        self.dlq_producer.send(
            self.dead_letter_topic, key=record.key, value=record.value or b"", headers=headers
        )
        EVENTS_DEAD_LETTERED.labels(exc.reason).inc()
        return source

    def _start(self, batch: Batch, committer: ThreadPoolExecutor) -> Committing:
        """Insert the batch's events in a transaction and hand its commit to ``committer``."""
        if not batch.events:
            return Committing(batch, 0, None)
        started = time.perf_counter()
        conn, stored = self._retrying()(self._insert, batch.events)
        return Committing(batch, stored, committer.submit(self._commit, conn, started))

    def _insert(self, events: list[storage.EventRecord]) -> tuple[sa.Connection, int]:
        conn = self.engine.connect()
        try:
            conn.begin()
            return conn, storage.insert_records(conn, events, datetime.now(UTC))
        except BaseException:
            conn.close()  # rolls the transaction back
            raise

    @staticmethod
    def _commit(conn: sa.Connection, started: float) -> None:
        try:
            conn.commit()
        finally:
            conn.close()
        BATCH_WRITE_SECONDS.observe(time.perf_counter() - started)

    def _finish(self, committing: Committing) -> None:
        """Wait for the batch's transaction to commit, then move its offsets past it."""
        batch, stored = committing.batch, committing.stored
        if committing.done is not None:
            try:
                committing.done.result()
            except Exception as exc:
                if not is_transient_db_error(exc):
                    raise
                DB_RETRIES.inc()
                log.warning("database commit failed (%s); writing the batch of %d events "
                            "again, nothing committed", exc, len(batch.events))
                stored = self._retrying()(storage.write_records, self.engine, batch.events,
                                          datetime.now(UTC))
        EVENTS_INGESTED.inc(stored)
        log.debug("stored a batch of %d events (%d records, %d dead-lettered)",
                  stored, batch.taken, batch.dead_lettered)
        # The dead-letter records must be on the broker before the offsets move past them.
        self.dlq_producer.flush()
        if batch.dead_lettered:
            reasons = ", ".join(f"{r}={n}" for r, n in sorted(batch.reasons.items()))
            log.warning("dead-lettered %d of %d records to %s (%s); first at %s",
                        batch.dead_lettered, batch.taken, self.dead_letter_topic, reasons,
                        batch.first_dead_letter)
        # A partition taken away in a rebalance is another member's to commit now; its
        # records were written anyway, and are written once however often they come back.
        owned = self.consumer.assignment()
        offsets = {TopicPartition(*key): offset for key, offset in batch.offsets.items()
                   if key in owned}
        if offsets:
            commit_offsets(self.consumer, self.stopping, offsets)

    def _retrying(self) -> Retrying:
        return Retrying(
            retry=retry_if_exception(is_transient_db_error),
            wait=wait_exponential(multiplier=0.1, max=5),
            stop=lambda _state: self.stopping.is_set(),
            before_sleep=self._log_retry,
            retry_error_cls=StopRequested,
        )

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
