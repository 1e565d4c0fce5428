"""The stack the predictor scenarios share: trained predictors are expensive to start.

One database seeded with 43 days of simulated history, the consumer, and two predictors in
one group on the fault suite's own broker (which a scenario may pause or kill). The last two
simulated days are the live traffic, handed out to the scenarios in chunks. Each scenario
leaves at least one predictor serving; one that needs two starts the missing one.

Every predictor runs with a retrain failure injected (``memory`` for ``a``, ``raise`` for
``b``: only retrains fail, never the first training), drift retrains turned off (their
timing would blur the figures), small micro-batches (so that a kill lands mid-stream), and
canary secrets in its environment.
"""

import re
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import httpx
import sqlalchemy as sa
from kafka import KafkaConsumer, TopicPartition
from pydantic import SecretStr

from churn_stream import storage
from churn_stream.events import Event
from churn_stream.kafka_io import ensure_topics
from churn_stream.settings import Settings
from tests.brokers import free_port
from tests.conftest import wait_until
from tests.faults.conftest import Sender, Service, committed_offsets
from tests.simulated import DAYS, START, simulated_database, simulated_events

LIVE_DAYS = 2
SECRET_KEY = "key-canary-stack-51e0"
SECRET_PASSWORD = "pw-canary-stack-9ab4"
INJECTED = {"a": "memory", "b": "raise"}
TRAIN_TIMEOUT_S = 300.0
"""Two predictors train at once on two cores: allow a loaded machine its time."""


def seed_template(folder: Path) -> tuple[Path, list[Event]]:
    """A database file holding all but the last ``LIVE_DAYS`` days, and those days' events.

    It starts as a copy of the simulated database the model tests share (written once per
    test process), with the live days deleted.
    """
    live_from = START + timedelta(days=DAYS - LIVE_DAYS)
    path = folder / "template.db"
    shutil.copy(sa.engine.make_url(simulated_database()).database, path)
    engine = storage.make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        table = storage.user_activity
        conn.execute(table.delete().where(table.c.ts >= storage.to_db_time(live_from)))
    engine.dispose()
    return path, [e for e in simulated_events() if e.ts >= live_from]


@dataclass
class PredictorStack:
    """The shared services and what has been sent to them."""

    settings: Settings
    engine: sa.Engine
    folder: Path
    live: list[Event]
    consumer: Service | None = None
    predictors: dict[str, Service] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    finished: list[Service] = field(default_factory=list)
    partition_of: dict[str, int] = field(default_factory=dict)
    """user_id -> partition, from the acknowledgements of everything sent."""

    @classmethod
    def create(cls, settings: Settings, folder: Path, template: Path,
               live: list[Event]) -> "PredictorStack":
        shutil.copy(template, folder / "churn.db")
        settings = settings.model_copy(update={
            "database_url": SecretStr(f"sqlite:///{folder / 'churn.db'}"), "topic_partitions": 6})
        ensure_topics(settings)
        stack = cls(settings, storage.make_engine(settings.resolved_database_url()), folder,
                    list(live))
        stack.consumer = Service("consumer.py", settings)
        return stack

    def start_predictor(self, name: str) -> Service:
        """Start predictor ``name`` (a new process if one ran before under that name)."""
        self.ports.setdefault(name, free_port())
        service = Service(
            "predictor.py", self.settings, PREDICTOR_PORT=str(self.ports[name]),
            PREDICTOR_BATCH_MAX_RECORDS="50", PREDICTOR_BATCH_MAX_WAIT_MS="20",
            PREDICTOR_TRAIN_RETRY_S="2", DRIFT_MIN_ROWS=str(10**9),
            RETRAIN_FAILURE_INJECTION=INJECTED[name], CHURN_API_KEY=SECRET_KEY,
            MSSQL_PASSWORD=SECRET_PASSWORD, MSSQL_HOST="sql.invalid")
        if name in self.predictors:
            self.finished.append(self.predictors[name])
        self.predictors[name] = service
        return service

    def wait_serving(self, *names: str, timeout_s: float = TRAIN_TIMEOUT_S) -> None:
        """Wait until these predictors have trained and joined the group."""
        for name in names:
            service = self.predictors[name]
            assert service.wait_for("rebalance: own partitions", timeout_s), service.tail()

    def ensure(self, *names: str) -> None:
        """Make sure these predictors serve, starting any that does not run."""
        missing = [n for n in names if n not in self.predictors or not self.predictors[n].alive]
        for name in missing:
            self.start_predictor(name)
        self.wait_serving(*missing)

    def serving(self) -> list[str]:
        return [name for name, service in self.predictors.items() if service.alive]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def get(self, name: str, path: str) -> httpx.Response:
        return httpx.get(f"{self.url(name)}{path}", timeout=30)

    def take(self, count: int) -> list[Event]:
        """The next ``count`` live events, in time order."""
        assert len(self.live) >= count, "the scenarios used up the live traffic"
        chunk, self.live = self.live[:count], self.live[count:]
        return chunk

    def send(self, events: list[Event], rate_per_s: float | None = None) -> Sender:
        """Send events and wait for the broker's acknowledgements."""
        sender = Sender(self.settings, events, rate_per_s=rate_per_s).start()
        assert sender.join(120)
        by_id = {str(e.event_id): e.user_id for e in events}
        for event_id, (partition, _offset) in sender.acked.items():
            self.partition_of[by_id[event_id]] = partition
        return sender

    def predictions(self, user_ids: set[str] | None = None) -> list[sa.Row]:
        """(user_id, event_ts, model_version) of the stored predictions."""
        table = storage.predictions
        query = sa.select(table.c.user_id, table.c.event_ts, table.c.model_version)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [r for r in rows if user_ids is None or r.user_id in user_ids]

    def answered(self, events: list[Event]) -> bool:
        """Whether every user of ``events`` has a prediction answering their last event."""
        return not unanswered(events, self.predictions({e.user_id for e in events}))

    def close(self) -> None:
        for service in [self.consumer, *self.predictors.values(), *self.finished]:
            if service is None:
                continue
            if service.alive:
                service.stop(timeout_s=20)
            log_file = self.folder / f"{Path(service.name).stem}-{service.process.pid}.log"
            log_file.write_text(service.output())
        self.engine.dispose()


def owned_partitions(output: str) -> set[int]:
    """The partitions a predictor said it owned last."""
    found = re.findall(r"rebalance: own partitions \[([\d, ]*)\]", output)
    return {int(p) for p in found[-1].split(",") if p.strip()} if found else set()


def metric(text: str, name: str) -> float:
    """The value of an unlabelled metric in Prometheus text."""
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, f"no {name} in the metrics"
    return float(found.group(1))


def unanswered(events: list[Event], predictions: list[sa.Row]) -> dict[str, str]:
    """Users whose newest prediction does not answer their newest event: user -> why."""
    last_event = {}
    for event in events:
        ts = storage.to_db_time(event.ts)
        last_event[event.user_id] = max(last_event.get(event.user_id, ts), ts)
    last_answer = defaultdict(lambda: None)
    for row in predictions:
        if last_answer[row.user_id] is None or row.event_ts > last_answer[row.user_id]:
            last_answer[row.user_id] = row.event_ts
    return {user: f"last event {ts}, last prediction for {last_answer[user]}"
            for user, ts in last_event.items()
            if last_answer[user] is None or last_answer[user] < ts}


def repeated(predictions: list[sa.Row], by_version: bool = True) -> int:
    """Predictions beyond the first for the same (user_id, event_ts[, model_version])."""
    keys = [(r.user_id, r.event_ts) + ((r.model_version,) if by_version else ())
            for r in predictions]
    return len(keys) - len(set(keys))


def caught_up(stack: PredictorStack) -> bool:
    """Whether the predictor group has committed everything on the activity topic."""
    topic = stack.settings.topic_activity
    reader = KafkaConsumer(bootstrap_servers=stack.settings.bootstrap_servers, group_id=None)
    try:
        ends = reader.end_offsets([TopicPartition(topic, p)
                                   for p in range(stack.settings.topic_partitions)])
    finally:
        reader.close()
    committed = committed_offsets(stack.settings, stack.settings.predictor_group)
    return all(committed.get(tp.partition, 0) >= end for tp, end in ends.items())


def wait_answered(stack: PredictorStack, events: list[Event], timeout_s: float) -> bool:
    return wait_until(lambda: stack.answered(events), timeout_s, every_s=0.5)
