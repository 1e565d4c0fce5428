"""Wiring of the predictor service: clients, state, model, loop, HTTP API; start and stop."""

import gc
import logging
import os
import socket
import sys
import threading
import time

import sqlalchemy as sa
from kafka import KafkaConsumer

from churn_stream import storage, training
from churn_stream.drift import DriftPolicy, DriftWindow, Thresholds
from churn_stream.errors import ConfigurationError
from churn_stream.features import FeatureStore
from churn_stream.kafka_io import ensure_topics, make_consumer, make_producer, subscribe_when_known
from churn_stream.ports import check_can_listen, listeners
from churn_stream.predictor.api_process import ApiProcess
from churn_stream.predictor.commands import ControlListener
from churn_stream.predictor.drift_watch import DriftWatch
from churn_stream.predictor.retrain import ModelHolder, Retrainer
from churn_stream.predictor.service import Predictor
from churn_stream.predictor.state import UserState
from churn_stream.predictor.training_process import train_in_process
from churn_stream.settings import Settings

log = logging.getLogger("predictor")
# The consume loop holds the GIL in short steps; a shorter switch interval lets the other
# threads of this process (kafka-python's network threads, the feeds of the API and training
# processes) have their turn within milliseconds. Measured when the HTTP API still ran on a
# thread here, 0.2 ms against 1 ms (make bench, one run each): /predict p99 under load
# 22.1 -> 20.0 ms, event-to-prediction p99 82 -> 62 ms, throughput 15,293 -> 14,446 events/s
# (within run-to-run spread). Not measured again since the API moved out.
GIL_SWITCH_INTERVAL_S = 0.0002


def settle_heap() -> None:
    """Take every object alive now (the libraries, TensorFlow's graph, the first model) out of
    the cyclic collector's sight.

    A full collection walks every tracked object and pauses every thread meanwhile: with
    TensorFlow and a model loaded, about 0.35 s for 0.8 million objects on this box. Frozen
    objects are still freed by reference counting; only a cycle among them (the first model's,
    once replaced) stays until the process ends.
    """
    gc.collect()
    gc.freeze()


def instance_name() -> str:
    """This process among the predictors: host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def make_retrainer(settings: Settings, engine: sa.Engine, instance: str,
                   holder: ModelHolder, stopping: threading.Event | None = None) -> Retrainer:
    """The retrainer with the project's training (in a process of its own) and promotion
    judge; ``stopping`` ends a run in progress."""
    first_run_users = settings.predictor_first_run_users
    smaller = first_run_users if 0 < first_run_users < training.MAX_USERS else None
    return Retrainer(engine, instance, holder, train_in_process, training.compare_on_holdout,
                     promotion_tolerance=settings.promotion_tolerance,
                     min_roc_auc=settings.min_serving_roc_auc,
                     failure_injection=settings.retrain_failure_injection,
                     first_run_users=smaller, stopping=stopping)


def make_drift_watch(settings: Settings, engine: sa.Engine, instance: str,
                     retrainer: Retrainer) -> DriftWatch:
    """The drift check configured from the settings."""
    thresholds = Thresholds(psi=settings.drift_psi_threshold, ks=settings.drift_ks_threshold,
                            score_psi=settings.drift_score_psi_threshold)
    policy = DriftPolicy(min_features=settings.drift_min_features,
                         persistence=settings.drift_persistence,
                         min_rows=settings.drift_min_rows, cooldown_s=settings.drift_cooldown_s)
    window = DriftWindow(settings.drift_window_rows, settings.drift_window_s)
    return DriftWatch(engine, instance, window, policy, thresholds, retrainer.request)


def start_api(settings: Settings, instance: str, holder: ModelHolder, state: UserState,
              retrainer: Retrainer) -> ApiProcess:
    """The HTTP API, listening, in a process of its own fed by this one."""
    api = ApiProcess(settings.predictor_http_host, settings.predictor_port, instance,
                     settings.resolved_database_url(), holder, state,
                     retraining=lambda: retrainer.running)
    try:
        api.start()
    except RuntimeError as exc:
        # The port was checked at start; something took it since, or the server failed.
        raise ConfigurationError(f"{exc}: check PREDICTOR_HTTP_HOST and PREDICTOR_PORT") from None
    return api


def run(settings: Settings, stopping: threading.Event) -> None:
    """Run the predictor until ``stopping`` is set.

    ``ConfigurationError`` if its HTTP API cannot listen where the settings say.
    """
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    # First: a taken port or a bad host is reported at once, not after a wait for the broker.
    check_can_listen(listeners(settings)["predictor"])
    if not ensure_topics(settings, stopping=stopping):
        return
    instance = instance_name()
    engine = storage.make_engine(settings.resolved_database_url())
    storage.create_schema(engine)
    holder = ModelHolder()
    state = UserState(FeatureStore(), engine)
    retrainer = make_retrainer(settings, engine, instance, holder, stopping)
    http = start_api(settings, instance, holder, state, retrainer)
    control = ControlListener(
        KafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None,
                      enable_auto_commit=False),
        settings.topic_control, retrainer.request,
    )
    try:
        if retrainer.train_initial(stopping, settings.predictor_train_retry_s) is None:
            return
        settle_heap()
        consume(settings, engine, state, holder, retrainer, control, instance, stopping)
    finally:
        control.close()
        http.stop()
        engine.dispose()


def consume(settings: Settings, engine: sa.Engine, state: UserState, holder: ModelHolder,
            retrainer: Retrainer, control: ControlListener, instance: str,
            stopping: threading.Event) -> None:
    """The consume loop, with its clients closed however it ends."""
    producer = make_producer(settings.bootstrap_servers)
    consumer = make_consumer(settings.bootstrap_servers, settings.predictor_group,
                             max_poll_records=settings.predictor_batch_max_records)
    predictor = Predictor(
        consumer, producer, engine, state, holder, retrainer,
        make_drift_watch(settings, engine, instance, retrainer), settings.topic_predictions,
        max_records=settings.predictor_batch_max_records,
        max_wait_ms=settings.predictor_batch_max_wait_ms,
        commit_every_s=settings.predictor_commit_interval_ms / 1000,
        max_event_ahead_s=settings.max_event_ahead_s, stopping=stopping,
    )
    predictor.control_poll = control.poll
    subscribe_when_known(consumer, [settings.topic_activity], predictor.listener())
    log.info("predictor %s started: %s -> predictions, %s; model %s", instance,
             settings.topic_activity, settings.topic_predictions, holder.current.version)
    started = time.monotonic()
    try:
        predictor.run()
    finally:
        consumer.close(autocommit=False)
        producer.close()
        log.info("predictor stopped after %d predictions in %.0f s", predictor.predicted,
                 time.monotonic() - started)
