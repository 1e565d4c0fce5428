"""Consumer ingestion into SQLite: ``ActivityIngestor`` (what ``consumer.py`` runs) from a
pre-filled topic into a fresh database file.

Every run reads the whole topic with a group of its own into an empty database; the clock
starts when the first record leaves ``poll`` and stops when the offset of the last is
committed, which happens only after its transaction committed.

In the same run, the driver's ceiling: a group that only polls and commits, with the
consumer's own client settings, and neither parses nor writes. The consumer cannot beat it,
so when ingestion misses its target this figure shows how much of the gap is the Kafka
client's (kafka-python decodes every record in Python) and how much is ours.
"""

import logging
import threading

import sqlalchemy as sa

from bench.common import Context, Figure, fmt, median, prefill, profiled, stream_values
from bench.service import CountingConsumer
from churn_stream import storage
from churn_stream.ingest import ActivityIngestor
from churn_stream.kafka_io import make_consumer, make_producer

log = logging.getLogger(__name__)
TARGET_EVENTS_S = 20_000
RUN_TIMEOUT_S = 900.0


def run(ctx: Context) -> list[Figure]:
    """The ingestion figure."""
    sizes = ctx.sizes
    records = stream_values(ctx.dataset, sizes.ingest_events)
    topic = ctx.settings().topic_activity
    prefill(ctx.bootstrap_servers, topic, records)
    rates, ceilings = [], []
    for number in range(sizes.runs):
        rates.append(ingest_run(ctx, topic, len(records), number))
        ceilings.append(poll_only_run(ctx, topic, len(records)))
        log.info("ingestion run %d: %s events/s (poll and commit alone: %s events/s)",
                 number + 1, fmt(rates[-1]), fmt(ceilings[-1]))
    if ctx.profile:
        with profiled("ingest", True):
            ingest_run(ctx, topic, len(records), sizes.runs)
    return [Figure(
        "consumer ingestion into SQLite, pre-filled topic to committed rows",
        f">= {TARGET_EVENTS_S:,} events/s", "events/s", rates, lambda v: v >= TARGET_EVENTS_S,
        baseline=f"kafka-python poll + commit alone {fmt(median(ceilings))} events/s",
        ratio=median(rates) / median(ceilings),
        ratio_runs=[r / c for r, c in zip(rates, ceilings, strict=True)],
        notes=[f"the ratio is the share of the client's own ceiling that ingestion reaches; "
               f"ceiling runs {', '.join(fmt(c) for c in ceilings)} events/s",
               f"{len(records):,} events a run into an empty SQLite file (WAL, "
               f"synchronous=NORMAL), batches of up to {ctx.settings().batch_max_records:,}"])]


def ingest_run(ctx: Context, topic: str, count: int, number: int) -> float:
    """One pass of the ingestor over the topic; events per second."""
    path = ctx.work_dir / f"ingest-{number}.db"
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)
    url = f"sqlite:///{path}"
    settings = ctx.settings(database_url=url, topic_activity=topic)
    engine = storage.make_engine(url)
    storage.create_schema(engine)
    stopping = threading.Event()
    consumer = CountingConsumer(
        make_consumer(settings.bootstrap_servers, settings.consumer_group, topic,
                      max_poll_records=settings.batch_max_records), stopping, expected=count)
    producer = make_producer(settings.bootstrap_servers)
    ingestor = ActivityIngestor(consumer, producer, engine, settings.topic_dead_letter,
                                settings.max_event_ahead_s, settings.batch_max_wait_ms,
                                settings.batch_max_records)
    ingestor.stopping = stopping
    watchdog = threading.Timer(RUN_TIMEOUT_S, stopping.set)
    watchdog.start()
    try:
        ingestor.run()
    finally:
        watchdog.cancel()
        consumer.close(autocommit=False)
        producer.close()
    with engine.connect() as conn:
        stored = conn.execute(sa.select(sa.func.count()).select_from(
            storage.user_activity)).scalar_one()
    engine.dispose()
    path.unlink(missing_ok=True)
    if stored != count or consumer.first_s is None or consumer.committed_s is None:
        raise RuntimeError(f"the consumer stored {stored} of {count} events")
    return count / (consumer.committed_s - consumer.first_s)


def poll_only_run(ctx: Context, topic: str, count: int) -> float:
    """The topic read by a group that polls and commits and does nothing else; events/s."""
    settings = ctx.settings(topic_activity=topic)
    stopping = threading.Event()
    consumer = CountingConsumer(
        make_consumer(settings.bootstrap_servers, settings.consumer_group, topic,
                      max_poll_records=settings.batch_max_records), stopping, expected=count)
    watchdog = threading.Timer(RUN_TIMEOUT_S, stopping.set)
    watchdog.start()
    try:
        while not stopping.is_set():
            if consumer.poll(timeout_ms=settings.batch_max_wait_ms):
                consumer.commit()
    finally:
        watchdog.cancel()
        consumer.close(autocommit=False)
    if consumer.committed < count or consumer.first_s is None or consumer.committed_s is None:
        raise RuntimeError(f"the poll-only reader committed {consumer.committed} of {count}")
    return count / (consumer.committed_s - consumer.first_s)
