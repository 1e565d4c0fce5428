"""The predictor's HTTP API in a process of its own, so that ``/predict`` never waits on the GIL
of the process that consumes the stream.

In one process, the HTTP thread shared the GIL with the consume loop and kafka-python's two
network threads: each socket read, each call into XGBoost and each numpy step that lets the
GIL go had to win it back from a busy thread, and under 2,000 events/s a ``/predict`` that
took 3.3 ms idle took 11.8 ms at the median and 24.6 at p99 (make bench).

Here the service starts a child process (``spawn``: nothing of the service's threads or
Kafka clients is inherited) that serves ``/health``, ``/model``, ``/predict/{user_id}`` and
``/metrics`` on the predictor's port. It holds its own copy of the serving model, sent as
plain data (``ChurnModel.parts``) after each promotion and rebuilt without TensorFlow: one
row at a time is scored in numpy. For a held user it asks the service for a one-user copy of
that user's state and the stream's clock (one small message each way, ``UserState.copy_of``)
and computes the features itself, so the service does microseconds of work per request
instead of the whole score. A user the service does not hold is read from the database by
the child. ``/metrics`` is the service's registry, asked for over the same pipe, followed by
the child's own (``predictor_api_*``).

The child ends when the service closes its pipes or dies (the pipe ends); if the child dies,
the service logs it and starts another, which gets the serving model at once.
"""

import logging
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable
from datetime import datetime
from multiprocessing.connection import Connection
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_when_event_set,
    wait_exponential,
)

from churn_stream.features import FeatureSpace, FeatureStore
from churn_stream.logs import configure_logging
from churn_stream.models import ChurnModel
from churn_stream.predictor.retrain import ModelHolder
from churn_stream.predictor.state import Features, UserState, stored_features

log = logging.getLogger(__name__)
START_TIMEOUT_S = 60.0
"""How long the service waits for a new API process to listen (imports take seconds)."""
RESTART_DELAY_S = 1.0
"""The first wait before another API process is started; it doubles per failure, to 30 s."""
_SPAWN = multiprocessing.get_context("spawn")
SERVED_ONLY = ("holdout", "reference", "reference_scores")
"""Parts of a model that only training and drift use: not sent to the API process."""


class ApiProcess:
    """Starts, feeds and supervises the HTTP API process of one predictor."""

    def __init__(self, host: str, port: int, instance: str, database_url: str,
                 holder: ModelHolder, state: UserState,
                 retraining: Callable[[], bool]) -> None:
        self.host, self.port, self.instance = host, port, instance
        self.address = f"http://{host}:{port}"
        self.database_url = database_url
        self.holder, self.state, self.retraining = holder, state, retraining
        self.child: _Child | None = None
        self._models: queue.Queue[ChurnModel | None] = queue.Queue()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        holder.listeners.append(self._models.put)

    def start(self) -> None:
        """Start the API process and wait until it listens; RuntimeError if it cannot."""
        self.child = self._spawn()
        if self.holder.current is not None:
            self._models.put(self.holder.current)
        for target, name in ((self._answer_requests, "api-requests"),
                             (self._send_models, "api-models")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("HTTP API on %s in process %d (/health /model /predict/{user_id} /metrics)",
                 self.address, self.child.process.pid)

    def stop(self) -> None:
        """End the API process and the threads that feed it."""
        self._stopping.set()
        self._models.put(None)
        if self.child is not None:
            self.child.end()
        for thread in self._threads:
            thread.join(5.0)

    def _spawn(self) -> "_Child":
        requests, child_requests = _SPAWN.Pipe()
        receiving, sending = _SPAWN.Pipe(duplex=False)
        # The URL goes over the pipe's pickled arguments, never on a command line: a password
        # in it stays out of the process list.
        process = _SPAWN.Process(
            target=_serve, name="predictor-api", daemon=True,
            args=(child_requests, receiving, self.host, self.port, self.instance,
                  self.database_url, logging.getLogger().level))
        process.start()
        # The child holds the only other ends: its exit ends both pipes, and the service's
        # exit ends the child's loop.
        child_requests.close()
        receiving.close()
        child = _Child(process, requests, sending)
        child.wait_listening(self.address)
        return child

    def _answer_requests(self) -> None:
        """Answer the API process's requests; start another process if it dies."""
        while not self._stopping.is_set():
            child = self.child
            try:
                request = child.requests.recv()
            except (EOFError, OSError):
                if self._stopping.is_set():
                    return
                self._restart(child)
                continue
            try:
                reply: tuple[str, Any] = ("ok", self._answer(*request))
            except Exception as exc:  # the child turns it into a 500 naming it
                log.error("the API process's request %s failed", request[0], exc_info=True)
                reply = ("error", f"{type(exc).__name__}: {exc}")
            try:
                child.requests.send(reply)
            except OSError:
                continue  # it died meanwhile: the next recv finds out

    def _answer(self, kind: str, *args: Any) -> Any:
        if kind == "user":
            return self.state.copy_of(args[0])
        if kind == "tracked":
            return self.state.tracked()
        if kind == "retraining":
            return self.retraining()
        if kind == "metrics":
            return generate_latest()
        raise ValueError(f"unknown request {kind!r}")

    def _restart(self, dead: "_Child") -> None:
        dead.process.join(5.0)
        log.error("the HTTP API process %d ended (exit code %s); starting another",
                  dead.process.pid, dead.process.exitcode)
        retrying = Retrying(
            retry=retry_if_exception_type(RuntimeError),
            wait=wait_exponential(multiplier=RESTART_DELAY_S, max=30),
            stop=stop_when_event_set(self._stopping),
            sleep=self._stopping.wait,
            before_sleep=lambda state: log.error(
                "the HTTP API process could not start again (attempt %d): %s",
                state.attempt_number, state.outcome.exception() if state.outcome else ""),
        )
        try:
            self.child = retrying(self._spawn)
        except RetryError:
            return  # the service is stopping
        if self.holder.current is not None:
            self._models.put(self.holder.current)
        log.info("HTTP API on %s in process %d", self.address, self.child.process.pid)

    def _send_models(self) -> None:
        """Send each promoted model to the API process, the latest only if several wait."""
        while True:
            model = self._models.get()
            while model is not None and not self._models.empty():
                model = self._models.get()
            if model is None:
                return
            parts = {k: v for k, v in model.parts().items() if k not in SERVED_ONLY}
            try:
                self.child.models.send(parts)
            except OSError:
                # The process died; its successor is sent the serving model when it starts.
                log.warning("model %s not sent: the HTTP API process is gone", model.version)


class _Child:
    """One API process and the service's ends of its two pipes."""

    def __init__(self, process: Any, requests: Connection, models: Connection) -> None:
        self.process, self.requests, self.models = process, requests, models

    def wait_listening(self, address: str) -> None:
        if not self.requests.poll(START_TIMEOUT_S):
            self.end()
            raise RuntimeError(f"the HTTP API process did not listen on {address} within "
                               f"{START_TIMEOUT_S:.0f} s")
        try:
            kind, message = self.requests.recv()
        except EOFError:
            self.process.join(5.0)
            raise RuntimeError(f"the HTTP API did not start on {address}: its process ended "
                               f"(exit code {self.process.exitcode})") from None
        if kind != "listening":
            self.end()
            raise RuntimeError(message)

    def end(self) -> None:
        self.models.close()  # the child's loop sees the end of the pipe and stops serving
        self.process.join(5.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)
        self.requests.close()


# -- the API process --------------------------------------------------------------------------

REGISTRY = CollectorRegistry(auto_describe=True)
PREDICT_SECONDS = Histogram(
    "predictor_api_predict_seconds",
    "Seconds of one /predict score and explanation in the predictor's HTTP API process "
    "(the state copy from the service and the features included)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
    registry=REGISTRY,
)


class Link:
    """The API process's end of the request pipe: one request and its reply at a time."""

    def __init__(self, requests: Connection) -> None:
        self.requests = requests
        self.lock = threading.Lock()

    def ask(self, kind: str, *args: Any) -> Any:
        with self.lock:
            self.requests.send((kind, *args))
            status, value = self.requests.recv()
        if status != "ok":
            raise RuntimeError(f"the predictor could not answer {kind}: {value}")
        return value


class RemoteState:
    """The service's per-user state as the API process sees it (``serving.StateView``)."""

    def __init__(self, link: Link, engine: sa.Engine) -> None:
        self.link, self.engine = link, engine

    def held(self, user_id: str, space: FeatureSpace) -> Features | None:
        as_of, copy = self._copy(user_id)
        return None if copy is None else _features(copy, user_id, as_of, space)

    def lookup(self, user_id: str, space: FeatureSpace) -> Features | None:
        as_of, copy = self._copy(user_id)
        if copy is not None:
            return _features(copy, user_id, as_of, space)
        return stored_features(self.engine, user_id, as_of, space)

    def tracked(self) -> int:
        return self.link.ask("tracked")

    def _copy(self, user_id: str) -> tuple[datetime, FeatureStore | None]:
        return self.link.ask("user", user_id)


def _features(copy: FeatureStore, user_id: str, as_of: datetime,
              space: FeatureSpace) -> Features:
    return Features(*copy.matrix([user_id], as_of, space), as_of)


def _serve(requests: Connection, models: Connection, host: str, port: int, instance: str,
           url: str, log_level: int) -> None:
    """The API process: serve until the service's end of ``models`` closes."""
    from churn_stream import storage
    from churn_stream.predictor.http import HttpServer, create_app
    from churn_stream.predictor.serving import Serving

    configure_logging(logging.getLevelName(log_level))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the service's to handle
    ProcessCollector(namespace="predictor_api", registry=REGISTRY)
    link = Link(requests)
    engine = storage.make_engine(url)
    holder = ModelHolder()
    serving = Serving(instance, holder, RemoteState(link, engine),
                      retraining=lambda: link.ask("retraining"), latency=PREDICT_SECONDS)
    app = create_app(serving, metrics=lambda: link.ask("metrics") + generate_latest(REGISTRY))
    server = HttpServer(app, host, port)
    try:
        server.start()
    except RuntimeError as exc:
        requests.send(("failed", str(exc)))
        os._exit(1)
    requests.send(("listening", server.address))
    while True:
        try:
            parts = models.recv()
        except EOFError:
            break
        holder.current = ChurnModel.from_parts(parts, network=False)
        log.info("the HTTP API serves model %s", holder.current.version)
    server.stop()
    engine.dispose()
