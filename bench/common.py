"""What every benchmark shares: figures and their statistics, the run context, Kafka helpers."""

import itertools
import json
import logging
import statistics
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from kafka import KafkaConsumer, TopicPartition

from bench.data import Dataset
from churn_stream import storage
from churn_stream.kafka_io import ensure_topics, make_producer
from churn_stream.settings import Settings

log = logging.getLogger(__name__)
PROFILES = Path(__file__).with_name("profiles")
"""Where ``--profile`` writes pyinstrument's text reports, one per profiled run."""


@dataclass
class Figure:
    """One row of the results table: a median over runs, its target and its baseline."""

    name: str
    target: str
    unit: str
    runs: list[float]
    met: Callable[[float], bool] | None = None
    """Whether a value meets the target; None for figures without one."""
    baseline: str = ""
    ratio: float | None = None
    ratio_runs: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def value(self) -> float:
        return median(self.runs)

    @property
    def verdict(self) -> str:
        if self.met is None or not self.runs:
            return "—"
        return "met" if self.met(self.value) else "missed"


@contextmanager
def profiled(name: str, enabled: bool) -> Iterator[None]:
    """Profile the calling thread with pyinstrument into ``bench/profiles/NAME.txt``."""
    if not enabled:
        yield
        return
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.001)
    profiler.start()
    try:
        yield
    finally:
        profiler.stop()
        PROFILES.mkdir(exist_ok=True)
        path = PROFILES / f"{name}.txt"
        path.write_text(profiler.output_text(unicode=True, color=False))
        log.info("profile of %s written to %s", name, path)


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return float(statistics.median(values)) if len(values) else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation), NaN for no values."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def fmt(value: float, unit: str = "") -> str:
    """A number as the table shows it: three significant digits, thousands separated."""
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


@dataclass
class Sizes:
    """How big each benchmark is; ``smoke()`` is the tiny version the test suite runs."""

    runs: int = 3
    throughput_events: int = 160_000
    naive_events: int = 100
    naive_warmup_events: int = 3
    offered_rate: float = 2_000.0
    latency_s: float = 30.0
    warmup_s: float = 5.0
    predict_requests: int = 2_000
    retrain_before_s: float = 30.0
    retrain_max_s: float = 900.0
    memory_users: tuple[int, ...] = (100_000, 1_000_000)
    memory_events_per_user: int = 4
    memory_runs: int = 1
    """The state's size follows from the users and the vocabulary alone: one run is exact."""
    ingest_events: int = 200_000
    first_run_users: int | None = None
    """``PREDICTOR_FIRST_RUN_USERS`` of the cold start; None keeps the setting's default."""

    @classmethod
    def smoke(cls) -> "Sizes":
        return cls(runs=1, throughput_events=600, naive_events=3, naive_warmup_events=1,
                   offered_rate=200.0, latency_s=3.0, warmup_s=0.5, predict_requests=30,
                   retrain_before_s=2.0, retrain_max_s=240.0, memory_users=(2_000,),
                   memory_events_per_user=4, memory_runs=1, ingest_events=2_000,
                   first_run_users=200)


class Context:
    """The broker, the dataset, the trained model and fresh namespaces for one bench run."""

    def __init__(self, bootstrap_servers: str, broker_kind: str, dataset: Dataset,
                 sizes: Sizes, work_dir: Path, train: Callable[[], Any] | None = None,
                 profile: bool = False) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.broker_kind = broker_kind
        self.dataset = dataset
        self.sizes = sizes
        self.work_dir = work_dir
        self._train = train
        """Makes the model instead of training on the dataset (the smoke tests share one)."""
        self._model: Any = None
        self._store: Any = None
        self.profile = profile
        """Whether benchmarks add one profiled run (``bench/profiles/``) after the measured ones."""
        self.training_seconds: float | None = None

    def settings(self, database_url: str | None = None, **overrides: Any) -> Settings:
        """Settings with topics and groups of their own, on the dataset's database."""
        tag = uuid.uuid4().hex[:8]
        values: dict[str, Any] = {
            "kafka_bootstrap_servers": self.bootstrap_servers,
            "database_url": database_url or self.dataset.url,
            "topic_activity": f"bench-activity-{tag}",
            "topic_dead_letter": f"bench-activity-{tag}.dlq",
            "topic_predictions": f"bench-predictions-{tag}",
            "topic_feedback": f"bench-feedback-{tag}",
            "topic_control": f"bench-control-{tag}",
            "consumer_group": f"bench-consumer-{tag}",
            "predictor_group": f"bench-predictor-{tag}",
        }
        values.update(overrides)
        settings = Settings(**values)
        ensure_topics(settings)
        return settings

    def engine(self, url: str | None = None) -> sa.Engine:
        return storage.make_engine(url or self.dataset.url)

    def model(self) -> Any:
        """The model every in-process benchmark serves: trained once, from the dataset.

        TensorFlow is set up first with the threads a predictor process serves with (its
        models are trained in a child process), so that scoring here costs what it costs there.
        """
        from churn_stream.models.sequence import SERVING_THREADS, tensorflow

        tensorflow(SERVING_THREADS)
        if self._model is None and self._train is not None:
            self._model = self._train()
        if self._model is None:
            import time

            from churn_stream import training

            engine = self.engine()
            started = time.perf_counter()
            log.info("training the benchmark model on %s", self.dataset.db_path.name)
            self._model = training.train(engine, "v0")
            self.training_seconds = time.perf_counter() - started
            engine.dispose()
        return self._model

    def warm_store(self) -> Any:
        """A copy of the feature state of every user in the history, as a running predictor
        that has seen it all holds it; each caller gets its own copy to change."""
        from churn_stream import training
        from churn_stream.features import FeatureStore

        if self._store is None:
            engine = self.engine()
            history = training.load_history(engine)
            engine.dispose()
            store = FeatureStore()
            store.update_frame(history)
            self._store = store
        return self._store.subset(self._store.user_ids())

    def clear_predictions(self) -> None:
        """Empty the tables the predictor writes, so that each run reads only its own rows."""
        engine = self.engine()
        with engine.begin() as conn:
            for table in (storage.predictions, storage.drift_reports):
                conn.execute(table.delete())
        engine.dispose()


def stream_values(dataset: Dataset, count: int) -> list[tuple[bytes, bytes]]:
    """``count`` (key, value) records of the stream (see ``iter_stream``)."""
    return list(iter_stream(dataset, count))


def iter_stream(dataset: Dataset, count: int) -> Iterator[tuple[bytes, bytes]]:
    """``count`` (key, value) records of the stream, cycled with times moved on by whole
    days (and fresh event ids) when the stream is shorter."""
    lines = dataset.stream()
    if not lines:
        raise ValueError(f"the stream of {dataset.stream_path} is empty")
    documents = [json.loads(line) for line in lines]
    first = datetime.fromisoformat(documents[0]["ts"])
    last = datetime.fromisoformat(documents[-1]["ts"])
    span = timedelta(days=max(1, -(-(last - first) // timedelta(days=1))))
    made = 0
    for loop in itertools.count():
        for document, line in zip(documents, lines, strict=True):
            if made == count:
                return
            if loop:
                moved = dict(document, event_id=str(uuid.uuid4()),
                             ts=(datetime.fromisoformat(document["ts"]) + loop * span).isoformat())
                line = json.dumps(moved, separators=(",", ":")).encode()
            made += 1
            yield document["user_id"].encode(), line


def prefill(bootstrap_servers: str, topic: str, records: Sequence[tuple[bytes, bytes]]) -> None:
    """Produce ``records`` to ``topic`` and wait until the broker has them all."""
    producer = make_producer(bootstrap_servers)
    for key, value in records:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def read_topic(bootstrap_servers: str, topic: str, timeout_s: float = 60.0) -> list[Any]:
    """Every record of ``topic`` up to its current end."""
    import time

    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None,
                             enable_auto_commit=False, max_poll_records=5000)
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    end = consumer.end_offsets(partitions)
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while any(consumer.position(tp) < end[tp] for tp in partitions):
        if time.monotonic() > deadline:
            raise TimeoutError(f"could not read {topic} to its end in {timeout_s:.0f} s")
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    consumer.close()
    return records
