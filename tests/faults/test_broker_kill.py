"""The broker killed (SIGKILL) and restarted while 10,000 events are in flight.

The events are sent at a steady rate, so that at the kill some are still to be sent, some
are in the producer's buffer unacknowledged, some are on the broker unread and some are
being written by the consumer. The consumer must reconnect by itself and every event must
be stored exactly once.
"""

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

EVENTS = 10_000
RATE_PER_S = 1_000.0
DOWN_S = 5.0
"""How long the broker stays dead before it is started again (its restart takes ~10 s more)."""


@pytest.mark.faults
@pytest.mark.timeout(300)
def test_broker_killed_and_restarted_with_10000_events_in_flight(
    own_kafka: ApacheKafka, own_topics: Settings, engine: sa.Engine, services, report
) -> None:
    settings = own_topics
    events = simulated_events(EVENTS, users=300, seed=71)
    consumer = services("consumer.py", settings, BATCH_MAX_RECORDS="500")
    assert consumer.wait_for("consumer started", 60), consumer.tail()
    sender = Sender(settings, events, rate_per_s=RATE_PER_S).start()

    assert wait_until(lambda: stored_count(engine) >= 1_500, 60), consumer.tail()
    own_kafka.stop(kill=True)
    acked_at_kill, stored_at_kill = sender.sent, stored_count(engine)
    time.sleep(DOWN_S)
    own_kafka.start()

    assert sender.join(180), "the producer did not get every event acknowledged"
    assert wait_for_rows(engine, EVENTS, 180), consumer.tail()
    assert wait_until(lambda: sum(committed_offsets(settings, settings.consumer_group).values())
                      >= EVENTS + sender.resent, 60)
    assert consumer.alive, "the consumer died instead of reconnecting:\n" + consumer.tail()
    assert consumer.stop() == 0, consumer.tail()

    figures = Figures.count("broker killed", [str(e.event_id) for e in events],
                            stored_event_ids(engine))
    report(figures, acked_at_kill=acked_at_kill, stored_at_kill=stored_at_kill,
           resent=sender.resent)
    assert 0 < stored_at_kill < EVENTS and acked_at_kill < EVENTS, "the kill should land mid-flow"
    assert (figures.stored, figures.duplicated, figures.lost) == (EVENTS, 0, 0)
    assert stored_count(engine) == EVENTS
