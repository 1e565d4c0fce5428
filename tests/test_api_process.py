"""The predictor's HTTP API in a process of its own: real child processes, real HTTP, SQLite."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from churn_stream import storage
from churn_stream.features import FeatureStore
from churn_stream.predictor.api_process import METRICS_TIMEOUT_S, ApiProcess, Watch
from churn_stream.predictor.batching import Received
from churn_stream.predictor.retrain import ModelHolder
from churn_stream.predictor.serving import Serving
from churn_stream.predictor.state import UserState
from tests.brokers import free_port
from tests.simulated import simulated_events, trained_model
from tests.test_training_process import ROOT, _ran

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    db = storage.make_engine(f"sqlite:///{tmp_path / 'api.db'}")
    storage.create_schema(db)
    yield db
    db.dispose()


@pytest.fixture
def state(engine: sa.Engine) -> UserState:
    """The simulated users' state as a predictor that has consumed their events holds it."""
    events = simulated_events()
    store = FeatureStore()
    store.update(list(events))
    state = UserState(store, engine)
    state.clock = max(e.ts for e in events)
    return state


@pytest.fixture
def holder() -> ModelHolder:
    holder = ModelHolder()
    holder.promote(trained_model()[0])
    return holder


def started(engine: sa.Engine, holder: ModelHolder, state: UserState,
            retraining=lambda: False, watch: Watch | None = None) -> ApiProcess:
    api = ApiProcess("127.0.0.1", free_port(), "test", engine.url.render_as_string(False),
                     holder, state, retraining, watch or Watch())
    api.start()
    return api


@pytest.fixture
def api(engine: sa.Engine, holder: ModelHolder, state: UserState) -> Iterator[ApiProcess]:
    api = started(engine, holder, state)
    yield api
    api.stop()


def get(api: ApiProcess, path: str, until: int = 200, timeout_s: float = 30) -> httpx.Response:
    """GET ``path``, again until it answers ``until`` (a model or a process on its way)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            response = httpx.get(api.address + path, timeout=10)
            if response.status_code == until or time.monotonic() > deadline:
                return response
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def test_a_held_user_is_scored_exactly_as_in_the_service_and_new_events_count_at_once(
    api: ApiProcess, holder: ModelHolder, state: UserState
) -> None:
    local = Serving("test", holder, state, lambda: False)
    user_id = state.store.user_ids()[7]
    served = get(api, f"/predict/{user_id}")
    assert served.status_code == 200, served.text
    assert served.json() == local.predict_held(user_id).model_dump(mode="json")

    last = max((e for e in simulated_events() if e.user_id == user_id), key=lambda e: e.ts)
    later = last.model_copy(update={"ts": state.clock + timedelta(days=3)})
    state.apply([Received(later, partition=0, timestamp_ms=0)])
    after = get(api, f"/predict/{user_id}").json()
    assert after["as_of"] != served.json()["as_of"]
    assert after == local.predict_held(user_id).model_dump(mode="json")


def test_a_user_held_nowhere_is_read_from_the_database_by_the_api_process(
    api: ApiProcess, holder: ModelHolder, state: UserState, engine: sa.Engine
) -> None:
    user_id = state.store.user_ids()[3]
    stored = [e for e in simulated_events() if e.user_id == user_id]
    storage.write_events(engine, stored, state.clock)
    state.store.forget([user_id])
    served = get(api, f"/predict/{user_id}")
    assert served.status_code == 200, served.text
    local = Serving("test", holder, state, lambda: False).predict_now(user_id)
    assert served.json() == local.model_dump(mode="json")
    assert get(api, "/predict/nobody", until=404).status_code == 404


def test_health_metrics_and_each_promotion_reach_the_api_process(
    engine: sa.Engine, holder: ModelHolder, state: UserState
) -> None:
    retraining = [False]
    api = started(engine, holder, state, lambda: retraining[0])
    try:
        health = get(api, "/health").json()
        assert health["tracked_users"] == state.tracked() > 0
        assert health["model_version"] == "sim-1" and health["retraining"] is False
        retraining[0] = True  # the flag follows within STATUS_INTERVAL_S
        deadline = time.monotonic() + 10
        while get(api, "/health").json()["retraining"] is not True:
            assert time.monotonic() < deadline, "/health never said a retrain runs"
            time.sleep(0.05)
        get(api, f"/predict/{state.store.user_ids()[0]}")
        metrics = get(api, "/metrics").text
        assert "predictor_tracked_users" in metrics  # the service's registry
        assert "predictor_api_predict_seconds_count 1.0" in metrics  # the API process's own
        holder.promote(replace(holder.current, version="sim-2"))
        deadline = time.monotonic() + 30
        while get(api, "/model").json()["version"] != "sim-2":
            assert time.monotonic() < deadline, "the promoted model never reached the API"
            time.sleep(0.1)
    finally:
        api.stop()


def test_before_the_first_model_the_api_answers_503(engine: sa.Engine,
                                                    state: UserState) -> None:
    api = started(engine, ModelHolder(), state)
    try:
        assert get(api, "/health", until=503).json()["status"] == "training"
        assert get(api, "/predict/u000001", until=503).status_code == 503
    finally:
        api.stop()


def test_a_killed_api_process_is_replaced_and_serves_the_model_again(
    api: ApiProcess, state: UserState
) -> None:
    first = api.child.process.pid
    assert get(api, "/health").status_code == 200
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while api.child.process.pid == first:
        assert time.monotonic() < deadline, "no new API process"
        time.sleep(0.1)
    user_id = state.store.user_ids()[0]
    assert get(api, f"/predict/{user_id}", timeout_s=60).status_code == 200


def test_a_hung_api_process_is_killed_and_replaced(engine: sa.Engine, holder: ModelHolder,
                                                  state: UserState) -> None:
    api = started(engine, holder, state, watch=Watch(interval_s=0.5, timeout_s=0.5, failures=3))
    try:
        hung = api.child.process
        assert get(api, "/health").status_code == 200
        os.kill(hung.pid, signal.SIGSTOP)  # alive, holding its port, answering nothing
        deadline = time.monotonic() + 60
        while api.child.process is hung:
            assert time.monotonic() < deadline, "the hung API process was never replaced"
            time.sleep(0.1)
        assert hung.exitcode == -signal.SIGKILL
        user_id = state.store.user_ids()[0]
        assert get(api, f"/predict/{user_id}", timeout_s=60).status_code == 200
    finally:
        api.stop()


class _Stalled:
    """A collector of the service's registry that blocks until released: a stalled service."""

    def __init__(self) -> None:
        self.released = threading.Event()

    def describe(self):  # so that registering it does not collect (and block) at once
        return []

    def collect(self):
        self.released.wait(60)
        return []


def test_a_stalled_service_fails_the_scrape_and_nothing_else(api: ApiProcess,
                                                             state: UserState) -> None:
    user_id = state.store.user_ids()[0]
    assert get(api, "/metrics").status_code == 200
    stalled = _Stalled()
    REGISTRY.register(stalled)
    try:
        with ThreadPoolExecutor(1) as pool:
            scrape = pool.submit(httpx.get, api.address + "/metrics", timeout=30)
            time.sleep(0.5)  # the scrape waits on the service now
            started_at = time.monotonic()
            assert get(api, f"/predict/{user_id}").status_code == 200
            assert get(api, "/health").json()["model_version"] == "sim-1"
            assert time.monotonic() - started_at < METRICS_TIMEOUT_S / 2
            failed = scrape.result()
        assert failed.status_code == 503 and "did not answer metrics" in failed.text
    finally:
        stalled.released.set()
        REGISTRY.unregister(stalled)
    # The late answer to the failed scrape is told apart from the next one's.
    assert "predictor_api_predict_seconds" in get(api, "/metrics").text


def test_stop_ends_the_api_process_and_frees_the_port(api: ApiProcess) -> None:
    process = api.child.process
    assert get(api, "/health").status_code == 200
    api.stop()
    assert not process.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(api.address + "/health", timeout=5)


def test_a_port_in_use_is_an_error_naming_the_address(engine: sa.Engine, holder: ModelHolder,
                                                      state: UserState) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        api = ApiProcess("127.0.0.1", port, "test", engine.url.render_as_string(False),
                         holder, state, lambda: False)
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}"):
            api.start()


def test_the_api_process_ends_with_a_killed_service(tmp_path: Path, engine: sa.Engine) -> None:
    script = tmp_path / "service.py"
    script.write_text(
        "import sys, time\n"
        "from churn_stream import storage\n"
        "from churn_stream.features import FeatureStore\n"
        "from churn_stream.predictor.api_process import ApiProcess\n"
        "from churn_stream.predictor.retrain import ModelHolder\n"
        "from churn_stream.predictor.state import UserState\n"
        "if __name__ == '__main__':\n"
        "    engine = storage.make_engine(sys.argv[1])\n"
        "    api = ApiProcess('127.0.0.1', 0, 'orphan', sys.argv[1], ModelHolder(),\n"
        "                     UserState(FeatureStore(), engine), lambda: False)\n"
        "    api.start()\n"
        "    print(api.child.process.pid, flush=True)\n"
        "    time.sleep(300)\n")
    service = subprocess.Popen([sys.executable, str(script), engine.url.render_as_string(False)],
                               cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        child = service.stdout.readline().strip()
        assert child and _ran(child)
        service.kill()
        service.wait(10)
        deadline = time.monotonic() + 10
        while _ran(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _ran(child), "the API process outlived its service"
    finally:
        service.kill()
