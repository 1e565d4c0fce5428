"""A retrain that runs out of memory (predictor ``a``) or raises (predictor ``b``).

A retrain command reaches every predictor of the group; each one's retrain fails as injected,
is recorded as failed, and the model that served before keeps serving: the same version in
``/health`` and on every prediction of the traffic that follows. Also checked here, since a
trained predictor is at hand: the canary secrets in the predictors' environment never show
in ``/model``, ``/health`` or their logs.
"""

import socket

import pytest
import sqlalchemy as sa

from churn_stream import storage
from churn_stream.control import RetrainCommand, publish_command
from churn_stream.kafka_io import make_producer
from churn_stream.predictor.runs import UNFINISHED
from tests.conftest import wait_until
from tests.faults.conftest import Figures, stored_event_ids
from tests.faults.predictor_stack import (
    INJECTED,
    SECRET_KEY,
    SECRET_PASSWORD,
    PredictorStack,
    wait_answered,
)

EVENTS = 400
ERRORS = {"memory": "MemoryError", "raise": "RuntimeError"}


def runs_of(stack: PredictorStack, name: str, reason: str) -> list[dict]:
    """The finished training runs of predictor ``name`` for ``reason``."""
    instance = f"{socket.gethostname()}-{stack.predictors[name].process.pid}"
    table = storage.model_runs
    query = sa.select(table).where(table.c.instance == instance, table.c.reason == reason)
    with stack.engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(query).mappings()]
    return [r for r in rows if r["error"] != UNFINISHED]


@pytest.mark.faults
@pytest.mark.timeout(600)  # the first predictor scenario also waits for the stack to train
def test_a_failed_retrain_leaves_the_old_model_serving(predictor_stack, report) -> None:
    stack: PredictorStack = predictor_stack
    names = stack.serving()
    serving = {n: stack.get(n, "/health").json()["model_version"] for n in names}
    assert all(serving.values()), serving

    producer = make_producer(stack.settings.bootstrap_servers)
    publish_command(producer, stack.settings.topic_control, RetrainCommand(reason="feedback"))
    producer.close()
    assert wait_until(lambda: all(runs_of(stack, n, "feedback") for n in names), 120), [
        stack.predictors[n].tail() for n in names]
    failed = {n: runs_of(stack, n, "feedback")[-1] for n in names}

    events = stack.take(EVENTS)
    stack.send(events)
    assert wait_answered(stack, events, 120)
    versions = {r.model_version for r in stack.predictions({e.user_id for e in events})}
    health = {n: stack.get(n, "/health").json() for n in names}
    bodies = [stack.get(n, path).text for n in names for path in ("/health", "/model", "/metrics")]

    figures = Figures.count("retrain fails", [str(e.event_id) for e in events],
                            stored_event_ids(stack.engine))
    report(figures, predictors=len(names), failed_runs=len(failed),
           versions_before=sorted(serving.values()), versions_after=sorted(versions))
    for name, run in failed.items():
        assert not run["promoted"] and ERRORS[INJECTED[name]] in run["error"], run
        assert health[name]["status"] == "serving", health[name]
        assert health[name]["model_version"] == serving[name]
        assert stack.predictors[name].alive
        assert stack.predictors[name].count("training run") >= 2
    assert versions <= set(serving.values())
    assert (figures.stored, figures.duplicated, figures.lost) == (EVENTS, 0, 0)
    outputs = [stack.predictors[n].output() for n in names]
    assert not [text for text in bodies + outputs if SECRET_KEY in text or SECRET_PASSWORD in text]
