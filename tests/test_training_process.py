"""Training in a process of its own: the model that comes back, and every way a run ends."""

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from churn_stream import storage
from churn_stream.errors import NotEnoughData, TrainingFailed, TrainingStopped
from churn_stream.models import MODEL_NAMES, classification_metrics
from churn_stream.predictor.training_process import train_in_process
from tests.conftest import wait_until
from tests.simulated import simulated_database

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[1]


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
    assert model.details["process_peak_mb"] > 100  # the child's own peak, TensorFlow included


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
    return [p.pid for p in multiprocessing.active_children() if p.name == "training-child-4"]


def test_a_stop_ends_the_child_at_once(sim_engine) -> None:
    stopping = threading.Event()

    def stop_at_features(stage: str, _done: float) -> None:
        if stage == "features":
            stopping.set()

    started = time.monotonic()
    with pytest.raises(TrainingStopped, match="stopping"):
        train_in_process(sim_engine, "child-5", progress=stop_at_features, stopping=stopping)
    assert time.monotonic() - started < 60
    assert not [p for p in multiprocessing.active_children() if p.name == "training-child-5"]


def test_a_child_whose_service_was_killed_ends_itself(tmp_path) -> None:
    script = tmp_path / "service.py"
    script.write_text(
        "import sys\n"
        "from churn_stream import storage\n"
        "from churn_stream.predictor.training_process import train_in_process\n"
        "if __name__ == '__main__':\n"
        "    train_in_process(storage.make_engine(sys.argv[1]), 'orphan')\n")
    service = subprocess.Popen([sys.executable, str(script), simulated_database()], cwd=ROOT)
    try:
        assert wait_until(lambda: _training_child(service.pid) is not None, 30)
        child = _training_child(service.pid)
        time.sleep(3)  # well into the run, which sends nothing until its model is ready
        service.kill()
        service.wait(10)
        assert _ran(child)
        deadline = time.monotonic() + 3
        while _ran(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _ran(child), "the orphaned training process trains on"
    finally:
        service.kill()


def _training_child(parent: int) -> str | None:
    """The spawned training process of ``parent`` (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    found = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return found[0] if found else None


def _ran(pid: str) -> bool:
    """Whether process ``pid`` is still running (a zombie has ended)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] not in {"Z", "X"}
