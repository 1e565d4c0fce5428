"""The consumer killed with SIGKILL mid-batch, at the worst moment, and restarted.

The worst moment is after a batch's transaction committed and before its offsets did: the
restarted consumer reads those records again. To land the kill there every time, the
broker is paused (SIGSTOP): the consumer writes the records it had already fetched, sends
its offset commit and waits for the answer, and is killed while it waits. A paused broker
would still read that commit from its socket once resumed, so it is killed too (a host
lost with both, as it were) and started again. Nothing may be lost and no event stored
twice; the figures say how many stored events were delivered again.
"""

import signal
import time

import pytest
import sqlalchemy as sa

from churn_stream.settings import Settings
from tests.brokers import ApacheKafka
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

EVENTS = 6_000
BACKLOG = 4_500
"""Sent before the consumer starts; the rest after the broker is back."""
PAUSE_S = 3.0
"""How long the broker stays paused before the consumer is killed: ample to write a batch."""


def written_not_committed(stored: list[str], acked: dict[str, tuple[int, int]],
                          committed: dict[int, int]) -> int:
    """Stored events at or past their partition's committed offset: to be delivered again."""
    return sum(1 for event_id in stored if event_id in acked
               and acked[event_id][1] >= committed.get(acked[event_id][0], 0))


@pytest.mark.faults
@pytest.mark.timeout(240)
def test_consumer_killed_between_its_write_and_its_commit_loses_and_doubles_nothing(
    own_kafka: ApacheKafka, own_topics: Settings, engine: sa.Engine, services, report
) -> None:
    settings = own_topics
    events = simulated_events(EVENTS, users=200, seed=72)
    # A backlog on the broker before the consumer starts: it has records fetched and in hand
    # when the broker pauses, however fast it reads. (Sending while it read let a quiet
    # machine's consumer catch up and sit in an empty fetch when the pause came.)
    backlog = Sender(settings, events[:BACKLOG]).start()
    assert backlog.join(60), "the producer did not get the backlog acknowledged"
    first = services("consumer.py", settings, BATCH_MAX_RECORDS="300")
    assert first.wait_for("consumer started", 60), first.tail()
    assert wait_until(lambda: stored_count(engine) >= 1_500, 60, every_s=0.02), first.tail()

    own_kafka.process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(PAUSE_S)
        first.kill()
    finally:
        own_kafka.stop(kill=True)  # SIGKILL reaches a stopped process too
        own_kafka.start()
    stored_at_kill = stored_event_ids(engine)
    rest = Sender(settings, events[BACKLOG:]).start()
    assert rest.join(120), "the producer did not get every event acknowledged"
    acked = backlog.acked | rest.acked
    replayed = written_not_committed(stored_at_kill, acked,
                                     committed_offsets(settings, settings.consumer_group))

    # The new member waits for the killed one's session (15 s from the broker's restart) to
    # expire before it is given the partitions: allow for it.
    second = services("consumer.py", settings)
    assert wait_for_rows(engine, EVENTS, 150), second.tail()
    assert second.stop() == 0, second.tail()

    figures = Figures.count("consumer killed", [str(e.event_id) for e in events],
                            stored_event_ids(engine))
    report(figures, stored_at_kill=len(stored_at_kill), written_not_committed=replayed)
    assert 0 < len(stored_at_kill) < EVENTS, "the kill should land mid-stream"
    assert replayed > 0, "the kill should land between a batch's write and its commit"
    assert (figures.stored, figures.duplicated, figures.lost) == (EVENTS, 0, 0)
    assert stored_count(engine) == EVENTS
