"""The predictor: micro-batching and run records alone, then the service as a process."""

import dataclasses
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from kafka.consumer.fetcher import ConsumerRecord

from churn_stream import storage
from churn_stream.control import RetrainCommand, publish_command
from churn_stream.errors import NotEnoughData
from churn_stream.events import Event
from churn_stream.features import FeatureSpace, FeatureStore
from churn_stream.kafka_io import make_consumer, make_producer
from churn_stream.models import ChurnModel
from churn_stream.predictor import runs
from churn_stream.predictor.batching import Received, collect, parse_batch
from churn_stream.predictor.metrics import CONSUMER_LAG
from churn_stream.predictor.retrain import ModelHolder, Retrainer
from churn_stream.predictor.service import Predictor
from churn_stream.predictor.state import UserState
from churn_stream.settings import Settings
from churn_stream.simulator import Simulator
from tests.brokers import free_port
from tests.conftest import start_service, wait_until
from tests.simulated import DAYS, START, simulated_events, trained_model

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)


def record(value: bytes | None, partition: int = 0, offset: int = 0,
           timestamp_ms: int = 1_000) -> ConsumerRecord:
    return ConsumerRecord("user-activity", partition, None, offset, timestamp_ms, 0, b"k",
                          value, [], None, 1, len(value or b""), 0)


def event_bytes(user_id: str = "u1", minutes: int = 0, **extra) -> bytes:
    event = Event(user_id=user_id, event_type="login", ts=NOW - timedelta(minutes=minutes),
                  **extra)
    return event.to_bytes()


class ScriptedPoll:
    """Returns prepared batches of records, advancing a fake clock by each poll's timeout."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches
        self.now_s = 0.0
        self.calls: list[tuple[int, int]] = []

    def __call__(self, timeout_ms: int, max_records: int) -> list[int]:
        self.calls.append((timeout_ms, max_records))
        if not self.batches:
            self.now_s += timeout_ms / 1000
            return []
        self.now_s += 0.010
        return self.batches.pop(0)[:max_records]


@pytest.mark.timeout(30)
def test_collect_stops_at_the_size_bound() -> None:
    poll = ScriptedPoll([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    sink: list = []
    collect(poll, sink, max_records=5, max_wait_ms=1000, stopping=threading.Event(),
            clock=lambda: poll.now_s)
    assert sink == [1, 2, 3, 4, 5]
    assert [c[1] for c in poll.calls] == [5, 2]


@pytest.mark.timeout(30)
def test_collect_stops_at_the_time_bound_from_the_first_record() -> None:
    poll = ScriptedPoll([[1]] * 100)
    sink: list = []
    collect(poll, sink, max_records=1000, max_wait_ms=50, stopping=threading.Event(),
            clock=lambda: poll.now_s)
    # Each poll takes 10 ms of the fake clock: the first record is in hand at 10 ms, so the
    # deadline is 60 ms and five more polls end by then.
    assert sink == [1] * 6


@pytest.mark.timeout(30)
def test_collect_returns_after_one_empty_poll() -> None:
    poll = ScriptedPoll([])
    sink: list = []
    collect(poll, sink, max_records=10, max_wait_ms=200, stopping=threading.Event(),
            clock=lambda: poll.now_s)
    assert sink == [] and poll.calls == [(200, 10)]


@pytest.mark.timeout(30)
def test_collect_stops_when_asked() -> None:
    poll = ScriptedPoll([[1], [2], [3]])
    stopping = threading.Event()
    stopping.set()
    sink: list = []
    collect(poll, sink, max_records=10, max_wait_ms=1000, stopping=stopping,
            clock=lambda: poll.now_s)
    assert sink == [1]


@pytest.mark.timeout(30)
def test_parse_batch_keeps_valid_events_and_skips_the_rest() -> None:
    records = [
        record(event_bytes("u1"), partition=2, offset=0, timestamp_ms=111),
        record(b"{not json", offset=1),
        record(None, offset=2),
        record(event_bytes("u2", minutes=-3 * 24 * 60), offset=3),  # three days ahead
        record(b'{"user_id": "u3", "event_type": "Bad Type", "ts": "2026-03-01T12:00:00Z"}'),
        record(event_bytes("u4", numeric={"amount": 9.5}), partition=1, timestamp_ms=222),
    ]
    batch = parse_batch(records, max_ahead_s=86_400, now=NOW)
    assert (batch.records, batch.skipped) == (6, 4)
    assert [(r.event.user_id, r.partition, r.timestamp_ms) for r in batch.received] == [
        ("u1", 2, 111), ("u4", 1, 222)]


@pytest.mark.timeout(30)
def test_a_run_is_recorded_when_it_starts_and_when_it_ends(engine: sa.Engine) -> None:
    first_id, first = runs.start_run(engine, "host-1", "start")
    second_id, second = runs.start_run(engine, "host-1", "drift")
    assert (first, second) == (f"v{first_id}", f"v{second_id}") and second_id == first_id + 1
    runs.finish_run(engine, second_id, 12.5, 400, {"blend": {"roc_auc": float("nan")}},
                    promoted=True, error=None)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(storage.model_runs).order_by("id")).mappings().all()
    assert [(r["model_version"], r["reason"], r["error"]) for r in rows] == [
        (first, "start", runs.UNFINISHED), (second, "drift", None)]
    assert (rows[1]["seconds"], rows[1]["rows"], rows[1]["promoted"]) == (12.5, 400, True)
    assert rows[1]["metrics"] == {"blend": {"roc_auc": None}}


@pytest.mark.timeout(30)
@pytest.mark.timeout(300)
def test_a_model_no_better_than_chance_is_never_served(engine: sa.Engine) -> None:
    fitted, _ = trained_model()
    holdout_auc = {"v": 0.49}

    def train(_engine, version, **_options):
        blend = {**fitted.metrics["blend"], "roc_auc": holdout_auc["v"]}
        return dataclasses.replace(fitted, version=version, metrics={**fitted.metrics,
                                                                   "blend": blend})

    holder = ModelHolder()
    retrainer = Retrainer(engine, "host-1", holder, train, judge=lambda c, s: (1.0, 0.0),
                          min_roc_auc=0.6)
    refused = retrainer.run("start")
    assert (refused.promoted, holder.current) == (False, None)
    assert "0.4900 is below 0.60" in refused.error

    holdout_auc["v"] = 0.93
    served = retrainer.run("start")
    assert served.promoted and holder.current.version == served.version
    with engine.connect() as conn:
        recorded = conn.execute(sa.select(storage.model_runs.c.promoted, storage.model_runs.c.error)
                                .order_by(storage.model_runs.c.id)).all()
    assert [promoted for promoted, _ in recorded] == [False, True]
    assert "not served" in recorded[0][1] and recorded[1][1] is None


@pytest.mark.timeout(60)
def test_a_smaller_first_run_is_followed_by_a_full_one_under_the_same_checks(
    engine: sa.Engine,
) -> None:
    fitted, _ = trained_model()
    sizes: list[int | None] = []
    too_few = NotEnoughData("7 churned", sampled=True)
    results: list[float | Exception] = [0.55, 0.93, too_few, 0.93, 0.94]

    def train(_engine, version, *, failure_injection=None, max_users=None):
        sizes.append(max_users)
        result = RuntimeError("injected") if failure_injection == "raise" else results.pop(0)
        if isinstance(result, Exception):
            raise result
        blend = {**fitted.metrics["blend"], "roc_auc": result}
        return dataclasses.replace(
            fitted, version=version, metrics={**fitted.metrics, "blend": blend},
            details={**fitted.details, "users": max_users or 300, "sampled": bool(max_users)})

    def start(failure_injection: str | None = None) -> tuple[Retrainer, ChurnModel | None]:
        retrainer = Retrainer(engine, "host-1", ModelHolder(), train,
                              judge=lambda c, s: (1.0, 0.0), min_roc_auc=0.6,
                              failure_injection=failure_injection, first_run_users=100)
        served = retrainer.train_initial(threading.Event(), retry_s=60)
        retrainer.wait(30)
        return retrainer, served

    # The sample scores below the floor, or holds too few churners: the next start run
    # follows at once (no 60 s retry wait) and reads as many users as any run; with a
    # full-size model serving, nothing follows.
    for _ in range(2):
        retrainer, served = start()
        assert sizes[-2:] == [100, None] and served.details["users"] == 300
        assert len(retrainer.outcomes) == 2
    # The small model serves; the full-size run that follows fails, and it keeps serving.
    retrainer, small = start(failure_injection="raise")
    assert sizes[-2:] == [100, None] and retrainer.holder.current.version == small.version

    recorded = [(r["reason"], r["promoted"], (r["error"] or "")[:31]) for r in model_runs(engine)]
    assert recorded == [
        ("start", False, "holdout ROC-AUC 0.5500 is below"), ("start", True, ""),
        ("start", False, "waiting for labelled history: 7"),  # a sample of too few
        ("start", True, ""), ("start", True, ""), ("warm-up", False, "RuntimeError: injected")]
    details = model_runs(engine)[4]["metrics"]["details"]
    assert (details["users"], details["sampled"]) == (100, True) and not results


def test_version_numbers() -> None:
    assert runs.version_number("v12") == 12 and runs.version_number("dev") == 0


# --- The predictor as a process, through the real broker -------------------------------------

def split_history(days_live: float = 1.0) -> tuple[list[Event], list[Event]]:
    """The shared simulated history: all but its last ``days_live`` days, and those days."""
    events = simulated_events()
    live_from = START + timedelta(days=DAYS - days_live)
    return ([e for e in events if e.ts < live_from], [e for e in events if e.ts >= live_from])


def send_events(settings: Settings, events: list[Event], extra: list[bytes] = ()) -> None:
    producer = make_producer(settings.bootstrap_servers)
    for raw in extra:
        producer.send(settings.topic_activity, key=b"bad", value=raw)
    for event in events:
        producer.send(settings.topic_activity, key=event.key(), value=event.to_bytes())
    producer.flush()
    producer.close()


def send_paced(settings: Settings, events: list[Event], chunk: int, pause_s: float) -> None:
    """``events`` in chunks of ``chunk`` with ``pause_s`` between them."""
    for start in range(0, len(events), chunk):
        send_events(settings, events[start:start + chunk])
        time.sleep(pause_s)


def model_runs(engine: sa.Engine) -> list[dict]:
    with engine.connect() as conn:
        query = sa.select(storage.model_runs).order_by(storage.model_runs.c.id)
        return [dict(r) for r in conn.execute(query).mappings()]


def predicted_users(engine: sa.Engine) -> dict[str, set[str]]:
    """Model versions that scored each user."""
    table = storage.predictions
    with engine.connect() as conn:
        rows = conn.execute(sa.select(table.c.user_id, table.c.model_version)).all()
    users: dict[str, set[str]] = {}
    for user_id, version in rows:
        users.setdefault(user_id, set()).add(version)
    return users


def unanswered(engine: sa.Engine, events: list[Event]) -> set[str]:
    """Users whose latest event among ``events`` no prediction answers yet."""
    latest: dict[str, datetime] = {}
    for event in events:
        latest[event.user_id] = max(latest.get(event.user_id, event.ts), event.ts)
    table = storage.predictions
    with engine.connect() as conn:
        answered = dict(conn.execute(sa.select(table.c.user_id, sa.func.max(table.c.event_ts))
                                     .group_by(table.c.user_id)).all())
    return {user for user, ts in latest.items()
            if user not in answered or answered[user] < storage.to_db_time(ts)}


@pytest.fixture
def predictor_settings(topics: Settings) -> Settings:
    return topics.model_copy(update={"predictor_port": free_port(),
                                     "predictor_batch_max_wait_ms": 20})


def stop(process: subprocess.Popen, timeout_s: float = 30.0) -> str:
    """SIGTERM, wait, and return the process's output."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output.decode(errors="replace")


@pytest.mark.timeout(300)
def test_predictor_scores_every_user_and_a_failing_retrain_leaves_the_model_serving(
    predictor_settings: Settings, engine: sa.Engine
) -> None:
    settings = predictor_settings
    past, live = split_history()
    process = start_service("predictor.py", settings, RETRAIN_FAILURE_INJECTION="raise",
                            PREDICTOR_TRAIN_RETRY_S="1")
    api = f"http://127.0.0.1:{settings.predictor_port}"
    output = ""
    try:
        assert wait_until(lambda: [r["error"][:28] for r in model_runs(engine)]
                          == ["waiting for labelled history"], 60)
        assert httpx.get(f"{api}/health").status_code == 503
        storage.write_events(engine, past, datetime.now(UTC))
        assert wait_until(lambda: any(r["promoted"] for r in model_runs(engine)), 200)
        (start_run,) = model_runs(engine)
        assert (start_run["reason"], start_run["error"]) == ("start", None)
        assert start_run["rows"] > 0 and "models" in start_run["metrics"]
        version = start_run["model_version"]

        half = len(live) // 2
        send_events(settings, live[:half], extra=[b"{not json", b'{"user_id": "u1"}'])
        expected = {e.user_id for e in live[:half]}
        assert wait_until(lambda: expected <= set(predicted_users(engine)), 60)
        assert set(predicted_users(engine)) == expected
        assert all(v == {version} for v in predicted_users(engine).values())

        health = httpx.get(f"{api}/health").json()
        assert (health["status"], health["model_version"]) == ("serving", version)
        described = httpx.get(f"{api}/model").json()
        assert described["version"] == version and described["features"]
        assert set(described["metrics"]) >= {"blend"}
        user = live[0].user_id
        scored = httpx.get(f"{api}/predict/{user}").json()
        assert scored["user_id"] == user and 0 <= scored["score"] <= 1
        assert set(scored["scores"]) == {"rf", "xgb", "seq", "blend"}
        assert len(scored["top_features"]) == 5
        assert httpx.get(f"{api}/predict/nobody").status_code == 404
        metrics = httpx.get(f"{api}/metrics").text
        assert 'model_prediction_latency_seconds_bucket{le="0.1",model="blend"}' in metrics
        assert "predictor_events_skipped_total" in metrics and "user_id" not in metrics

        producer = make_producer(settings.bootstrap_servers)
        publish_command(producer, settings.topic_control, RetrainCommand(reason="feedback"))
        producer.close()
        assert wait_until(lambda: len(model_runs(engine)) == 2
                          and model_runs(engine)[1]["error"] != runs.UNFINISHED, 60)
        failed = model_runs(engine)[1]
        assert (failed["reason"], failed["promoted"]) == ("feedback", False)
        assert "injected training failure" in failed["error"]

        # A second member joins and leaves while the rest streams in: the predictor gives
        # up partitions mid-stream and takes them back, the intruder reads records without
        # committing them, and every user must still be answered.
        rest = live[half:]
        sender = threading.Thread(target=send_paced, args=(settings, rest, 100, 0.15))
        sender.start()
        intruder = make_consumer(settings.bootstrap_servers, settings.predictor_group,
                                 settings.topic_activity)
        try:
            assert wait_until(lambda: intruder.poll(timeout_ms=100) is not None
                              and bool(intruder.assignment()), 60)
            intruder.poll(timeout_ms=1000)
        finally:
            intruder.close(autocommit=False)
        sender.join(timeout=60)
        assert wait_until(lambda: unanswered(engine, rest) == set(), 90), unanswered(engine, rest)
        assert process.poll() is None, "the predictor died in the rebalance"
        assert all(v == {version} for v in predicted_users(engine).values())
        assert httpx.get(f"{api}/health").json()["model_version"] == version
    finally:
        output = stop(process)
        print(output[-20_000:])  # shown by pytest when the test fails
    assert process.returncode == 0, output[-3000:]
    assert "predictor stopped after" in output


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_first_model_from_a_small_sample_is_replaced_by_a_full_size_one(
    predictor_settings: Settings, engine: sa.Engine
) -> None:
    settings = predictor_settings
    past, live = split_history()
    storage.write_events(engine, past, datetime.now(UTC))
    stored_users = len({e.user_id for e in past})
    process = start_service("predictor.py", settings, PREDICTOR_FIRST_RUN_USERS="200")
    api = f"http://127.0.0.1:{settings.predictor_port}"
    output = ""
    try:
        assert wait_until(lambda: len(model_runs(engine)) == 2
                          and model_runs(engine)[1]["error"] != runs.UNFINISHED, 240)
        first, full = model_runs(engine)
        assert (first["reason"], first["promoted"], first["error"]) == ("start", True, None)
        assert (full["reason"], full["promoted"], full["error"]) == ("warm-up", True, None)
        assert first["metrics"]["details"]["users"] == 200
        assert first["metrics"]["details"]["sampled"] is True
        assert full["metrics"]["details"]["users"] == stored_users > 200
        assert full["metrics"]["details"]["sampled"] is False
        assert full["rows"] > first["rows"]
        for run in (first, full):
            assert run["metrics"]["models"]["blend"]["roc_auc"] >= settings.min_serving_roc_auc
        assert full["metrics"]["promotion"]["current_version"] == first["model_version"]

        # The API process gets each promoted model over a pipe, a moment after the promotion.
        assert wait_until(lambda: httpx.get(f"{api}/health").json()["model_version"]
                          == full["model_version"], 10)
        send_events(settings, live[:200])
        expected = {e.user_id for e in live[:200]}
        assert wait_until(lambda: expected <= set(predicted_users(engine)), 60)
        assert all(v == {full["model_version"]} for v in predicted_users(engine).values())
    finally:
        output = stop(process)
        print(output[-20_000:])  # shown by pytest when the test fails
    assert process.returncode == 0, output[-3000:]
    assert "(reason warm-up) starts now in the background" in output


@pytest.mark.timeout(60)
def test_state_rebuilt_from_the_database_equals_state_fed_every_event(engine: sa.Engine) -> None:
    start = NOW - timedelta(days=12)
    events = list(Simulator(30, start, 12, seed=4).events())
    storage.write_events(engine, events, NOW)  # the consumer stored everything, batch included
    t1, t2 = start + timedelta(days=9), start + timedelta(days=10)
    in_hand = [e for e in events if t1 <= e.ts < t2]
    state = UserState(FeatureStore(), engine)
    state.apply([Received(e, partition=hash(e.user_id) % 3, timestamp_ms=0) for e in in_hand])

    users = sorted({e.user_id for e in in_hand})
    reference = FeatureStore()
    reference.update([e for e in events if e.ts < t2 and e.user_id in set(users)])
    history = pd.DataFrame([storage.event_row(e, NOW) for e in events])
    space = FeatureSpace.learn(history)
    rebuilt, expected = state.matrix(users, t2, space), reference.matrix(users, t2, space)
    np.testing.assert_array_equal(rebuilt[0], expected[0])
    np.testing.assert_array_equal(rebuilt[1], expected[1])
    assert state.clock == max(e.ts for e in in_hand)

    outsider = next(u.user_id for u in Simulator(30, start, 12, seed=4).users
                    if u.user_id not in users and any(e.user_id == u.user_id for e in events))
    looked_up = state.lookup(outsider, space)
    assert looked_up is not None and outsider not in state.store
    assert state.lookup("nobody", space) is None

    partition = state.partition_of[users[0]]
    owned_there = {u for u, p in state.partition_of.items() if p == partition}
    assert state.forget_partitions([partition]) == len(owned_there)
    assert not owned_there & set(state.partition_of)
    assert len(state.store) == len(users) - len(owned_there)


@pytest.mark.timeout(60)
def test_users_of_uncommitted_partitions_are_rebuilt_after_a_rebalance(engine) -> None:
    """A batch applied to the state but not yet committed is delivered again after a
    rebalance, even to this very instance: its users must be rebuilt, not counted twice."""
    events = list(Simulator(12, NOW - timedelta(days=3), 3, seed=5).events())
    state = UserState(FeatureStore(), engine)
    # Partitions by the id's number: str hashes change from run to run (PYTHONHASHSEED).
    state.apply([Received(e, partition=int(e.user_id[1:]) % 3, timestamp_ms=0) for e in events])
    predictor = Predictor(None, None, engine, state, None, None, None, "predictions",
                          max_records=10, max_wait_ms=5, max_event_ahead_s=60.0,
                          stopping=threading.Event())
    predictor.on_assigned({0, 1, 2})
    users_of = {p: {u for u, q in state.partition_of.items() if q == p} for p in range(3)}
    assert all(users_of.values()), "every partition needs users for the check to mean much"

    predictor.uncommitted = {1}  # partition 1's last batch is applied, not committed
    predictor.on_revoked({0, 1, 2})
    predictor.on_assigned({0, 1, 2})  # the same partitions come back

    assert set(state.partition_of) == users_of[0] | users_of[2]
    assert not users_of[1] & set(state.store.user_ids())
    assert predictor.uncommitted == set() and predictor.replayed == set()


@pytest.mark.timeout(60)
def test_a_partition_that_went_elsewhere_leaves_the_lag_gauge(engine) -> None:
    predictor = Predictor(None, None, engine, UserState(FeatureStore(), engine), None, None,
                          None, "predictions", max_records=10, max_wait_ms=5,
                          max_event_ahead_s=60.0, stopping=threading.Event())
    predictor.on_assigned({0, 1, 2})
    for partition in (0, 1, 2):
        CONSUMER_LAG.labels(str(partition)).set(5)
    predictor.on_revoked({0, 1, 2})
    predictor.on_assigned({0, 2})
    reported = {s.labels["partition"] for m in CONSUMER_LAG.collect() for s in m.samples}
    assert reported == {"0", "2"}


@pytest.mark.timeout(120)
def test_records_handed_back_on_a_partition_kept_are_read_again(topics: Settings,
                                                                 engine) -> None:
    """kafka-python keeps the position of a partition that stays in the assignment, which is
    past the records handed back uncommitted: the predictor must go back for them."""
    settings = topics
    events = list(Simulator(20, NOW - timedelta(days=2), 2, seed=6).events())[:60]
    send_events(settings, events)
    consumer = make_consumer(settings.bootstrap_servers, settings.predictor_group)
    predictor = Predictor(consumer, None, engine, UserState(FeatureStore(), engine), None, None,
                          None, "predictions", max_records=1000, max_wait_ms=5,
                          max_event_ahead_s=60.0, stopping=threading.Event())
    consumer.subscribe([settings.topic_activity], listener=predictor.listener())
    try:
        assert wait_until(lambda: predictor.in_hand.extend(
            r for batch in consumer.poll(timeout_ms=500).values() for r in batch)
            or len(predictor.in_hand) == len(events), 60)
        first = {(r.partition, r.offset) for r in predictor.in_hand}
        kept = consumer.assignment()
        predictor.on_revoked({tp.partition for tp in kept})  # as a rebalance that keeps them
        predictor.on_assigned({tp.partition for tp in kept})
        again: list[ConsumerRecord] = []
        assert wait_until(lambda: again.extend(
            r for batch in consumer.poll(timeout_ms=500).values() for r in batch)
            or len(again) >= len(events), 30), f"{len(again)} of {len(events)} read again"
        assert {(r.partition, r.offset) for r in again} == first
    finally:
        consumer.close(autocommit=False)
