"""Kafka clients configured the one way this project uses them, and topic creation."""

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from kafka import (
    ConsumerRebalanceListener,
    KafkaAdminClient,
    KafkaConsumer,
    KafkaProducer,
    OffsetAndMetadata,
    TopicPartition,
)
from kafka.admin import NewTopic
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaError,
    RebalanceInProgressError,
    RetriableError,
    TopicAlreadyExistsError,
    UnknownMemberIdError,
)
from tenacity import (
    Retrying,
    retry,
    retry_if_exception,
    retry_if_exception_type,
    retry_if_result,
    stop_after_delay,
    stop_when_event_set,
    wait_exponential,
)

from churn_stream.errors import BrokerUnavailable
from churn_stream.settings import Settings

log = logging.getLogger(__name__)


def make_producer(bootstrap_servers: str, **overrides: Any) -> KafkaProducer:
    """An idempotent producer that waits for every replica: no loss, no duplicates on retry."""
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "compression_type": "gzip",
        "retries": 2**31 - 1,
        "max_in_flight_requests_per_connection": 5,
        "delivery_timeout_ms": 120_000,
    }
    options.update(overrides)
    return _connect(KafkaProducer, **options)


def make_consumer(
    bootstrap_servers: str,
    group_id: str,
    *topics: str,
    listener: ConsumerRebalanceListener | None = None,
    **overrides: Any,
) -> KafkaConsumer:
    """A group member that commits by hand, after its writes are durable, subscribed to
    ``topics`` (with ``listener``) once their partitions are known."""
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": 2000,
        "fetch_max_bytes": 16 * 1024 * 1024,
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
        # How long the broker may hold a fetch that finds nothing new. kafka-python's 500 ms
        # showed in the predictor's p99 latency at a steady 2,000 events/s (458 ms; 244 ms
        # with 50 ms, and no better with 10 ms, in bench/latency.py).
        "fetch_max_wait_ms": 50,
        # A record that waits out a database outage inside one poll must not cost us the
        # group membership; 10 minutes covers the outages we retry through.
        "max_poll_interval_ms": 600_000,
        # A member that died holds its partitions until its session expires: 15 s instead of
        # kafka-python's 45 s. Heartbeats come from the client's own I/O thread every 3 s,
        # so a long batch or a retrain in the background does not end the session.
        "session_timeout_ms": 15_000,
        # Topic metadata older than this is fetched again, so partitions added to a topic
        # reach the group's leader within seconds instead of kafka-python's five minutes.
        "metadata_max_age_ms": 5_000,
    }
    options.update(overrides)
    consumer = _connect(KafkaConsumer, **options)
    if topics:
        subscribe_when_known(consumer, list(topics), listener)
    return consumer


def subscribe_when_known(consumer: KafkaConsumer, topics: list[str],
                         listener: ConsumerRebalanceListener | None = None,
                         timeout_s: float = 60.0) -> None:
    """Subscribe, and return once the consumer's metadata holds every topic's partitions.

    The first poll joins the group. A leader that joins before its metadata holds the topic
    assigns nothing ("No partition metadata for topic"), and kafka-python 3.0.12 does not
    always rejoin when the metadata arrives: on a loaded machine a third of fresh one-member
    groups still had no partitions 20 s later (5 of 15 measured here, 0 of 15 once the
    metadata was in first), and a predictor sat idle through a whole test that way.
    Subscribing before the wait also spares the group a second rebalance half a second
    after the first, when the metadata the coordinator last saw catches up.
    """
    consumer.subscribe(topics, listener=listener)

    @retry(retry=retry_if_result(lambda partitions: not partitions),
           wait=wait_exponential(multiplier=0.1, max=2), stop=stop_after_delay(timeout_s),
           retry_error_callback=lambda _state: set())
    def partitions_of(topic: str) -> set[int]:
        return consumer.partitions_for_topic(topic)

    for topic in topics:
        if not partitions_of(topic):
            consumer.unsubscribe()
            raise BrokerUnavailable(f"topic {topic} has no partitions on the broker after "
                                    f"{timeout_s:.0f} s: create it first (`churn up` does)")


# The group moved on without this member (its partitions went to another, or will): the
# offsets it holds can no longer be committed, and the records will be delivered again.
MEMBERSHIP_LOST = (
    CommitFailedError, RebalanceInProgressError, IllegalGenerationError, UnknownMemberIdError
)


def commit_offsets(consumer: KafkaConsumer, stopping: threading.Event,
                   offsets: Mapping[TopicPartition, int] | None = None) -> bool:
    """Commit the consumed offsets (or ``offsets``, the next offset to read of each partition),
    retrying while the broker is away; returns whether it did.

    Callers commit only after their writes are durable, so an offset left uncommitted costs
    a redelivery, never a loss. kafka-python's ``commit`` raises after ~30 s without a
    broker; the loop used to die of it (found by the broker-kill fault test), so a retriable
    error is retried until the broker is back or a stop is asked for, and a lost group
    membership is logged and left to the rebalance that follows.
    """
    retrying = Retrying(
        retry=retry_if_exception(lambda exc: isinstance(exc, KafkaError) and exc.retriable),
        wait=wait_exponential(multiplier=0.2, max=5),
        stop=lambda _state: stopping.is_set(),
        before_sleep=lambda state: log.warning(
            "offset commit failed (%s); retrying", state.outcome.exception() if state.outcome
            else None),
        reraise=True,
    )
    chosen = None if offsets is None else {
        partition: OffsetAndMetadata(offset, "", -1) for partition, offset in offsets.items()}
    try:
        retrying(consumer.commit, chosen)
        return True
    except MEMBERSHIP_LOST as exc:
        log.warning("offsets not committed, the group rebalanced (%s): records since the last "
                    "commit will be delivered again", type(exc).__name__)
    except KafkaError as exc:
        if not (exc.retriable and stopping.is_set()):
            raise
        log.warning("stopping with offsets not committed (%s)", type(exc).__name__)
    return False


def poll_records(consumer: KafkaConsumer, timeout_ms: int, **options: Any) -> list[ConsumerRecord]:
    """The records of one poll; none, after a pause of ``timeout_ms``, while the broker is away.

    kafka-python's ``poll`` raises when it cannot find the group coordinator, as happens
    while a broker restarts; the consume loops used to die of it (found by the fault tests),
    so a retriable error is logged and the loop polls again.
    """
    try:
        polled = consumer.poll(timeout_ms=timeout_ms, **options)
    except KafkaError as exc:
        if not exc.retriable:
            raise
        log.warning("poll failed (%s: %s); polling again", type(exc).__name__, exc)
        time.sleep(timeout_ms / 1000)
        return []
    return [record for batch in polled.values() for record in batch]


def _connect(client: Any, *args: Any, **options: Any) -> Any:
    """Build a client, retrying while the broker is not up yet (each try waits up to 30 s)."""

    @retry(
        retry=retry_if_exception_type(RetriableError),
        wait=wait_exponential(multiplier=0.2, max=2),
        stop=stop_after_delay(90),
        reraise=True,
    )
    def attempt() -> Any:
        return client(*args, **options)

    try:
        return attempt()
    except RetriableError as exc:
        raise BrokerUnavailable(
            f"no Kafka broker answers at {options['bootstrap_servers']}: start the stack with "
            "`churn up` or point KAFKA_BOOTSTRAP_SERVERS at a running broker"
        ) from exc


def ensure_topics(settings: Settings, timeout_s: float = 60.0,
                  stopping: threading.Event | None = None) -> bool:
    """Create the project's topics if they are missing; existing ones are left alone.

    Returns False, topics or not, if ``stopping`` is set before it is done.
    """
    wanted = [
        NewTopic(settings.topic_activity, settings.topic_partitions, 1),
        NewTopic(settings.topic_predictions, settings.topic_partitions, 1),
        NewTopic(settings.topic_dead_letter, 1, 1),
        NewTopic(settings.topic_feedback, 1, 1),
        NewTopic(settings.topic_control, 1, 1),
    ]
    return create_topics(settings.bootstrap_servers, wanted, timeout_s, stopping)


ADMIN_BOOTSTRAP_TIMEOUT_MS = 2_000
"""How long one attempt to create topics waits for the broker: a stop is seen between two
attempts, and kafka-python's own 30 s made a SIGTERM wait that long."""


def create_topics(
    bootstrap_servers: str, topics: Iterable[NewTopic], timeout_s: float = 60.0,
    stopping: threading.Event | None = None,
) -> bool:
    """Create each topic unless it exists, retrying while the broker comes up; returns False
    if ``stopping`` is set first."""
    stopping = stopping or threading.Event()

    @retry(
        retry=retry_if_exception_type(KafkaError),
        wait=wait_exponential(multiplier=0.2, max=2),
        stop=stop_after_delay(timeout_s) | stop_when_event_set(stopping),
        sleep=stopping.wait,
        reraise=True,
    )
    def attempt() -> None:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers,
                                 bootstrap_timeout_ms=ADMIN_BOOTSTRAP_TIMEOUT_MS)
        try:
            existing = set(admin.list_topics())
            missing = [t for t in topics if t.name not in existing]
            if missing:
                try:
                    admin.create_topics(missing)
                except TopicAlreadyExistsError:
                    pass
                log.info("created topics %s", [t.name for t in missing])
        finally:
            admin.close()

    topics = list(topics)
    try:
        attempt()
    except KafkaError as exc:
        if stopping.is_set():
            log.info("stopped before the topics could be created on %s", bootstrap_servers)
            return False
        raise BrokerUnavailable(f"could not create topics on {bootstrap_servers}: {exc}") from exc
    return True
