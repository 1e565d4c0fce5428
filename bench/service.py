"""The predictor and the consumer wired in-process as their services wire them, with a
consumer that notes when the first record came and stops the loop once a count is committed.

Only the first training run differs from ``predictor.py``: the benchmark model is promoted
directly, so that every run serves the same model and none pays for training (cold start is
measured on the real process, in ``bench.cold_start``).
"""

import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from kafka import KafkaConsumer

from churn_stream.features import FeatureStore
from churn_stream.kafka_io import make_consumer, make_producer, subscribe_when_known
from churn_stream.predictor import main as predictor_main
from churn_stream.predictor.retrain import ModelHolder, Retrainer
from churn_stream.predictor.service import Predictor
from churn_stream.predictor.state import UserState
from churn_stream.settings import Settings

log = logging.getLogger(__name__)


class CountingConsumer:
    """A ``KafkaConsumer`` that counts what it hands out and what was committed.

    ``first_s`` is when the first record came out of ``poll`` and ``committed_s`` when the
    latest commit returned (``time.perf_counter``); once ``expected`` records are committed
    it sets ``stopping``.
    """

    def __init__(self, consumer: KafkaConsumer, stopping: threading.Event,
                 expected: int | None = None) -> None:
        self._consumer = consumer
        self.stopping = stopping
        self.expected = expected
        self.polled = 0
        self.committed = 0
        self.first_s: float | None = None
        self.committed_s: float | None = None

    def poll(self, *args: Any, **kwargs: Any) -> dict:
        polled = self._consumer.poll(*args, **kwargs)
        count = sum(len(batch) for batch in polled.values())
        if count and self.first_s is None:
            self.first_s = time.perf_counter()
        self.polled += count
        return polled

    def commit(self, *args: Any, **kwargs: Any) -> None:
        self._consumer.commit(*args, **kwargs)
        self.committed, self.committed_s = self.polled, time.perf_counter()
        if self.expected is not None and self.committed >= self.expected:
            self.stopping.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


@dataclass
class RunningPredictor:
    """A predictor with its parts, ready to ``run`` on the calling thread."""

    predictor: Predictor
    consumer: CountingConsumer
    state: UserState
    holder: ModelHolder
    retrainer: Retrainer
    engine: sa.Engine
    stopping: threading.Event
    drift_requests: list[str] = field(default_factory=list)

    def run(self) -> None:
        try:
            self.predictor.run()
        finally:
            self.consumer.close(autocommit=False)
            self.predictor.producer.close()
            self.engine.dispose()


def predictor(settings: Settings, model: Any, store: FeatureStore | None = None,
              expected: int | None = None, drift_retrains: bool = False) -> RunningPredictor:
    """A predictor serving ``model`` on ``settings``' topics, its state from ``store`` (else
    empty, so users are rebuilt from the database on first sight).

    Drift may not start a retrain unless ``drift_retrains``: a retrain in the middle of a
    throughput run would measure the retrain. Requests are kept in ``drift_requests``.
    """
    sys.setswitchinterval(predictor_main.GIL_SWITCH_INTERVAL_S)
    instance = f"bench-{predictor_main.instance_name()}"
    engine = predictor_main.storage.make_engine(settings.resolved_database_url())
    holder = ModelHolder()
    holder.promote(model)
    predictor_main.settle_heap()
    state = UserState(store if store is not None else FeatureStore(), engine)
    retrainer = predictor_main.make_retrainer(settings, engine, instance, holder)
    drift = predictor_main.make_drift_watch(settings, engine, instance, retrainer)
    stopping = threading.Event()
    consumer = CountingConsumer(
        make_consumer(settings.bootstrap_servers, settings.predictor_group,
                      max_poll_records=settings.predictor_batch_max_records),
        stopping, expected)
    predictor = Predictor(
        consumer, make_producer(settings.bootstrap_servers), engine, state, holder, retrainer,
        drift, settings.topic_predictions, max_records=settings.predictor_batch_max_records,
        max_wait_ms=settings.predictor_batch_max_wait_ms,
        commit_every_s=settings.predictor_commit_interval_ms / 1000,
        max_event_ahead_s=settings.max_event_ahead_s, stopping=stopping)
    running = RunningPredictor(predictor, consumer, state, holder, retrainer, engine, stopping)
    if not drift_retrains:
        drift.request_retrain = running.drift_requests.append
    subscribe_when_known(consumer._consumer, [settings.topic_activity], predictor.listener())
    return running
