"""Shared parts of the fault-injection suite: service processes, load, counting, figures.

Every scenario drives the real services as processes against a real broker and counts what
reached the database. Each test reports one line ``events sent=N stored=N duplicated=N
lost=N``; the lines are repeated together at the end of the pytest run.
"""

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4

import pytest
import sqlalchemy as sa
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError

from churn_stream import storage
from churn_stream.events import Event
from churn_stream.kafka_io import ensure_topics, make_producer
from churn_stream.settings import Settings
from churn_stream.simulator import Simulator
from tests.brokers import ApacheKafka
from tests.conftest import start_service, wait_until

FIGURES = pytest.StashKey[list[str]]()
OUTPUT_TAIL_LINES = 60


# --- Figures --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Figures:
    """What one scenario sent and what reached the database."""

    scenario: str
    sent: int
    stored: int
    duplicated: int
    lost: int

    @classmethod
    def count(cls, scenario: str, sent_ids: Iterable[str], stored_ids: Iterable[str]) -> "Figures":
        """Compare the ids sent with the ids stored (rows of other origin are ignored)."""
        sent = set(sent_ids)
        mine = [i for i in stored_ids if i in sent]
        distinct = set(mine)
        return cls(scenario, len(sent), len(distinct), len(mine) - len(distinct),
                   len(sent - distinct))

    def line(self) -> str:
        """The line the closing note collects."""
        return (f"events sent={self.sent} stored={self.stored} duplicated={self.duplicated} "
                f"lost={self.lost}")


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Print a scenario's figures (and details) and keep them for the end-of-run summary."""

    def emit(figures: Figures, **details: object) -> None:
        extra = " ".join(f"{k}={v}" for k, v in details.items())
        text = f"[{figures.scenario}] {figures.line()}" + (f" ({extra})" if extra else "")
        print(text)
        request.config.stash.setdefault(FIGURES, []).append(text)

    return emit


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    lines = config.stash.get(FIGURES, [])
    if lines:
        terminalreporter.section("fault-injection figures")
        for text in lines:
            terminalreporter.write_line(text)


# --- Service processes ----------------------------------------------------------------------

class Service:
    """A service process whose output a thread drains: a full pipe would stall the service."""

    def __init__(self, script: str, settings: Settings, *args: str, **env: str) -> None:
        self.name = script
        self.process = start_service(script, settings, *args, **env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._drain, name=f"drain-{script}", daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        return "\n".join(self.lines)

    def count(self, text: str) -> int:
        """How many output lines contain ``text``."""
        return sum(text in line for line in list(self.lines))

    def wait_for(self, text: str, timeout_s: float, times: int = 1) -> bool:
        """Wait until ``text`` has appeared ``times`` times in the output (False if it died)."""
        return wait_until(lambda: self.count(text) >= times or not self.alive, timeout_s) and (
            self.count(text) >= times
        )

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as a crash or the OOM killer would do."""
        if self.alive:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self._reader.join(timeout=5)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code (killed after ``timeout_s``)."""
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        self._reader.join(timeout=5)
        return self.process.returncode

    def tail(self, lines: int = OUTPUT_TAIL_LINES) -> str:
        return "\n".join(self.lines[-lines:])


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Start services; any still running at the end is killed, its output kept in a file."""
    started: list[Service] = []

    def start(script: str, settings: Settings, *args: str, **env: str) -> Service:
        service = Service(script, settings, *args, **env)
        started.append(service)
        return service

    yield start
    for service in started:
        if service.alive:
            service.kill()
        log_file = tmp_path / f"{Path(service.name).stem}-{service.process.pid}.log"
        log_file.write_text(service.output())
        print(f"\n--- {service.name} (exit {service.process.returncode}, full output in "
              f"{log_file}) ---\n{service.tail()}")


# --- The broker a scenario may kill ---------------------------------------------------------

@pytest.fixture(scope="session")
def own_kafka() -> Iterator[ApacheKafka]:
    """An Apache Kafka of the fault suite's own, which scenarios may kill and restart.

    Its port stays the same across restarts, so the services reconnect to the same address.
    """
    if not ApacheKafka.available():
        pytest.skip("needs Java and the Kafka jars (make kafka-jars) to kill a real broker")
    kafka = ApacheKafka().start()
    yield kafka
    kafka.close()


def running(kafka: ApacheKafka) -> ApacheKafka:
    """``kafka``, started again if a scenario left it down."""
    if kafka.process is None or kafka.process.poll() is not None:
        kafka.start()
    return kafka


@pytest.fixture
def own_topics(own_kafka: ApacheKafka, settings: Settings) -> Settings:
    """The test's settings pointed at ``own_kafka`` (started if a scenario left it down)."""
    running(own_kafka)
    moved = settings.model_copy(update={"kafka_bootstrap_servers": own_kafka.bootstrap_servers})
    ensure_topics(moved)
    return moved


# --- Load -----------------------------------------------------------------------------------

def simulated_events(count: int, users: int, seed: int, days: float = 20.0) -> list[Event]:
    """The first ``count`` events of a seeded simulation that ends before now."""
    start = datetime.now(UTC) - timedelta(days=days + 1)
    events: list[Event] = []
    for event in Simulator(users, start, days, seed=seed).events():
        events.append(event)
        if len(events) == count:
            return events
    raise ValueError(f"{users} users over {days} days make only {len(events)} events")


@dataclass
class Sender:
    """Sends events from a thread of the test with the project's producer, at a steady rate.

    Records whose delivery fails are sent again, as a careful application does; the broker
    may then hold a record twice, which the consumer must store once.
    """

    settings: Settings
    events: list[Event]
    rate_per_s: float | None = None
    acked: dict[str, tuple[int, int]] = field(default_factory=dict)
    """event_id -> (partition, offset) of its acknowledged record."""
    resent: int = 0
    error: BaseException | None = None

    def start(self) -> "Sender":
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout_s: float) -> bool:
        """Wait for every record to be acknowledged; False if time ran out."""
        self._thread.join(timeout_s)
        if self.error is not None:
            raise self.error
        return not self._thread.is_alive()

    @property
    def sent(self) -> int:
        return len(self.acked)

    def _run(self) -> None:
        try:
            producer = make_producer(self.settings.bootstrap_servers)
            try:
                pending = self._send_paced(producer, self.events)
                while pending:
                    self.resent += len(pending)
                    pending = self._send_paced(producer, pending, paced=False)
            finally:
                producer.close()
        except BaseException as exc:  # the test thread raises it in join()
            self.error = exc

    def _send_paced(self, producer, events: list[Event], paced: bool = True) -> list[Event]:
        started = time.monotonic()
        futures = []
        for index, event in enumerate(events):
            if paced and self.rate_per_s:
                ahead_s = index / self.rate_per_s - (time.monotonic() - started)
                if ahead_s > 0:
                    time.sleep(ahead_s)
            future = producer.send(self.settings.topic_activity, key=event.key(),
                                   value=event.to_bytes())
            future.add_callback(self._acked, str(event.event_id))
            futures.append((event, future))
        producer.flush()
        return [event for event, future in futures if not future.succeeded()]

    def _acked(self, event_id: str, metadata) -> None:
        self.acked[event_id] = (metadata.partition, metadata.offset)


def send_all(settings: Settings, records: Iterable[tuple[bytes, bytes]]) -> int:
    """Send raw (key, value) records and wait for the broker; returns how many."""
    producer = make_producer(settings.bootstrap_servers)
    sent = 0
    try:
        for key, value in records:
            producer.send(settings.topic_activity, key=key, value=value)
            sent += 1
        producer.flush()
    finally:
        producer.close()
    return sent


# --- Counting -------------------------------------------------------------------------------

def stored_event_ids(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(storage.user_activity.c.event_id)).scalars())


def stored_count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        query = sa.select(sa.func.count()).select_from(storage.user_activity)
        return conn.execute(query).scalar_one()


def wait_for_rows(engine: sa.Engine, expected: int, timeout_s: float) -> bool:
    """Wait until ``user_activity`` holds ``expected`` rows, then a little more for extras."""
    reached = wait_until(lambda: stored_count(engine) >= expected, timeout_s, every_s=0.5)
    if reached:
        time.sleep(1.0)  # a wrongly stored extra row would show up by now
    return reached


def committed_offsets(settings: Settings, group: str, timeout_s: float = 60.0) -> dict[int, int]:
    """The group's committed offsets on the activity topic, by partition.

    Right after a broker restart the group coordinator is still loading: asked again then.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
        try:
            offsets = admin.list_group_offsets(group).get(group, {})
            break
        except KafkaError as exc:
            if not exc.retriable or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
        finally:
            admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items()
            if tp.topic == settings.topic_activity and meta.offset >= 0}


def read_topic(settings: Settings, topic: str, expected: int, timeout_s: float,
               settle_s: float = 2.0) -> list[ConsumerRecord]:
    """Every record of ``topic``: read until ``expected`` arrived, then ``settle_s`` more."""
    consumer = KafkaConsumer(topic, bootstrap_servers=settings.bootstrap_servers,
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             group_id=f"reader-{uuid4().hex[:8]}")
    records: list[ConsumerRecord] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        settle_until = time.monotonic() + settle_s
        while time.monotonic() < settle_until:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
    finally:
        consumer.close()
    return records


# --- The predictors' shared stack -------------------------------------------------------------

@pytest.fixture(scope="session")
def predictor_stack(own_kafka: ApacheKafka, broker, tmp_path_factory: pytest.TempPathFactory):
    """Consumer and two trained predictors on ``own_kafka``, shared by the predictor scenarios."""
    from tests.faults.predictor_stack import PredictorStack, seed_template

    running(own_kafka)
    folder = tmp_path_factory.mktemp("predictor-stack")
    template, live = seed_template(folder)
    tag = uuid4().hex[:8]
    settings = Settings(
        kafka_bootstrap_servers=own_kafka.bootstrap_servers,
        topic_activity=f"user-activity-{tag}", topic_dead_letter=f"user-activity-{tag}.dlq",
        topic_predictions=f"churn-predictions-{tag}", topic_feedback=f"churn-feedback-{tag}",
        topic_control=f"model-control-{tag}", consumer_group=f"churn-consumer-{tag}",
        predictor_group=f"churn-predictor-{tag}", consumer_metrics_port=0,
        producer_metrics_port=0, feedback_loop_metrics_port=0,
    )
    stack = PredictorStack.create(settings, folder, template, live)
    try:
        stack.start_predictor("a")
        stack.start_predictor("b")
        stack.wait_serving("a", "b")
        yield stack
    finally:
        stack.close()
        print(f"\npredictor stack logs in {folder}")
