"""The predictor's consume loop: micro-batches of activity in, predictions out, offsets last.

For each micro-batch: parse the events, bring the users' state up to date, score every
touched user once with one vectorised call per model, write the predictions to the
``predictions`` table and hand them to the producer. Every ``commit_every_s`` (and before
the loop ends) the producer is flushed, so every prediction handed to it is on the broker,
and only then are the offsets committed. A crash anywhere before the commit replays the
batches since the last one: delivery is at least once, so a prediction may be written and
sent twice, never lost. Flushing and committing once per interval instead of once per batch
takes two broker round trips off most batches, which is where a steady stream waits.

``latency_ms`` of a prediction runs from the Kafka timestamp of the oldest event it answers
(when the producer sent it) to the moment the scores were ready, so it counts broker time,
waiting in the micro-batch and scoring; a backlog shows as latency, as it should.
"""

import contextlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from tenacity import Retrying, retry_if_exception, wait_exponential

from churn_stream import storage
from churn_stream.ingest import StopRequested, is_transient_db_error
from churn_stream.kafka_io import commit_offsets, poll_records
from churn_stream.models import ChurnModel, Scores
from churn_stream.predictor.batching import Received, collect, parse_batch
from churn_stream.predictor.drift_watch import DriftWatch
from churn_stream.predictor.metrics import (
    BATCH_SECONDS,
    CONSUMER_LAG,
    EVENT_LATENCY,
    PREDICTION_LATENCY,
    PREDICTIONS,
)
from churn_stream.predictor.retrain import ModelHolder, Retrainer
from churn_stream.predictor.state import UserState

log = logging.getLogger(__name__)
LAG_EVERY_S = 5.0


@dataclass(frozen=True)
class Touched:
    """The users of one batch in first-seen order, with what their predictions answer."""

    user_ids: list[str]
    latest_ts: list[datetime]
    oldest_sent_ms: np.ndarray
    events: np.ndarray
    """How many of the batch's events each prediction answers."""

    @classmethod
    def of(cls, received: Sequence[Received]) -> "Touched":
        latest: dict[str, datetime] = {}
        oldest: dict[str, int] = {}
        events: dict[str, int] = {}
        for item in received:
            user_id = item.event.user_id
            if user_id not in latest or item.event.ts > latest[user_id]:
                latest[user_id] = item.event.ts
            oldest[user_id] = min(oldest.get(user_id, item.timestamp_ms), item.timestamp_ms)
            events[user_id] = events.get(user_id, 0) + 1
        users = list(latest)
        return cls(users, [latest[u] for u in users],
                   np.array([oldest[u] for u in users], dtype=np.float64),
                   np.array([events[u] for u in users], dtype=np.int64))


class Predictor:
    """Consumes ``user-activity`` and writes a prediction for every user with new events."""

    def __init__(self, consumer: KafkaConsumer, producer: KafkaProducer, engine: sa.Engine,
                 state: UserState, holder: ModelHolder, retrainer: Retrainer,
                 drift: DriftWatch, predictions_topic: str, *, max_records: int,
                 max_wait_ms: int, max_event_ahead_s: float, stopping: threading.Event,
                 commit_every_s: float = 0.0) -> None:
        self.consumer = consumer
        self.producer = producer
        self.engine = engine
        self.state = state
        self.holder = holder
        self.retrainer = retrainer
        self.drift = drift
        self.predictions_topic = predictions_topic
        self.max_records = max_records
        self.max_wait_ms = max_wait_ms
        self.max_event_ahead_s = max_event_ahead_s
        self.stopping = stopping
        self.commit_every_s = commit_every_s
        self.in_hand: list[ConsumerRecord] = []
        self.owned: set[int] = set()
        self.revoked: set[int] = set()
        self.uncommitted: set[int] = set()
        """Partitions with events applied to the state whose offsets are not committed yet."""
        self.replayed: set[int] = set()
        """Revoked partitions whose applied events will be delivered again."""
        self.handed_back: dict[TopicPartition, int] = {}
        """The first offset handed back (unread) of each revoked partition."""
        self.committed_s = time.monotonic()
        self.control_poll = lambda: None
        self.predicted = 0

    def listener(self) -> ConsumerRebalanceListener:
        """The rebalance listener to subscribe with."""
        return _Rebalance(self)

    def run(self) -> None:
        """Consume until ``stopping`` is set; the batch in hand is finished and committed."""
        last_lag_s = 0.0
        while not self.stopping.is_set():
            collect(self._poll, self.in_hand, self.max_records, self.max_wait_ms, self.stopping)
            try:
                self.finish_in_hand()
            except StopRequested:
                log.info("stopping during a database outage; the batch stays uncommitted")
                return
            if time.monotonic() - self.committed_s >= self.commit_every_s:
                self.commit()
            self.control_poll()
            self.drift.check(self.retrainer.last_started_s)
            if time.monotonic() - last_lag_s > LAG_EVERY_S:
                self._export_lag()
                last_lag_s = time.monotonic()
        self.commit()

    def _poll(self, timeout_ms: int, max_records: int) -> list[ConsumerRecord]:
        # A broker restart makes poll raise; poll_records waits and polls again.
        return poll_records(self.consumer, timeout_ms, max_records=max_records)

    def finish_in_hand(self) -> None:
        """Process the records in hand; their offsets are committed by ``commit``."""
        records = list(self.in_hand)
        self.in_hand.clear()
        if records:
            # Marked first: a rebalance in the middle of the batch must see its partitions.
            self.uncommitted.update(record.partition for record in records)
            self.process(records)

    def commit(self) -> None:
        """Wait until every prediction handed to the producer is on the broker, then commit."""
        self.committed_s = time.monotonic()
        if not self.uncommitted:
            return
        self.producer.flush()
        # Not committed (the group is rebalancing): the partitions stay uncommitted, and the
        # rebalance listener marks them replayed.
        if commit_offsets(self.consumer, self.stopping):
            self.uncommitted.clear()

    def process(self, records: Sequence[ConsumerRecord]) -> int:
        """Score one micro-batch and write its predictions; returns how many were written."""
        started = time.perf_counter()
        batch = parse_batch(records, self.max_event_ahead_s, datetime.now(UTC))
        if not batch.received:
            return 0
        self.state.apply(batch.received)
        model = self.holder.current
        assert model is not None, "the loop starts only once a model serves"
        touched = Touched.of(batch.received)
        rows, scores = self._score(model, touched, max(touched.latest_ts))
        scored_ms = time.time() * 1000
        latency_ms = np.maximum(scored_ms - touched.oldest_sent_ms, 0.0)
        predictions = prediction_rows(touched, scores, model.version, scored_ms, latency_ms)
        self._write(predictions)
        self._send(predictions)
        self.drift.add(model, rows, scores.blend, touched.events)
        for value in latency_ms:
            EVENT_LATENCY.observe(value / 1000)
        PREDICTIONS.inc(len(predictions))
        self.predicted += len(predictions)
        BATCH_SECONDS.observe(time.perf_counter() - started)
        log.debug("batch of %d records: %d predictions with %s", len(records),
                  len(predictions), model.version)
        return len(predictions)

    def _score(self, model: ChurnModel, touched: Touched,
               as_of: datetime) -> tuple[np.ndarray, Scores]:
        rows, sequences = self.state.matrix(touched.user_ids, as_of, model.space)
        started = time.perf_counter()
        scores = model.score(rows, sequences)
        PREDICTION_LATENCY.labels("blend").observe(time.perf_counter() - started)
        return rows, scores

    def _write(self, predictions: list[dict[str, Any]]) -> None:
        retrying = Retrying(
            retry=retry_if_exception(is_transient_db_error),
            wait=wait_exponential(multiplier=0.1, max=5),
            stop=lambda _state: self.stopping.is_set(),
            before_sleep=lambda s: log.warning(
                "writing %d predictions failed (%s); retrying, nothing committed",
                len(predictions), s.outcome.exception() if s.outcome else None),
            retry_error_cls=StopRequested,
        )
        retrying(self._insert, predictions)

    def _insert(self, predictions: list[dict[str, Any]]) -> None:
        with self.engine.begin() as conn:
            conn.execute(storage.predictions.insert(), predictions)

    def _send(self, predictions: list[dict[str, Any]]) -> None:
        # No flush here: ``commit`` flushes before the offsets move past these events.
        for row in predictions:
            value = json.dumps(row, default=_iso).encode()
            self.producer.send(self.predictions_topic, key=row["user_id"].encode(), value=value)

    def on_revoked(self, revoked: set[int]) -> None:
        """Hand back the records in hand: their offsets are not committed, so whoever owns
        their partitions next (this predictor too) reads them again from the last commit.

        Finishing them here is not possible: kafka-python 3.0 calls the listener on its own
        I/O thread, where a blocking commit raises, and the predictor died of it (seen in the
        test suite when a rebalance came in the middle of a poll).
        """
        self.revoked = revoked
        # Events of these partitions already applied to the state but not committed come
        # again to whoever owns them next, this instance included: their users' state must
        # be rebuilt from the database then, or those events would count twice.
        self.replayed |= revoked & self.uncommitted
        self.uncommitted -= revoked
        if self.in_hand:
            log.info("rebalance: %d records in hand go back uncommitted with partitions %s",
                     len(self.in_hand), sorted(revoked))
            for record in self.in_hand:
                where = TopicPartition(record.topic, record.partition)
                self.handed_back[where] = min(self.handed_back.get(where, record.offset),
                                              record.offset)
            self.in_hand.clear()

    def on_assigned(self, assigned: set[int]) -> None:
        """Forget the users of partitions that went elsewhere or whose applied events come
        again; they rebuild from the database on first sight. A partition this instance
        keeps goes back to its first handed-back record: kafka-python keeps the position of a
        partition that stays in the assignment, past the records that were handed back (their
        users went unanswered, found by the intruder test in the suite)."""
        elsewhere = (self.owned | self.revoked) - assigned
        for partition in elsewhere:  # their lag is the new owner's to report
            with contextlib.suppress(KeyError):
                CONSUMER_LAG.remove(str(partition))
        gone = elsewhere | self.replayed
        if gone:
            dropped = self.state.forget_partitions(gone)
            log.info("rebalance: partitions %s went elsewhere; forgot %d users",
                     sorted(gone), dropped)
        for where, offset in self.handed_back.items():
            if where.partition in assigned:
                self.consumer.seek(where, offset)
        if self.handed_back:
            log.info("rebalance: read again from %s", {tp.partition: offset for tp, offset
                                                        in sorted(self.handed_back.items())})
        self.owned, self.revoked, self.replayed = set(assigned), set(), set()
        self.handed_back = {}
        log.info("rebalance: own partitions %s", sorted(assigned))

    def _export_lag(self) -> None:
        for partition in self.consumer.assignment():
            end = self.consumer.highwater(partition)
            position = self.consumer.position(partition)
            if end is not None and position is not None:
                CONSUMER_LAG.labels(str(partition.partition)).set(max(0, end - position))


def prediction_rows(touched: Touched, scores: Scores, version: str, scored_ms: float,
                    latency_ms: np.ndarray) -> list[dict[str, Any]]:
    """The ``predictions`` rows of one batch (also the JSON sent to ``churn-predictions``)."""
    scored_at = storage.to_db_time(datetime.fromtimestamp(scored_ms / 1000, UTC))
    columns = zip(touched.user_ids, touched.latest_ts, scores.blend.tolist(), scores.rf.tolist(),
                  scores.xgb.tolist(), scores.seq.tolist(), latency_ms.tolist(), strict=True)
    return [
        {"user_id": user_id, "scored_at": scored_at, "event_ts": storage.to_db_time(ts),
         "score": blend, "score_rf": rf, "score_xgb": xgb, "score_seq": seq,
         "model_version": version, "latency_ms": latency}
        for user_id, ts, blend, rf, xgb, seq, latency in columns
    ]


def _iso(value: object) -> str:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC).isoformat() if value.tzinfo is None else value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.predictor.on_revoked({tp.partition for tp in revoked})

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.predictor.on_assigned({tp.partition for tp in assigned})
