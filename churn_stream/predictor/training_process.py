"""Training runs in a process of their own, so that they never stall the consume loop.

A run in a thread of the predictor shares the GIL with the loop that scores events: reading
a million rows from the database, labelling and featurising them hold it for seconds at a
time, and the p99 of event-to-prediction latency during a retrain was 25 times the p99
before it. Here each run starts a fresh interpreter (``spawn``: no state is inherited from
the service, its threads or its Kafka clients), at a lower CPU priority, which reads the
database, trains the three models and the blend and builds the drift reference exactly as
an in-process run would. The fitted model comes back over a pipe as plain data (node arrays,
XGBoost's buffer, network weights; see ``ChurnModel.parts``) and is rebuilt here; nothing is
written to disk.

The run keeps the in-process contract of ``Retrainer``'s ``train``: it raises
``NotEnoughData`` while labelled history is short and ``TrainingFailed`` however else it
fails, a training process that dies (killed, out of memory) included. A stop of the service
ends the child at once instead of waiting out the run; a child whose service has died ends
itself, and Ctrl-C in a terminal (sent to the whole process group) is the service's to handle.
"""

import logging
import multiprocessing
import os
import resource
import signal
import threading
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

import sqlalchemy as sa

from churn_stream import training
from churn_stream.errors import NotEnoughData, TrainingFailed, TrainingStopped
from churn_stream.logs import configure_logging
from churn_stream.models import ChurnModel

log = logging.getLogger(__name__)
NICENESS = 10
"""How much lower the training process's CPU priority is than the service's."""
WATCH_S = 0.5
"""How often the service looks for a stop, and the child for its parent."""

_SPAWN = multiprocessing.get_context("spawn")


def train_in_process(engine: sa.Engine, version: str, *,
                     failure_injection: training.FailureInjection = None,
                     max_users: int = training.MAX_USERS,
                     progress: training.Progress | None = None,
                     stopping: threading.Event | None = None) -> ChurnModel:
    """``reference.train_with_reference`` run in a child process; same arguments and errors.

    ``failure_injection`` may only be one of the named injections here (a callable does not
    cross into another interpreter). ``progress`` is called in this process, as each stage
    of the child's run starts. Once ``stopping`` is set the child is ended and the run
    fails with ``TrainingFailed``.
    """
    if callable(failure_injection):
        raise TypeError("a training process takes a named failure injection, not a callable")
    # The child gets its arguments over a pipe, never on a command line: the password in the
    # URL stays out of the process list.
    url = engine.url.render_as_string(hide_password=False)
    receiving, sending = _SPAWN.Pipe(duplex=False)
    child = _SPAWN.Process(target=_run, name=f"training-{version}", daemon=True,
                           args=(sending, url, version, failure_injection, max_users,
                                 progress is not None, logging.getLogger().level, os.getpid()))
    child.start()
    sending.close()  # the child holds the only sending end: its exit ends the pipe
    try:
        return _receive(receiving, child, version, progress, stopping or threading.Event())
    finally:
        receiving.close()
        child.join(timeout=30)
        if child.is_alive():
            child.kill()


def _receive(receiving: Connection, child: Any, version: str,
             progress: training.Progress | None, stopping: threading.Event) -> ChurnModel:
    while True:
        while not receiving.poll(WATCH_S):
            if stopping.is_set():
                child.kill()
                raise TrainingStopped(f"training run {version} ended: the service is stopping")
        try:
            kind, *payload = receiving.recv()
        except EOFError:
            child.join(timeout=30)
            raise TrainingFailed(f"training run {version}: its process ended without a model "
                                 f"(exit code {child.exitcode})") from None
        if kind == "stage" and progress is not None:
            progress(*payload)
        elif kind == "model":
            return ChurnModel.from_parts(payload[0])
        elif kind == "waiting":
            raise NotEnoughData(*payload)
        elif kind == "failed":
            raise TrainingFailed(payload[0])


def _run(sending: Connection, url: str, version: str, injection: str | None,
         max_users: int, report_stages: bool, log_level: int, parent: int) -> None:
    """The child: one training run, its outcome sent as one message.

    ``parent`` is the service's pid as it started the child: read here, after the imports,
    it could already be the pid of whoever adopted an orphan.
    """
    from churn_stream import storage
    from churn_stream.predictor.reference import train_with_reference

    configure_logging(logging.getLevelName(log_level))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(NICENESS)
    threading.Thread(target=_end_with_parent, args=(parent,), name="parent-watch",
                     daemon=True).start()
    engine = storage.make_engine(url)

    def stage(name: str, done: float) -> None:
        sending.send(("stage", name, done))

    try:
        model = train_with_reference(engine, version, failure_injection=injection,
                                     max_users=max_users,
                                     progress=stage if report_stages else None)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        model = replace(model, details={**model.details, "process_peak_mb": round(peak_mb)})
        message: tuple[Any, ...] = ("model", model.parts())
    except NotEnoughData as exc:
        message = ("waiting", str(exc), exc.sampled)
    except TrainingFailed as exc:
        log.warning("training run %s failed", version, exc_info=True)
        message = ("failed", str(exc))
    except (Exception, MemoryError) as exc:  # the reference stage is outside _failures
        log.warning("training run %s failed", version, exc_info=True)
        message = ("failed", f"training run {version} failed: {type(exc).__name__}: {exc}")
    finally:
        engine.dispose()
    sending.send(message)
    sending.close()


def _end_with_parent(parent: int) -> None:
    """End this process once its parent is gone (it was killed: nobody waits for the model)."""
    while os.getppid() == parent:
        threading.Event().wait(WATCH_S)
    log.warning("the service that started this training run is gone; ending the run")
    os._exit(1)
