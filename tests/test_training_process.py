"""Training in a process of its own: the model that comes back, and every way a run ends."""

import os
import signal
import threading

import numpy as np
import pytest

from churn_stream import storage
from churn_stream.errors import NotEnoughData, TrainingFailed
from churn_stream.models import MODEL_NAMES, classification_metrics
from churn_stream.predictor.training_process import train_in_process
from tests.simulated import simulated_database

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def sim_engine():
    engine = storage.make_engine(simulated_database())
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def child_run(sim_engine):
    """A model trained in a child process, with the stages it reported here."""
    stages: list[str] = []
    model = train_in_process(sim_engine, "child-1",
                             progress=lambda stage, _done: stages.append(stage))
    return model, stages


def test_the_model_from_the_child_scores_its_own_holdout_as_the_child_measured(
        child_run) -> None:
    model, _ = child_run
    X, S = model.holdout.features(model.space)
    scores = model.score(X, S)
    for name in (*MODEL_NAMES, "blend"):
        auc = classification_metrics(model.holdout.labels, getattr(scores, name))
        assert auc["roc_auc"] == pytest.approx(model.metrics[name]["roc_auc"], abs=1e-9), name
    assert model.metrics["blend"]["roc_auc"] > 0.8
    assert model.reference.shape[1] == len(model.space.feature_names)
    assert len(model.reference_scores) == len(model.reference) > 0


def test_the_child_reports_each_stage_here_in_order(child_run) -> None:
    _, stages = child_run
    assert stages[:3] == ["load", "label", "features"]
    assert stages.index("rf") < stages.index("seq") < stages.index("done")
    assert stages[-1] == "reference"


def test_the_child_trains_the_same_model_as_this_process_would(sim_engine,
                                                               child_run) -> None:
    from churn_stream.predictor.reference import train_with_reference

    model, _ = child_run
    here = train_with_reference(sim_engine, "here-1")
    X, S = here.holdout.features(here.space)
    np.testing.assert_allclose(model.score(X, S).xgb, here.score(X, S).xgb)
    np.testing.assert_allclose(model.score(X, S).rf, here.score(X, S).rf)


@pytest.mark.parametrize(("injection", "cause"),
                         [("raise", "RuntimeError"), ("memory", "MemoryError")])
def test_a_failure_in_the_child_is_training_failed_naming_its_cause(sim_engine, injection,
                                                                    cause) -> None:
    with pytest.raises(TrainingFailed, match=cause):
        train_in_process(sim_engine, "child-2", failure_injection=injection)


def test_too_little_history_in_the_child_is_not_enough_data(engine) -> None:
    storage.create_schema(engine)
    with pytest.raises(NotEnoughData, match="no activity"):
        train_in_process(engine, "child-3")


def test_a_child_killed_mid_run_is_training_failed_with_its_exit_code(sim_engine) -> None:
    killed = threading.Event()

    def kill_the_child(stage: str, _done: float) -> None:
        if stage == "features" and not killed.is_set():
            killed.set()
            for child in _training_children():
                os.kill(child, signal.SIGKILL)

    with pytest.raises(TrainingFailed, match="exit code -9"):
        train_in_process(sim_engine, "child-4", progress=kill_the_child)
    assert killed.is_set()


def _training_children() -> list[int]:
    import multiprocessing

    return [p.pid for p in multiprocessing.active_children() if p.name == "training-child-4"]
