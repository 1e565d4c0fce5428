"""End to end: a behaviour shift in the simulator makes the predictor detect drift and retrain
in the background while predictions go on; then the new model serves."""

import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from kafka import KafkaConsumer, TopicPartition

from churn_stream import storage
from churn_stream.events import Event
from churn_stream.settings import Settings
from churn_stream.simulator import Simulator
from tests.brokers import free_port
from tests.conftest import start_service, wait_until
from tests.test_predictor import model_runs, predicted_users, send_events, stop

START = datetime(2024, 1, 1, tzinfo=UTC)
USERS, DAYS, SEED = 400, 48, 11
TRAIN_DAYS, DRIFT_DAY, CHUNK_DAYS = 41, 44, 0.5
"""History until day 41 is stored before start; behaviour shifts on day 44; the live days are
sent half a day at a time, each once the one before has been scored."""
MAX_CHUNKS_TO_DETECT = 6
"""Drift must be confirmed within three simulated days of the shift (seen here: two)."""
DRIFT_SETTINGS = {
    "DRIFT_WINDOW_ROWS": "1000", "DRIFT_MIN_ROWS": "1000", "DRIFT_PERSISTENCE": "2",
    "DRIFT_MIN_FEATURES": "2", "DRIFT_COOLDOWN_S": "30", "PREDICTOR_BATCH_MAX_RECORDS": "20",
}
COOLDOWN_S = float(DRIFT_SETTINGS["DRIFT_COOLDOWN_S"])
"""Windows of a thousand rows (smaller ones read sampling noise in sparse features as drift);
micro-batches of a few events, as a live stream brings them (a backlog read in large batches
reads each user later than live traffic does)."""


def runs_for(engine: sa.Engine, reason: str, finished: bool = False) -> list[dict]:
    return [r for r in model_runs(engine)
            if r["reason"] == reason and (r["seconds"] > 0 or not finished)]


def scored(engine: sa.Engine) -> list[sa.Row]:
    table = storage.predictions
    with engine.connect() as conn:
        return conn.execute(sa.select(table.c.user_id, table.c.scored_at,
                                      table.c.model_version)).all()


def drained(settings: Settings) -> bool:
    """Whether the predictor group has committed everything on the activity topic."""
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers,
                             group_id=settings.predictor_group, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(settings.topic_activity, p)
                      for p in range(settings.topic_partitions)]
        ends = consumer.end_offsets(partitions)
        return all((consumer.committed(tp) or 0) >= ends[tp] for tp in partitions)
    finally:
        consumer.close()


def deliver(settings: Settings, engine: sa.Engine, events: list[Event]) -> None:
    """What the producer and the consumer do: send the events and store them."""
    storage.write_events(engine, events, datetime.now(UTC))
    send_events(settings, events)


def chunks(events: list[Event], start: datetime, end: datetime) -> list[list[Event]]:
    bounds = [start + timedelta(days=CHUNK_DAYS * i)
              for i in range(int((end - start) / timedelta(days=CHUNK_DAYS)) + 1)]
    spans = zip(bounds, bounds[1:], strict=False)
    return [[e for e in events if lo <= e.ts < hi] for lo, hi in spans]


@pytest.mark.slow
@pytest.mark.timeout(720)
def test_drift_is_detected_and_a_retrain_swaps_the_model_without_a_gap(
    topics: Settings, engine: sa.Engine
) -> None:
    settings = topics.model_copy(update={"predictor_port": free_port(),
                                         "predictor_batch_max_wait_ms": 20})
    at = {name: START + timedelta(days=d) for name, d in
          (("train", TRAIN_DAYS), ("drift", DRIFT_DAY), ("end", DAYS))}
    events = list(Simulator(USERS, START, DAYS, seed=SEED, drift_at=at["drift"]).events())
    storage.write_events(engine, [e for e in events if e.ts < at["train"]], datetime.now(UTC))
    before, after = chunks(events, at["train"], at["drift"]), chunks(events, at["drift"], at["end"])
    process = start_service("predictor.py", settings, **DRIFT_SETTINGS)
    output = ""
    try:
        assert wait_until(lambda: runs_for(engine, "start", finished=True), 240)
        (first,) = runs_for(engine, "start")
        # The drift cooldown counts from the last run's start, the start run's here: its
        # recorded length, taken from now, puts that start no earlier than it was.
        cooldown_ends_s = time.monotonic() - first["seconds"] + COOLDOWN_S
        assert first["promoted"]
        for chunk in before:
            deliver(settings, engine, chunk)
            assert wait_until(lambda: drained(settings), 60)
        assert not runs_for(engine, "drift"), "drift confirmed before the behaviour shifted"
        # A quick predictor gets through the days before the shift inside the cooldown.
        time.sleep(max(0.0, cooldown_ends_s - time.monotonic()))

        sent_after_shift = 0
        while not runs_for(engine, "drift") and sent_after_shift < MAX_CHUNKS_TO_DETECT:
            deliver(settings, engine, after[sent_after_shift])
            sent_after_shift += 1
            assert wait_until(lambda: drained(settings), 60)
        assert runs_for(engine, "drift"), f"no drift confirmed in {sent_after_shift} chunks"
        detected_after = sum(len(c) for c in after[:sent_after_shift])
        retrain_began = datetime.now(UTC).replace(tzinfo=None)

        during = after[sent_after_shift]
        deliver(settings, engine, during)
        assert wait_until(lambda: runs_for(engine, "drift", finished=True), 300)
        (drift_run,) = runs_for(engine, "drift", finished=True)
        assert drift_run["promoted"] and drift_run["error"] is None
        new_version = drift_run["model_version"]
        assert int(new_version[1:]) > int(first["model_version"][1:])

        last = [e for c in after[sent_after_shift + 1:] for e in c]
        deliver(settings, engine, last)
        assert wait_until(lambda: drained(settings), 120)
        everyone = {e.user_id for e in events if e.ts >= at["train"]}
        assert everyone <= set(predicted_users(engine))
    finally:
        output = stop(process)
        print(output[-30_000:])
    assert process.returncode == 0, output[-3000:]
    print(f"drift confirmed after {detected_after} events of the shifted behaviour "
          f"({sent_after_shift} chunks of half a day)")

    rows = scored(engine)
    during_users = {e.user_id for e in during}
    assert any(r.user_id in during_users and r.scored_at >= retrain_began
               and r.model_version == first["model_version"] for r in rows), \
        "no prediction from the old model while the retrain ran"
    last_users = {e.user_id for e in last}
    assert {r.user_id for r in rows if r.model_version == new_version} >= last_users
    with engine.connect() as conn:
        reports = conn.execute(sa.select(storage.drift_reports)).mappings().all()
    assert {r["statistic"] for r in reports} == {"psi", "ks", "score_psi"}
    drifted = {r["feature"] for r in reports if r["drifted"] and r["statistic"] == "psi"}
    assert any(f.startswith("session_end.duration_s") for f in drifted)
