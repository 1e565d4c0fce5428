"""The database unavailable for 20 seconds under a steady load.

A connection of the test holds SQLite's exclusive lock (``BEGIN EXCLUSIVE``), so every
write of the consumer fails with "database is locked" after its busy timeout. Events keep
arriving throughout. While the database is down nothing may be committed to Kafka; once
it is back the backlog must drain, every event stored once.
"""

import time

import pytest
import sqlalchemy as sa

from churn_stream.settings import Settings
from tests.conftest import wait_until
from tests.faults.conftest import (
    Figures,
    Sender,
    committed_offsets,
    simulated_events,
    stored_count,
    stored_event_ids,
    wait_for_rows,
)

EVENTS = 9_000
RATE_PER_S = 300.0
OUTAGE_S = 20.0
BUSY_TIMEOUT_S = 5.0
"""SQLite's busy timeout in ``storage.make_engine``: a write fails only after waiting it out."""


@pytest.mark.faults
@pytest.mark.timeout(180)
def test_database_down_for_20_s_under_load_then_the_backlog_drains(
    topics: Settings, engine: sa.Engine, services, report
) -> None:
    settings = topics
    events = simulated_events(EVENTS, users=250, seed=74)
    consumer = services("consumer.py", settings)
    assert consumer.wait_for("consumer started", 60), consumer.tail()
    sender = Sender(settings, events, rate_per_s=RATE_PER_S).start()
    assert wait_until(lambda: stored_count(engine) >= 1_000, 60), consumer.tail()

    blocker = sa.create_engine(settings.resolved_database_url()).connect()
    blocker.exec_driver_sql("BEGIN EXCLUSIVE")
    try:
        down_at = time.monotonic()
        # A batch written just before the lock may still commit its offsets; after the
        # first failed write (one busy timeout) nothing more may move.
        time.sleep(BUSY_TIMEOUT_S + 1)
        stored_early, committed_early = stored_count(engine), committed_offsets(
            settings, settings.consumer_group)
        time.sleep(OUTAGE_S - (time.monotonic() - down_at))
        stored_late, committed_late = stored_count(engine), committed_offsets(
            settings, settings.consumer_group)
    finally:
        blocker.exec_driver_sql("ROLLBACK")
        blocker.close()
    back_at = time.monotonic()
    backlog = sender.sent - stored_late

    assert sender.join(60)
    assert wait_for_rows(engine, EVENTS, 90), consumer.tail()
    drained_s = time.monotonic() - back_at
    assert wait_until(lambda: sum(committed_offsets(settings, settings.consumer_group).values())
                      == EVENTS, 30)
    assert consumer.alive and consumer.count("database write failed") >= 2
    assert consumer.stop() == 0, consumer.tail()

    figures = Figures.count("database down 20 s", [str(e.event_id) for e in events],
                            stored_event_ids(engine))
    report(figures, backlog_at_recovery=backlog, drained_after_s=round(drained_s, 1),
           failed_writes=consumer.count("database write failed"))
    assert (stored_early, committed_early) == (stored_late, committed_late), (
        "nothing may be stored or committed while the database is down")
    assert backlog > 2_000, "events should pile up during the outage"
    assert (figures.stored, figures.duplicated, figures.lost) == (EVENTS, 0, 0)
    assert stored_count(engine) == EVENTS
