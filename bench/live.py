"""A live session: the predictor in this process (its HTTP API in a process of its own, as in
the service), events offered at a steady rate from a child process, optionally ``/predict``
requests from another and a retrain in the middle.

Latency is read back from ``churn-predictions``: each prediction carries ``scored_at`` and
``latency_ms`` (from the Kafka timestamp of the oldest event it answers to scoring), and the
record's own timestamp is when the predictor sent it, after the row was written to the
table. ``sent - (scored_at - latency_ms)`` is therefore event-to-persisted-prediction.
"""

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from bench import load, service
from bench.common import Context, read_topic
from churn_stream.predictor.main import start_api
from tests.brokers import free_port

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 900.0
AFTER_RETRAIN_S = 5.0
HTTP_USERS = 500
"""Distinct users asked for by ``/predict`` (a seeded sample of the tracked ones)."""


@dataclass
class Session:
    """What one live session measured; times are wall-clock seconds."""

    offered: dict[str, Any]
    scored_wall: np.ndarray
    """When each prediction was scored."""
    scored_ms: np.ndarray
    """Oldest event sent -> scores ready (the predictor's own ``latency_ms``)."""
    persisted_ms: np.ndarray
    """Oldest event sent -> prediction written to the table and handed to the producer."""
    http: list[tuple[float, float, float]] = field(default_factory=list)
    """(wall clock, seconds of a ``/predict``, seconds of the ``/model`` after it)"""
    retrain: tuple[float, float] | None = None
    retrain_outcome: Any = None

    def window(self, start_wall: float, end_wall: float) -> np.ndarray:
        """Persisted latencies (ms) of predictions scored within the window."""
        inside = (self.scored_wall >= start_wall) & (self.scored_wall <= end_wall)
        return self.persisted_ms[inside]

    def steady(self, warmup_s: float) -> np.ndarray:
        """Persisted latencies after the warm-up, up to the end of the offered load."""
        return self.window(self.offered["started_wall"] + warmup_s, self.offered["ended_wall"])

    def http_seconds(self, start_wall: float = 0.0, end_wall: float = float("inf"),
                     floor: bool = False) -> list[float]:
        """Seconds of each ``/predict`` in the window, or of each ``/model`` if ``floor``."""
        return [floor_s if floor else predict_s for wall, predict_s, floor_s in self.http
                if start_wall <= wall <= end_wall]


def session(ctx: Context, model: Any, *, rate: float, duration_s: float,
            http_requests: int = 0, retrain_after_s: float | None = None,
            prepare: Callable[[service.RunningPredictor], None] | None = None) -> Session:
    """Run the predictor under offered load; see the module docstring for what is measured.

    ``prepare`` sees the predictor before it starts (the retrain benchmark times the stages
    of training through it).
    """
    ctx.clear_predictions()
    settings = ctx.settings(predictor_port=free_port())
    running = service.predictor(settings, model, store=ctx.warm_store())
    if prepare is not None:
        prepare(running)
    http = start_api(settings, "bench", running.holder, running.state, running.retrainer)
    dataset = ctx.dataset
    offer, offer_pipe = load.spawn(
        load.offer, ctx.bootstrap_servers, settings.topic_activity, str(dataset.db_path),
        str(dataset.stream_path), dataset.users, dataset.days, rate, duration_s)
    client = None
    if http_requests:
        users = _sample_users(running, HTTP_USERS)
        client = load.spawn(load.query, http.address, users, http_requests,
                            max(0.0, duration_s * 0.8 / http_requests - 0.002))
    result: dict[str, Any] = {}
    conductor = threading.Thread(target=_conduct, name="conductor", daemon=True,
                                 args=(running, offer_pipe, client, retrain_after_s, result))
    conductor.start()
    try:
        running.run()
    finally:
        http.stop()
        offer.join(10)
        if client:
            client[0].join(10)
    conductor.join(10)
    if "error" in result:
        raise RuntimeError(result["error"])
    return _collect(ctx, settings.topic_predictions, result)


def _sample_users(running: service.RunningPredictor, count: int) -> list[str]:
    users = running.state.store.user_ids()
    rng = np.random.default_rng(0)
    return [users[i] for i in rng.choice(len(users), min(count, len(users)), replace=False)]


def _conduct(running: service.RunningPredictor, offer_pipe: Any, client: Any,
             retrain_after_s: float | None, result: dict[str, Any]) -> None:
    """Start the load once the predictor owns its partitions, retrain if asked, stop the
    predictor once everything offered is committed."""
    try:
        deadline = time.monotonic() + 60
        while not running.predictor.owned:
            if time.monotonic() > deadline:
                raise TimeoutError("the predictor got no partitions within 60 s")
            time.sleep(0.05)
        offer_pipe.send("go")
        if client:
            client[1].send("go")
        if retrain_after_s is not None:
            result["retrain"] = _retrain(running, retrain_after_s)
            offer_pipe.send("stop")
        result["offered"] = offer_pipe.recv()
        if client:
            result["http"] = client[1].recv()
        _drain(running, result["offered"]["sent"])
    except Exception as exc:  # the main thread must learn of it and stop
        log.error("the live session failed", exc_info=True)
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        running.stopping.set()


def _retrain(running: service.RunningPredictor, after_s: float) -> tuple[float, float, Any]:
    time.sleep(after_s)
    started = time.time()
    if not running.retrainer.request("schedule"):
        raise RuntimeError("a retrain was already running")
    running.retrainer.wait()
    ended = time.time()
    time.sleep(AFTER_RETRAIN_S)
    outcome = running.retrainer.outcomes[-1] if running.retrainer.outcomes else None
    return started, ended, outcome


def _drain(running: service.RunningPredictor, sent: int) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while running.consumer.committed < sent:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the predictor committed {running.consumer.committed} of "
                               f"{sent} offered events")
        time.sleep(0.1)


def _collect(ctx: Context, topic: str, result: dict[str, Any]) -> Session:
    records = read_topic(ctx.bootstrap_servers, topic)
    scored_wall, scored_ms, persisted_ms = [], [], []
    for record in records:
        row = json.loads(record.value)
        scored = datetime.fromisoformat(row["scored_at"]).timestamp() * 1000
        sent_ms = scored - row["latency_ms"]
        scored_wall.append(scored / 1000)
        scored_ms.append(row["latency_ms"])
        persisted_ms.append(record.timestamp - sent_ms)
    retrain = result.get("retrain")
    return Session(result["offered"], np.array(scored_wall), np.array(scored_ms),
                   np.array(persisted_ms), result.get("http", []),
                   retrain[:2] if retrain else None, retrain[2] if retrain else None)
