"""Predictor throughput from a pre-filled topic to persisted predictions, against the naive
predictor on the same topic, in the same run.

A topic is filled with the stream once; every run reads all of it with a group of its own.
The clock starts when the first record leaves ``poll`` and stops when the offset of the last
one is committed, which the predictor does only after the predictions are in the table and
on the broker. Two states are measured: warm (every user's state already held, as in a
predictor that has been running) and cold (a fresh process: each user's history is read from
the database on first sight). The naive predictor scores a small sample, since each event
costs it tens of milliseconds.
"""

import logging
import threading

import sqlalchemy as sa

from bench import service
from bench.common import Context, Figure, fmt, median, prefill, profiled, stream_values
from bench.naive import NaivePredictor
from churn_stream import storage
from churn_stream.kafka_io import make_consumer, make_producer

log = logging.getLogger(__name__)
TARGET_EVENTS_S = 10_000
TARGET_RATIO = 500
RUN_TIMEOUT_S = 1_800.0


def run(ctx: Context) -> list[Figure]:
    """The throughput figures (warm and cold state) and the ratio to the naive predictor."""
    sizes = ctx.sizes
    model = ctx.model()
    records = stream_values(ctx.dataset, sizes.throughput_events)
    topic = ctx.settings().topic_activity
    prefill(ctx.bootstrap_servers, topic, records)
    warm, cold, naive = [], [], []
    for number in range(sizes.runs):
        warm.append(fast_run(ctx, topic, model, len(records), warm=True))
        cold.append(fast_run(ctx, topic, model, len(records), warm=False))
        naive.append(naive_run(ctx, topic, model))
        log.info("throughput run %d: warm %s, cold %s, naive %s events/s", number + 1,
                 fmt(warm[-1]), fmt(cold[-1]), fmt(naive[-1]))
    if ctx.profile:
        with profiled("throughput-warm", True):
            fast_run(ctx, topic, model, len(records), warm=True)
        with profiled("throughput-cold", True):
            fast_run(ctx, topic, model, len(records), warm=False)
        with profiled("naive", True):
            naive_run(ctx, topic, model)
    naive_median = median(naive)
    n = sizes.runs
    return [
        Figure("predictor throughput, all three models, pre-filled topic to persisted "
               "predictions (state held)", f">= {TARGET_EVENTS_S:,} events/s", "events/s",
               warm, lambda v: v >= TARGET_EVENTS_S,
               baseline=f"naive {fmt(naive_median)} events/s", ratio=median(warm) / naive_median,
               ratio_runs=[w / b for w, b in zip(warm, naive, strict=True)],
               notes=[f"{len(records):,} events over {ctx.dataset.users:,} users, read "
                      f"{n} times by fresh groups; every user's state held at start"]),
        Figure("same, fresh process: each user's state rebuilt from the database on first "
               "sight", f">= {TARGET_EVENTS_S:,} events/s", "events/s", cold,
               lambda v: v >= TARGET_EVENTS_S, baseline=f"naive {fmt(naive_median)} events/s",
               ratio=median(cold) / naive_median,
               ratio_runs=[c / b for c, b in zip(cold, naive, strict=True)],
               notes=[f"the first sight of each of {ctx.dataset.users:,} users reads their "
                      f"{ctx.dataset.days}-day history from SQLite"]),
        Figure("speed-up over the naive predictor (state held / naive)",
               f">= {TARGET_RATIO}x", "x", [w / b for w, b in zip(warm, naive, strict=True)],
               lambda v: v >= TARGET_RATIO, baseline=f"naive {fmt(naive_median)} events/s",
               notes=[f"naive: per event a history SELECT, offline features for one user, "
                      f"predict_proba / Booster.predict / Keras predict on one row, one "
                      f"transaction and one commit; {sizes.naive_events} events a run after "
                      f"{sizes.naive_warmup_events} warm-up events; naive runs "
                      f"{', '.join(fmt(v) for v in naive)} events/s"]),
    ]


def fast_run(ctx: Context, topic: str, model: object, count: int, warm: bool) -> float:
    """One pass of the real predictor over the topic; events per second."""
    ctx.clear_predictions()
    settings = ctx.settings(topic_activity=topic)
    store = ctx.warm_store() if warm else None
    running = service.predictor(settings, model, store=store, expected=count)
    watchdog = threading.Timer(RUN_TIMEOUT_S, running.stopping.set)
    watchdog.start()
    try:
        running.run()
    finally:
        watchdog.cancel()
    consumer = running.consumer
    if consumer.committed < count or consumer.first_s is None or consumer.committed_s is None:
        raise RuntimeError(f"the predictor committed {consumer.committed} of {count} events")
    written = _count(ctx.engine(), storage.predictions)
    if written < ctx.dataset.users // 10:
        raise RuntimeError(f"only {written} predictions were persisted for {count} events")
    return count / (consumer.committed_s - consumer.first_s)


def naive_run(ctx: Context, topic: str, model: object) -> float:
    """The naive predictor on the start of the same topic; events per second."""
    sizes = ctx.sizes
    settings = ctx.settings(topic_activity=topic)
    engine = ctx.engine()
    consumer = make_consumer(settings.bootstrap_servers, settings.predictor_group, topic)
    producer = make_producer(settings.bootstrap_servers)
    naive = NaivePredictor(engine, model, consumer, producer,
                           settings.topic_predictions)
    try:
        naive.run(sizes.naive_warmup_events)
        seconds = naive.run(sizes.naive_events)
    finally:
        consumer.close(autocommit=False)
        producer.close()
        engine.dispose()
    return sizes.naive_events / seconds


def _count(engine: sa.Engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
    engine.dispose()
    return count
