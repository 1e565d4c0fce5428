"""A predictor killed with SIGKILL mid-batch and restarted, while the other one lives on.

As in the consumer's scenario the broker is paused first, so that the victim is caught
between writing a micro-batch's predictions and committing its offsets, then killed
together with the broker, which starts again. The surviving predictor and the consumer must
reconnect by themselves (the predictor's share of the broker-kill scenario); the victim is
started again and trains anew. No event may be lost or stored twice, and every user with
events must end with a prediction that answers their last event. Predictions are published
at least once: the figures say how many were written again after the replay.
"""

import signal
import time

import pytest

from tests.brokers import ApacheKafka
from tests.conftest import wait_until
from tests.faults.conftest import Figures, committed_offsets, stored_event_ids
from tests.faults.predictor_stack import (
    PredictorStack,
    owned_partitions,
    repeated,
    unanswered,
    wait_answered,
)

EVENTS = 1_500
PAUSE_S = 3.0
VICTIM, SURVIVOR = "a", "b"


@pytest.mark.faults
@pytest.mark.timeout(600)
def test_predictor_killed_mid_batch_loses_nothing_and_the_other_reconnects(
    predictor_stack, own_kafka: ApacheKafka, report
) -> None:
    stack: PredictorStack = predictor_stack
    stack.ensure(VICTIM, SURVIVOR)
    survivor_pid = stack.predictors[SURVIVOR].process.pid
    before = len(stack.predictions())
    events = stack.take(EVENTS)
    sender = stack.send(events)  # a backlog: the predictors have records fetched when paused
    assert wait_until(lambda: len(stack.predictions()) >= before + 100, 120)

    own_kafka.process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(PAUSE_S)
        victim_partitions = owned_partitions(stack.predictors[VICTIM].output())
        stack.predictors[VICTIM].kill()
        at_kill = stack.predictions({e.user_id for e in events})
    finally:
        own_kafka.stop(kill=True)
        own_kafka.start()
    committed = committed_offsets(stack.settings, stack.settings.predictor_group)
    stack.start_predictor(VICTIM)

    assert wait_answered(stack, events, 420), stack.predictors[SURVIVOR].tail()
    stack.wait_serving(VICTIM)
    predictions = stack.predictions({e.user_id for e in events})
    figures = Figures.count("predictor killed", [str(e.event_id) for e in events],
                            stored_event_ids(stack.engine))
    replayed = predicted_not_committed(at_kill, events, sender.acked, committed,
                                       victim_partitions)
    report(figures, users=len({e.user_id for e in events}),
           users_unanswered=len(unanswered(events, predictions)),
           predictions_at_kill=len(at_kill), predicted_not_committed=replayed,
           repeated_same_version=repeated(predictions),
           repeated_same_event=repeated(predictions, by_version=False))
    assert replayed > 0, "the kill should land between a batch's write and its commit"
    assert (figures.stored, figures.duplicated, figures.lost) == (EVENTS, 0, 0)
    assert unanswered(events, predictions) == {}
    survivor = stack.predictors[SURVIVOR]
    assert survivor.alive and survivor.process.pid == survivor_pid, survivor.tail()
    assert stack.consumer.alive, stack.consumer.tail()


def predicted_not_committed(at_kill, events, acked, committed, partitions) -> int:
    """Predictions stored at the kill for events of the victim's partitions past the commit:
    the victim died between its write and its commit, and those events are replayed."""
    from churn_stream import storage

    offset_of = {(e.user_id, storage.to_db_time(e.ts)): acked[str(e.event_id)] for e in events}
    return sum(1 for row in at_kill
               if (where := offset_of.get((row.user_id, row.event_ts))) is not None
               and where[0] in partitions and where[1] >= committed.get(where[0], 0))
