"""The predictor's HTTP API in a process of its own, so that ``/predict`` never waits on the GIL
of the process that consumes the stream.

In one process, the HTTP thread shared the GIL with the consume loop and kafka-python's two
network threads: each socket read, each call into XGBoost and each numpy step that lets the
GIL go had to win it back from a busy thread, and under 2,000 events/s a ``/predict`` that
took 3.3 ms idle took 11.8 ms at the median and 24.6 at p99 (make bench). Asking the
service's process for a user's state per request was no better: the answer waited on the
same GIL (a p99 of 19 ms for that round trip alone).

So the service starts a child process (``spawn``: nothing of the service's threads or Kafka
clients is inherited) that serves ``/health``, ``/model``, ``/predict/{user_id}`` and
``/metrics`` on the predictor's port, and that needs nothing from the service per request:

- the per-user state is the service's own arrays, in shared memory, read under a sequence
  lock (``features.shared``); the index of users and the stream's clock come along;
- the serving model is a copy, sent as plain data (``ChurnModel.parts``) after each
  promotion and rebuilt without TensorFlow (one row is scored in numpy);
- a user the service does not hold is read from the database by the child.

Whether a retrain runs (``/health``) is a shared flag the service keeps up to date. Only
``/metrics`` (the service's registry, followed by the child's own ``predictor_api_*``) is
asked of the service, over a pipe, on a worker thread and with a deadline, so a stalled
service fails the scrape and nothing else. The child ends when the service closes its pipes
or dies. If the child dies, the service logs it and starts another, which gets the state and
the serving model at once; if it stops answering ``/health``, the service kills it, and the
same happens.
"""

import http.client
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
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
from churn_stream.features.shared import Mirror, SharedArrays
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
STATUS_INTERVAL_S = 0.25
"""How often the service copies whether a retrain runs into the flag the API process reads."""
METRICS_TIMEOUT_S = 5.0
"""How long ``/metrics`` waits for the service's registry before it answers 503."""


@dataclass(frozen=True)
class Watch:
    """How the service checks that its API process answers: a ``/health`` every
    ``interval_s``, each given ``timeout_s``; ``failures`` in a row and the process is killed
    (and another started)."""

    interval_s: float = 5.0
    timeout_s: float = 5.0
    failures: int = 3


class ApiProcess:
    """Starts, feeds and supervises the HTTP API process of one predictor."""

    def __init__(self, host: str, port: int, instance: str, database_url: str,
                 holder: ModelHolder, state: UserState,
                 retraining: Callable[[], bool], watch: Watch = Watch()) -> None:
        self.host, self.port, self.instance = host, port, instance
        self.address = f"http://{host}:{port}"
        self.database_url = database_url
        self.holder, self.state, self.retraining = holder, state, retraining
        self.watch = watch
        self.retraining_flag = _SPAWN.RawValue("b", 0)
        """Whether a retrain runs, shared with every API process this one starts."""
        self.child: _Child | None = None
        self._models: queue.Queue[ChurnModel | None] = queue.Queue()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        holder.listeners.append(self._models.put)

    def start(self) -> None:
        """Start the API process and wait until it listens; RuntimeError if it cannot."""
        if self.state.shared is None:
            self.state.share(SharedArrays())
        self.child = self._spawn()
        if self.holder.current is not None:
            self._models.put(self.holder.current)
        for target, name in ((self._answer_requests, "api-requests"),
                             (self._send_models, "api-models"),
                             (self._publish_status, "api-status"),
                             (self._watch, "api-watch")):
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
        state, child_state = _SPAWN.Pipe()  # a socket pair: it carries memory descriptors
        # The URL goes over the pipe's pickled arguments, never on a command line: a password
        # in it stays out of the process list.
        process = _SPAWN.Process(
            target=_serve, name="predictor-api", daemon=True,
            args=(child_requests, receiving, child_state, self.retraining_flag, self.host,
                  self.port, self.instance, self.database_url, logging.getLogger().level))
        process.start()
        # The child holds the only other ends: its exit ends the pipes, and the service's
        # exit ends the child's loop.
        for end in (child_requests, receiving, child_state):
            end.close()
        child = _Child(process, requests, sending, state)
        child.wait_listening(self.address)
        self.state.store.connect_reader(state)
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
            number, kind = request
            try:
                reply: tuple[int, str, Any] = (number, "ok", self._answer(kind))
            except Exception as exc:  # the child turns it into a 500 naming it
                log.error("the API process's request %s failed", kind, exc_info=True)
                reply = (number, "error", f"{type(exc).__name__}: {exc}")
            try:
                child.requests.send(reply)
            except OSError:
                continue  # it died meanwhile: the next recv finds out

    def _answer(self, kind: str) -> Any:
        if kind == "metrics":
            return generate_latest()
        raise ValueError(f"unknown request {kind!r}")

    def _publish_status(self) -> None:
        while not self._stopping.wait(STATUS_INTERVAL_S):
            self.retraining_flag.value = bool(self.retraining())

    def _watch(self) -> None:
        """Kill an API process that stops answering ``/health``; the request thread then
        sees it end and starts another."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        failures, watched = 0, self.child
        while not self._stopping.wait(self.watch.interval_s):
            child = self.child
            if child is not watched:
                failures, watched = 0, child
            if not child.process.is_alive():
                continue  # being replaced
            try:
                connection = http.client.HTTPConnection(host, self.port,
                                                        timeout=self.watch.timeout_s)
                try:
                    connection.request("GET", "/health")
                    connection.getresponse().read()
                finally:
                    connection.close()
                failures = 0
            except OSError as exc:
                failures += 1
                log.warning("the HTTP API process %d did not answer /health (%d of %d): %s",
                            child.process.pid, failures, self.watch.failures, exc)
                if failures >= self.watch.failures and not self._stopping.is_set():
                    log.error("the HTTP API process %d does not answer; killing it",
                              child.process.pid)
                    child.process.kill()

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
    """One API process and the service's ends of its three pipes."""

    def __init__(self, process: Any, requests: Connection, models: Connection,
                 state: Connection) -> None:
        self.process, self.requests, self.models, self.state = process, requests, models, state

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
        self.state.close()  # a change sent after this finds it closed and stops sending


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
    """The API process's end of the request pipe: one request and its reply at a time, each
    numbered, so that the reply to a request that timed out is told apart and dropped."""

    def __init__(self, requests: Connection) -> None:
        self.requests = requests
        self.lock = threading.Lock()
        self.numbers = itertools.count()

    def ask(self, kind: str, timeout_s: float) -> Any:
        """The service's answer; TimeoutError if it takes longer than ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        if not self.lock.acquire(timeout=timeout_s):
            raise TimeoutError(f"the predictor did not answer {kind} within {timeout_s:.0f} s")
        try:
            number = next(self.numbers)
            self.requests.send((number, kind))
            while True:
                if not self.requests.poll(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(
                        f"the predictor did not answer {kind} within {timeout_s:.0f} s")
                answered, status, value = self.requests.recv()
                if answered == number:
                    break
        finally:
            self.lock.release()
        if status != "ok":
            raise RuntimeError(f"the predictor could not answer {kind}: {value}")
        return value


class RemoteState:
    """The service's per-user state as the API process sees it (``serving.StateView``): its
    arrays in shared memory, read without asking the service."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.mirror: Mirror | None = None
        self.ready = threading.Event()
        """Set once the service has given its state (just after the process listens)."""

    def held(self, user_id: str, space: FeatureSpace) -> Features | None:
        return self._held(user_id, space)[1]

    def lookup(self, user_id: str, space: FeatureSpace) -> Features | None:
        as_of, found = self._held(user_id, space)
        return found or stored_features(self.engine, user_id, as_of, space)

    def tracked(self) -> int:
        return len(self._mirror().slots)

    def _held(self, user_id: str, space: FeatureSpace) -> tuple[datetime, Features | None]:
        mirror = self._mirror()
        copied = mirror.copy_of(user_id)
        # The clock is read after the copy: the service moves it before it applies events,
        # so it is never earlier than the events copied.
        as_of = mirror.clock() or datetime.now(UTC)
        if copied is None:
            return as_of, None
        store = FeatureStore.of_rows(user_id, *copied)
        return as_of, Features(*store.matrix([user_id], as_of, space), as_of)

    def _mirror(self) -> Mirror:
        if not self.ready.wait(START_TIMEOUT_S) or self.mirror is None:
            raise RuntimeError("the predictor has not given its state to the HTTP API")
        return self.mirror


def _serve(requests: Connection, models: Connection, state: Connection, retraining: Any,
           host: str, port: int, instance: str, url: str, log_level: int) -> None:
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
    remote = RemoteState(engine)
    serving = Serving(instance, holder, remote, retraining=lambda: bool(retraining.value),
                      latency=PREDICT_SECONDS)
    app = create_app(serving, metrics=lambda: (link.ask("metrics", METRICS_TIMEOUT_S)
                                               + generate_latest(REGISTRY)))
    server = HttpServer(app, host, port)
    try:
        server.start()
    except RuntimeError as exc:
        requests.send(("failed", str(exc)))
        os._exit(1)
    requests.send(("listening", server.address))
    remote.mirror = Mirror(state)  # the service connects it once it hears "listening"
    remote.ready.set()
    threading.Thread(target=remote.mirror.follow, name="state-changes", daemon=True).start()
    while True:
        try:
            parts = models.recv()
        except EOFError:
            break
        holder.current = ChurnModel.from_parts(parts, network=False)
        log.info("the HTTP API serves model %s", holder.current.version)
    server.stop()
    engine.dispose()
