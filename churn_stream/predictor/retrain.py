"""Training runs of the predictor: the first one at start, the others in the background.

Training never blocks the consume loop: a retrain runs on a thread of its own (scikit-learn,
XGBoost and TensorFlow do their heavy work outside the GIL) while the loop keeps polling. A
candidate replaces the serving model only if it is not worse on recent labelled data: its
ROC-AUC on its own time-based holdout (the latest labelled examples) against the serving
model's on that same holdout, within ``promotion_tolerance``; and no model whose own holdout
ROC-AUC is below ``min_roc_auc`` is ever served, the first one included (a first run that
trains while a backfill is still arriving sees users silent who are not: it scored 0.49).
The swap is one reference assignment, atomic for every reader. A run that fails, however it
fails (an exception, a ``MemoryError``), is logged, counted and recorded, and the serving
model keeps serving.

The first run may read a smaller sample of users than the others (``first_run_users``), so
that the predictor serves sooner after a start; a full-size run, reason ``warm-up``, then
follows at once in the background and replaces that model like any retrain.
"""

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa

from churn_stream.errors import NotEnoughData, TrainingStopped
from churn_stream.models import ChurnModel
from churn_stream.predictor import runs
from churn_stream.predictor.metrics import (
    MODEL_INFO,
    MODEL_VERSION,
    PREDICTION_LATENCY,
    PROMOTIONS,
    RETRAIN_FAILURES,
    RETRAIN_SECONDS,
    RETRAINS,
)

log = logging.getLogger(__name__)
WARM_UP = "warm-up"
"""The reason of the full-size run that follows a smaller first run."""
Train = Callable[..., ChurnModel]
"""``training.train``'s shape: ``(engine, version, *, failure_injection=..., max_users=...,
stopping=...) -> ChurnModel``; ``max_users`` is passed only to a smaller first run,
``stopping`` only by a retrainer given the service's stop flag."""
Judge = Callable[[ChurnModel, ChurnModel], tuple[float, float]]
"""``(candidate, current) -> (candidate ROC-AUC, current ROC-AUC)`` on recent labelled data."""


class _Timed:
    """One of a model's parts whose ``predict`` calls are timed into the latency histogram."""

    def __init__(self, part: Any, name: str) -> None:
        self._part = part
        self._histogram = PREDICTION_LATENCY.labels(name)

    def predict(self, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._part.predict(*args)
        finally:
            self._histogram.observe(time.perf_counter() - started)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._part, name)


def timed(model: ChurnModel) -> ChurnModel:
    """``model`` with each part's scoring call observed in ``model_prediction_latency_seconds``.

    The blend's own code path stays the model's; only the parts are wrapped.
    """
    return replace(model, forest=_Timed(model.forest, "rf"), boosted=_Timed(model.boosted, "xgb"),
                   sequence=_Timed(model.sequence, "seq"))


class ModelHolder:
    """The serving model; readers take ``current`` once per batch and use that reference."""

    def __init__(self) -> None:
        self.current: ChurnModel | None = None
        self.listeners: list[Callable[[ChurnModel], None]] = []
        """Called with each promoted model, on the promoting thread (the HTTP API process's
        feeder queues it)."""

    def promote(self, model: ChurnModel) -> None:
        """Serve ``model`` from now on (one reference assignment: atomic for readers)."""
        self.current = timed(model)
        for listener in self.listeners:
            listener(model)
        MODEL_VERSION.set(runs.version_number(model.version))
        MODEL_INFO.info({"version": model.version, "trained_at": model.trained_at.isoformat(),
                         "rows": str(model.rows)})


@dataclass(frozen=True)
class RunOutcome:
    """How one training run ended."""

    version: str
    reason: str
    promoted: bool
    error: str | None
    waiting: bool = False
    """The run found too little labelled history (and may be tried again)."""
    sampled: bool = False
    """It was too little in a sample of the stored users: all of them might be enough."""


class Retrainer:
    """Starts training runs, records them in ``model_runs`` and promotes the good ones."""

    def __init__(self, engine: sa.Engine, instance: str, holder: ModelHolder, train: Train,
                 judge: Judge, promotion_tolerance: float = 0.01,
                 failure_injection: str | None = None, min_roc_auc: float = 0.6,
                 first_run_users: int | None = None,
                 stopping: threading.Event | None = None) -> None:
        self.engine = engine
        self.min_roc_auc = min_roc_auc
        self.instance = instance
        self.holder = holder
        self.train = train
        self.judge = judge
        self.promotion_tolerance = promotion_tolerance
        self.failure_injection = failure_injection
        self.first_run_users = first_run_users
        """Users the first run reads when it is to be smaller than a full run; None: full."""
        self.stopping = stopping
        """The service's stop flag, passed to ``train`` (if set) so that a run can end early."""
        self.outcomes: list[RunOutcome] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pending: str | None = None
        self.last_started_s: float | None = None
        """When the latest run started (``time.monotonic``); drift's cooldown runs from it."""

    def train_initial(self, stopping: threading.Event, retry_s: float) -> ChurnModel | None:
        """Train the first model, waiting while there is not enough labelled history.

        The waiting attempts share one ``model_runs`` row, whose error says what is missing.
        The first attempt reads a sample of ``first_run_users`` (if set and more users are
        stored); a model learnt from it is followed at once by a full-size run in the
        background (reason ``warm-up``); a sample with too little history is a recorded run
        of its own, and an attempt on all users follows at once. Returns None only if a stop
        was asked for first.
        """
        opened: tuple[int, str] | None = None
        max_users = self.first_run_users
        while not stopping.is_set():
            opened = opened or self._open("start")
            if opened is not None:
                outcome = self._attempt(*opened, "start", record_no_data=False,
                                        max_users=max_users)
                if outcome.promoted:
                    self._follow_small_run(max_users)
                    return self.holder.current
                if stopping.is_set():
                    break
                if outcome.sampled or not outcome.waiting:
                    opened = None  # that run is recorded; the next is a new run
                if max_users is not None:
                    # A sample can hold too few churners, or score below the floor, where
                    # all users would not: from now on the start run reads them all, at once.
                    log.info("no model from a sample of %d users (%s); training on as many "
                             "users as any run now", max_users, outcome.error)
                    max_users = None
                    continue
                log.info("no model yet, %s; trying again in %.0f s", outcome.error, retry_s)
            stopping.wait(retry_s)
        return None

    def _follow_small_run(self, max_users: int | None) -> None:
        """Start the full-size run if the serving model learnt from the smaller sample."""
        model = self.holder.current
        if max_users is None or model is None or not model.details.get("sampled"):
            return  # no smaller sample was read: the first model is already full size
        log.info("model %s learnt from a sample of %s users; a full-size run (reason %s) "
                 "starts now in the background", model.version, model.details.get("users"),
                 WARM_UP)
        self.request(WARM_UP)

    @property
    def running(self) -> bool:
        """Whether a background run is in progress."""
        return self._thread is not None and self._thread.is_alive()

    def request(self, reason: str) -> bool:
        """Start a background run now, or as soon as the one in progress ends.

        Returns whether it started now. Requests made during a run collapse into one.
        """
        with self._lock:
            if self.running:
                log.info("retrain (%s) asked for during a run; it will follow", reason)
                self._pending = reason
                return False
            self._thread = threading.Thread(
                target=self._background, args=(reason,), name=f"retrain-{reason}", daemon=True
            )
            self._thread.start()
            return True

    def _background(self, reason: str) -> None:
        while reason:
            self.run(reason)
            with self._lock:
                reason, self._pending = self._pending or "", None

    def wait(self, timeout_s: float | None = None) -> None:
        """Wait for the background run (if any) to end."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def run(self, reason: str) -> RunOutcome:
        """One training run, recorded from start to end; never raises for a failed run."""
        opened = self._open(reason)
        if opened is None:
            return RunOutcome("", reason, False, "the run could not be recorded")
        return self._attempt(*opened, reason, record_no_data=True)

    def _open(self, reason: str) -> tuple[int, str] | None:
        RETRAINS.labels(reason).inc()
        try:
            return runs.start_run(self.engine, self.instance, reason)
        except sa.exc.SQLAlchemyError as exc:
            RETRAIN_FAILURES.labels(reason).inc()
            log.error("could not record a training run (%s); not training", exc)
            return None

    def _attempt(self, run_id: int, version: str, reason: str, record_no_data: bool,
                 max_users: int | None = None) -> RunOutcome:
        self.last_started_s = started = time.monotonic()
        log.info("training run %s started (reason %s%s)", version, reason,
                 f", at most {max_users} users" if max_users else "")
        rows, metrics, promoted, error, waiting, sampled = 0, {}, False, None, False, False
        try:
            candidate = self._train(version, reason, max_users)
            rows, metrics = candidate.rows, self._metrics(candidate)
            promoted, error = self._consider(candidate, reason, metrics)
        except NotEnoughData as exc:
            error, waiting, sampled = f"waiting for labelled history: {exc}", True, exc.sampled
        except TrainingStopped as exc:
            error = str(exc)
            log.info("%s", exc)
        except (Exception, MemoryError) as exc:  # a failed run must never stop the service
            error = f"{type(exc).__name__}: {exc}"
            RETRAIN_FAILURES.labels(reason).inc()
            log.error("training run %s failed; the serving model stays", version, exc_info=True)
        seconds = time.monotonic() - started
        if waiting and not (record_no_data or sampled):
            self._note_waiting(run_id, error)
        else:
            RETRAIN_SECONDS.observe(seconds)
            self._record(run_id, seconds, rows, metrics, promoted, error)
        outcome = RunOutcome(version, reason, promoted, error, waiting, sampled)
        self.outcomes.append(outcome)
        return outcome

    def _train(self, version: str, reason: str, max_users: int | None) -> ChurnModel:
        # The injected failure hits retrains only, so that a test starts with a model.
        injection = self.failure_injection if reason != "start" else None
        extra: dict[str, Any] = {"max_users": max_users} if max_users else {}
        if self.stopping is not None:
            extra["stopping"] = self.stopping
        return self.train(self.engine, version, failure_injection=injection, **extra)

    def _metrics(self, candidate: ChurnModel) -> dict[str, Any]:
        return {"models": candidate.metrics, "weights": candidate.weights,
                "details": candidate.details}

    def _consider(self, candidate: ChurnModel, reason: str,
                  metrics: dict[str, Any]) -> tuple[bool, str | None]:
        """Promote ``candidate`` unless it is no better than chance or worse than the serving
        model; returns whether it was promoted and, for a refused first model, why."""
        own_auc = candidate.metrics.get("blend", {}).get("roc_auc", float("nan"))
        if math.isfinite(own_auc) and own_auc < self.min_roc_auc:
            why = (f"holdout ROC-AUC {own_auc:.4f} is below {self.min_roc_auc:.2f}: "
                   f"model {candidate.version} is not served")
            log.warning("%s", why)
            return False, why
        current = self.holder.current
        if current is not None:
            candidate_auc, current_auc = self.judge(candidate, current)
            metrics["promotion"] = {"candidate_roc_auc": candidate_auc,
                                    "current_roc_auc": current_auc,
                                    "current_version": current.version,
                                    "tolerance": self.promotion_tolerance}
            if candidate_auc < current_auc - self.promotion_tolerance:
                log.info("model %s not promoted: holdout ROC-AUC %.4f, %s has %.4f there",
                         candidate.version, candidate_auc, current.version, current_auc)
                return False, None
        self.holder.promote(candidate)
        PROMOTIONS.labels(reason).inc()
        log.info("model %s promoted (%d rows); serving it now", candidate.version, candidate.rows)
        return True, None

    def _note_waiting(self, run_id: int, error: str | None) -> None:
        try:
            runs.note_waiting(self.engine, run_id, error or "")
        except sa.exc.SQLAlchemyError:
            log.warning("could not update training run %d", run_id, exc_info=True)

    def _record(self, run_id: int, seconds: float, rows: int, metrics: dict[str, Any],
                promoted: bool, error: str | None) -> None:
        try:
            runs.finish_run(self.engine, run_id, seconds, rows, metrics, promoted, error)
        except sa.exc.SQLAlchemyError:
            log.error("could not record the end of training run %d", run_id, exc_info=True)
