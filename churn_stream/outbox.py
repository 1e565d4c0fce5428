"""Feedback stored first, then published to ``churn-feedback`` by an outbox.

The HTTP request only writes the ``feedback`` table; a background publisher sends the rows
whose ``published_at`` is NULL and marks them once the broker has acknowledged them. So
feedback accepted while Kafka is down is published when it is back, and nothing is lost.
The producer is idempotent, so its own retries never duplicate a record. A crash between
the acknowledgement and the mark re-sends those rows after restart: at-least-once, and the
record key (``user_id``) and ``feedback_id`` in the value let a reader drop the repeat.
Run one publisher per database: two would race for the same rows.
"""

import json
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from kafka import KafkaProducer
from kafka.errors import KafkaError
from prometheus_client import Counter, Gauge

from churn_stream import storage
from churn_stream.broker import port_open
from churn_stream.errors import BrokerUnavailable
from churn_stream.kafka_io import make_producer

log = logging.getLogger(__name__)

StoreStatus = Literal["created", "duplicate", "conflict"]
IN_CHUNK = 500  # SQL Server takes at most 2100 parameters in one statement

FEEDBACK_PUBLISHED = Counter("feedback_published_total", "Feedback rows sent to churn-feedback")
PUBLISH_FAILURES = Counter("feedback_publish_failures_total", "Outbox passes that failed")
OUTBOX_PENDING = Gauge("feedback_outbox_pending", "Stored feedback not yet on churn-feedback")


def store_feedback(engine: sa.Engine, rows: Sequence[dict[str, Any]]) -> list[StoreStatus]:
    """Store feedback rows in one transaction, each ``feedback_id`` once; a status per row.

    A ``feedback_id`` already stored for the same user and outcome is a ``duplicate`` (a
    retry); for another user or outcome it is a ``conflict`` and nothing is written.
    """
    statuses: list[StoreStatus] = []
    with engine.begin() as conn:
        known = _stored_facts(conn, [r["feedback_id"] for r in rows])
        fresh: list[int] = []
        for index, row in enumerate(rows):
            fact = (row["user_id"], bool(row["churned"]))
            seen = known.get(row["feedback_id"])
            if seen is None:
                known[row["feedback_id"]] = fact
                fresh.append(index)
                statuses.append("created")
            else:
                statuses.append("duplicate" if seen == fact else "conflict")
        _insert_checking_races(conn, rows, fresh, statuses)
    return statuses


def _insert_checking_races(conn: sa.Connection, rows: Sequence[dict[str, Any]],
                           fresh: list[int], statuses: list[StoreStatus]) -> None:
    """Insert the rows at ``fresh`` and correct the status of any that another request beat.

    The check above and the insert are two statements: a request with the same
    ``feedback_id`` on another connection can insert in between, and the idempotent insert
    then skips this row without a word. (Found by the feedback-load fault test: ids answered
    201 Created twice; with another user or outcome the loser was told "created" although
    nothing of it was stored.) The insert's row count shows such a race; the rows then read
    back say which lost: another fact stored means a conflict; the same fact, a duplicate
    (known for sure for one row; in a batch an equal row may be left "created").
    """
    if not fresh:
        return
    inserted = conn.execute(storage.idempotent_insert(storage.feedback, conn.dialect.name),
                            [rows[i] for i in fresh]).rowcount
    if inserted == len(fresh):
        return
    stored = _stored_facts(conn, [rows[i]["feedback_id"] for i in fresh])
    for i in fresh:
        fact = (rows[i]["user_id"], bool(rows[i]["churned"]))
        if stored.get(rows[i]["feedback_id"]) != fact:
            statuses[i] = "conflict"
        elif len(fresh) == 1 and inserted == 0:
            statuses[i] = "duplicate"


def _stored_facts(conn: sa.Connection, ids: Sequence[str]) -> dict[str, tuple[str, bool]]:
    table = storage.feedback
    facts: dict[str, tuple[str, bool]] = {}
    unique = sorted(set(ids))
    for start in range(0, len(unique), IN_CHUNK):
        query = sa.select(table.c.feedback_id, table.c.user_id, table.c.churned).where(
            table.c.feedback_id.in_(unique[start : start + IN_CHUNK])
        )
        facts.update({r.feedback_id: (r.user_id, bool(r.churned)) for r in conn.execute(query)})
    return facts


def pending_count(engine: sa.Engine) -> int:
    """Stored feedback rows not yet acknowledged by the broker."""
    query = sa.select(sa.func.count()).where(storage.feedback.c.published_at.is_(None))
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def feedback_message(row: Any) -> bytes:
    """The ``churn-feedback`` record value of one ``feedback`` row: compact JSON."""
    document = {
        "feedback_id": row.feedback_id,
        "user_id": row.user_id,
        "churned": bool(row.churned),
        "observed_at": storage.from_db_time(row.observed_at).isoformat(),
        "source": row.source,
        "received_at": storage.from_db_time(row.received_at).isoformat(),
    }
    return json.dumps(document, separators=(",", ":")).encode()


class OutboxPublisher:
    """Publishes unpublished feedback rows, in a background thread or one pass at a time."""

    def __init__(
        self,
        engine: sa.Engine,
        bootstrap_servers: str,
        topic: str,
        interval_s: float = 1.0,
        batch_max: int = 500,
        producer_factory: Callable[[str], KafkaProducer] | None = None,
    ) -> None:
        self.engine = engine
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.interval_s = interval_s
        self.batch_max = batch_max
        self.producer_factory = producer_factory or _outbox_producer
        self._producer: KafkaProducer | None = None
        self._pass_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def publish_pending(self) -> int:
        """Publish every pending row (in batches); returns how many were acknowledged.

        Raises ``BrokerUnavailable`` if the broker cannot be reached or refuses a record;
        acknowledged rows are marked all the same.
        """
        total = 0
        with self._pass_lock:
            while not self._stopping.is_set():
                published, complete = self._publish_batch()
                total += published
                if complete:
                    break
        return total

    def _publish_batch(self) -> tuple[int, bool]:
        table = storage.feedback
        query = (
            sa.select(table)
            .where(table.c.published_at.is_(None))
            .order_by(table.c.received_at, table.c.feedback_id)
            .limit(self.batch_max)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        if not rows:
            return 0, True
        acked = self._send(rows)
        self._mark(acked)
        return len(acked), len(rows) < self.batch_max

    def _send(self, rows: Sequence[Any]) -> list[str]:
        producer = self._connected_producer()
        futures = [
            (row.feedback_id,
             producer.send(self.topic, key=row.user_id.encode(), value=feedback_message(row)))
            for row in rows
        ]
        producer.flush(timeout=30)
        acked, failure = [], None
        for feedback_id, future in futures:
            try:
                future.get(timeout=0)
                acked.append(feedback_id)
            except KafkaError as exc:
                failure = exc
        if failure is not None:
            # Unsent rows stay pending; a fresh producer on the next pass starts clean.
            self._mark(acked)
            self._discard_producer()
            raise BrokerUnavailable(
                f"{len(rows) - len(acked)} of {len(rows)} feedback records not acknowledged "
                f"on {self.topic}: {failure}"
            )
        return acked

    def _mark(self, feedback_ids: Sequence[str]) -> None:
        table = storage.feedback
        now = storage.to_db_time(datetime.now(UTC))
        with self.engine.begin() as conn:
            for start in range(0, len(feedback_ids), IN_CHUNK):
                chunk = list(feedback_ids[start : start + IN_CHUNK])
                conn.execute(
                    sa.update(table)
                    .where(table.c.feedback_id.in_(chunk), table.c.published_at.is_(None))
                    .values(published_at=now)
                )
        FEEDBACK_PUBLISHED.inc(len(feedback_ids))

    def _connected_producer(self) -> KafkaProducer:
        if self._producer is None:
            # Building a producer against a dead address blocks for half a minute or more;
            # a TCP probe first keeps an outage cheap and the stop prompt.
            if not any(port_open(*_host_port(a)) for a in self.bootstrap_servers.split(",")):
                raise BrokerUnavailable(f"no broker answers at {self.bootstrap_servers}")
            self._producer = self.producer_factory(self.bootstrap_servers)
        return self._producer

    def _discard_producer(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=1)
            except Exception:  # noqa: BLE001 - a broken producer may fail to close; it is dropped
                log.debug("closing the outbox producer failed", exc_info=True)
            self._producer = None

    def wake(self) -> None:
        """Ask for a pass now (new feedback was stored)."""
        self._wake.set()

    def start(self) -> "OutboxPublisher":
        """Run passes in a daemon thread until ``stop``."""
        self._thread = threading.Thread(target=self._run, name="feedback-outbox", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the pass in hand and stop the thread."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._discard_producer()

    def _run(self) -> None:
        backoff_s = self.interval_s
        while not self._stopping.is_set():
            self._wake.wait(backoff_s)
            self._wake.clear()
            if self._stopping.is_set():
                break
            backoff_s = self.interval_s if self._pass() else min(backoff_s * 2, 30.0)

    def _pass(self) -> bool:
        """One guarded pass; False when it failed."""
        try:
            published = self.publish_pending()
            OUTBOX_PENDING.set(pending_count(self.engine))
        except (BrokerUnavailable, KafkaError, sa.exc.SQLAlchemyError) as exc:
            PUBLISH_FAILURES.inc()
            if not self._failing:
                log.warning("feedback outbox cannot publish to %s, will retry: %s", self.topic, exc)
            self._failing = True
            return False
        if self._failing:
            log.info("feedback outbox publishing to %s again", self.topic)
            self._failing = False
        if published:
            log.info("published %d feedback records to %s", published, self.topic)
        return True


def _outbox_producer(bootstrap_servers: str) -> KafkaProducer:
    # Short timeouts: a record the broker does not take soon stays in the table for the next
    # pass rather than waiting in the client for the default two minutes.
    return make_producer(
        bootstrap_servers,
        linger_ms=0,
        request_timeout_ms=10_000,
        delivery_timeout_ms=20_000,
        max_block_ms=10_000,
    )


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.strip().rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)
