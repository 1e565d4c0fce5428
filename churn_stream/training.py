"""Training runs: labelled history from the database to a ``ChurnModel``, all in memory.

The split is by time and by user. Holdout examples are those of a random share of users at
the latest cutoffs; the models learn from the other users at cutoffs whose labels were
settled before the holdout begins, so no outcome seen in training lies in the holdout
period. Validation (early stopping, blend weights) is a share of the training users.
Nothing is written anywhere: no model files, no rows (the predictor records its runs).
"""

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from churn_stream.errors import NotEnoughData, TrainingFailed
from churn_stream.features import FeatureSpace, Snapshot, replay
from churn_stream.history import load_feedback, load_history, sample_users
from churn_stream.labels import LabelPolicy, describe, label_examples
from churn_stream.models import MODEL_NAMES, ChurnModel, choose_weights, classification_metrics
from churn_stream.splits import (
    FIT,
    HOLDOUT,
    UNUSED,
    VALIDATION,
    Split,
    cap,
    check_classes,
    split_roles,
    split_users,
)

__all__ = [
    "FIT", "HOLDOUT", "UNUSED", "VALIDATION", "Examples", "Holdout", "Run", "Split",
    "build_examples", "compare_on_holdout", "fit_examples", "load_feedback", "load_history",
    "sample_users", "split_roles", "split_users", "train", "train_from_history",
]

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
"""Called with the stage starting (or ``done``) and the share of the run finished so far."""
FailureInjection = str | Callable[[str], None] | None
"""Tests only: ``"raise"`` or ``"memory"`` fails the fit stage; a callable sees each stage."""

STAGES = {"load": 0.10, "label": 0.05, "features": 0.15, "rf": 0.15, "xgb": 0.10,
          "seq": 0.35, "evaluate": 0.10}
MAX_USERS = 5000
"""Users whose history one training run reads at most (a seeded sample beyond that)."""
MAX_EXAMPLES = 20_000
"""Fit examples at most (a seeded sample beyond that): bounds the sequence model's epochs."""
REFERENCE_ROWS = 5000


@dataclass
class Holdout:
    """The holdout examples, kept so that another model can be scored on exactly them."""

    labels: np.ndarray
    snapshots: list[Snapshot]

    def features(self, space: FeatureSpace) -> tuple[np.ndarray, np.ndarray]:
        """The holdout rows in the columns of ``space``."""
        n = len(self.labels)
        X = np.zeros((n, len(space.feature_names)), np.float32)
        S = np.zeros((n, space.sequence_days, len(space.sequence_channels)), np.float32)
        for snapshot in self.snapshots:
            X[snapshot.rows], S[snapshot.rows] = snapshot.matrix(space)
        return X, S


@dataclass
class Examples:
    """Labelled feature rows with their role in the split."""

    space: FeatureSpace
    queries: pd.DataFrame
    """``user_id``, ``cutoff``, ``churned``, ``role`` per row."""
    X: np.ndarray
    S: np.ndarray
    holdout: Holdout

    @property
    def y(self) -> np.ndarray:
        return self.queries["churned"].to_numpy(dtype=np.int8)

    def rows(self, role: int) -> np.ndarray:
        return np.flatnonzero(self.queries["role"].to_numpy() == role)


class Run:
    """Progress, stage timing and failure injection of one training run."""

    def __init__(self, version: str, progress: Progress | None,
                 failure_injection: FailureInjection) -> None:
        self.version, self.progress, self.injection = version, progress, failure_injection
        self.done = 0.0
        self.stage_name = "start"
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.stage_name = name
        if self.progress:
            self.progress(name, self.done)
        if callable(self.injection):
            self.injection(name)
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 3)
        self.done += STAGES.get(name, 0.0)
        log.debug("training run %s: stage %s took %.2f s", self.version, name, self.seconds[name])

    def inject(self) -> None:
        if self.injection == "raise":
            raise RuntimeError("injected training failure (retrain_failure_injection=raise)")
        if self.injection == "memory":
            raise MemoryError("injected out-of-memory (retrain_failure_injection=memory)")

    def finish(self) -> None:
        if self.progress:
            self.progress("done", 1.0)


def train(
    engine: sa.Engine, version: str, *, holdout_share: float = 0.2,
    progress: Progress | None = None, failure_injection: FailureInjection = None,
    policy: LabelPolicy | None = None, seed: int = 0, max_users: int | None = MAX_USERS,
    max_examples: int = MAX_EXAMPLES,
) -> ChurnModel:
    """Train the three models and the blend from the database; raises ``NotEnoughData``
    while there is too little labelled history and ``TrainingFailed`` if the run fails.

    With more than ``max_users`` users stored, a seeded sample of them is read: training
    time then stays bounded however long the service has run. The model's ``details`` say
    how many users were read (``users``) and whether they were a sample (``sampled``).
    """
    run = Run(version, progress, failure_injection)
    # TensorFlow takes seconds to import; let that overlap with reading the database.
    threading.Thread(target=_import_tensorflow, name="tensorflow-import", daemon=True).start()
    with _failures(run), run.stage("load"):
        sample = sample_users(engine, max_users, seed) if max_users else None
        history, feedback = load_history(engine, user_ids=sample), load_feedback(engine)
    users = int(history["user_id"].nunique()) if len(history) else 0
    log.info("training run %s: %d events of %d users%s, %d outcomes reported", version,
             len(history), users, " (a sample)" if sample else "", len(feedback))
    try:
        model = train_from_history(history, feedback, version, holdout_share=holdout_share,
                                   policy=policy, seed=seed, max_examples=max_examples, run=run)
    except NotEnoughData as exc:
        if not sample:
            raise
        raise NotEnoughData(f"{exc} (in a sample of {users} users)", sampled=True) from exc
    return replace(model, details={**model.details, "users": users, "sampled": bool(sample)})


def _import_tensorflow() -> None:
    from churn_stream.models.sequence import tensorflow

    try:
        tensorflow()
    except Exception:  # the sequence model's fit meets the same error and reports it
        log.debug("importing TensorFlow ahead of use failed", exc_info=True)


def train_from_history(
    history: pd.DataFrame, feedback: pd.DataFrame | None, version: str, *,
    holdout_share: float = 0.2, policy: LabelPolicy | None = None, seed: int = 0,
    max_examples: int = MAX_EXAMPLES, progress: Progress | None = None,
    failure_injection: FailureInjection = None, run: Run | None = None,
    split: Split | None = None,
) -> ChurnModel:
    """``train`` on a history from any source: ``user_activity``-shaped rows and outcomes.

    ``split`` assigns roles (default ``split_roles``, by time and user; ``split_users`` for
    a single snapshot such as a profile table, where no time split exists).
    """
    run = run or Run(version, progress, failure_injection)
    with _failures(run):
        examples = build_examples(history, feedback, policy or LabelPolicy(), holdout_share,
                                  seed, max_examples, run, split)
        model = fit_examples(examples, version, seed, run)
    run.finish()
    return model


@contextmanager
def _failures(run: Run) -> Iterator[None]:
    """Let ``NotEnoughData`` through; any other failure becomes ``TrainingFailed``."""
    try:
        yield
    except (NotEnoughData, TrainingFailed):
        raise
    except (Exception, MemoryError) as exc:
        raise TrainingFailed(f"training run {run.version} failed in stage {run.stage_name}: "
                             f"{type(exc).__name__}: {exc}") from exc


def build_examples(
    history: pd.DataFrame, feedback: pd.DataFrame | None, policy: LabelPolicy,
    holdout_share: float, seed: int, max_examples: int, run: Run | None = None,
    split: Split | None = None,
) -> Examples:
    """Label, split and featurise: the examples a fit needs."""
    run = run or Run("examples", None, None)
    if history.empty:
        raise NotEnoughData("no activity stored yet")
    with run.stage("label"):
        queries = label_examples(history, feedback, policy)
        if queries.empty:
            span = history["ts"].max() - history["ts"].min()
            needed = policy.min_history_days + policy.settle / pd.Timedelta(days=1)
            raise NotEnoughData(f"history spans {span / pd.Timedelta(days=1):.1f} days; labels "
                                f"need {needed:.1f} (history before the first cutoff, then "
                                "horizon and inactivity gap after it)")
        log.info("training run %s: %s", run.version, describe(queries))
        queries["role"] = (split or split_roles)(queries, policy, holdout_share, seed)
        queries = cap(queries[queries["role"] != UNUSED], max_examples, seed)
        check_classes(queries, policy)
    with run.stage("features"):
        space = FeatureSpace.learn(history)
        keep = queries["role"].to_numpy() == HOLDOUT
        X, S, snapshots = replay(history, queries, space, keep=keep)
    holdout = Holdout(queries["churned"].to_numpy()[keep], _renumber(snapshots, keep))
    return Examples(space, queries, X, S, holdout)


def _renumber(snapshots: list[Snapshot], keep: np.ndarray) -> list[Snapshot]:
    """Snapshot rows as positions among the kept (holdout) rows."""
    position = np.cumsum(keep) - 1
    return [replace(s, rows=position[s.rows]) for s in snapshots]


def fit_examples(examples: Examples, version: str, seed: int = 0,
                 run: Run | None = None) -> ChurnModel:
    """Fit the three models, choose blend weights on validation, measure on the holdout."""
    from churn_stream.models.boosted import fit_boosted
    from churn_stream.models.forest import fit_forest
    from churn_stream.models.sequence import fit_sequence

    run = run or Run(version, None, None)
    X, S, y = examples.X, examples.S, examples.y
    fit, val = examples.rows(FIT), examples.rows(VALIDATION)
    run.inject()
    with run.stage("rf"):
        forest = fit_forest(X[fit], y[fit], seed)
    with run.stage("xgb"):
        boosted = fit_boosted(X[fit], y[fit], X[val], y[val], seed)
    with run.stage("seq"):
        sequence = fit_sequence(X[fit], S[fit], y[fit], X[val], S[val], y[val], seed)
    with run.stage("evaluate"):
        model = ChurnModel(version=version, trained_at=datetime.now(UTC), rows=len(fit),
                           space=examples.space, forest=forest, boosted=boosted,
                           sequence=sequence, weights=dict.fromkeys(MODEL_NAMES, 1 / 3),
                           fill=np.median(X[fit], axis=0).astype(np.float32))
        model = _evaluate(model, examples, seed, run)
    log.info("training run %s: %d fit rows; holdout ROC-AUC %s; weights %s", version, len(fit),
             {k: round(v["roc_auc"], 4) for k, v in model.metrics.items()}, model.weights)
    return model


def _evaluate(model: ChurnModel, examples: Examples, seed: int, run: Run) -> ChurnModel:
    X, S, y = examples.X, examples.S, examples.y
    val, hold, fit = examples.rows(VALIDATION), examples.rows(HOLDOUT), examples.rows(FIT)
    on_val = model.score(X[val], S[val])
    weights = choose_weights(y[val], {n: getattr(on_val, n) for n in MODEL_NAMES})
    model = replace(model, weights=weights)
    on_hold = model.score(X[hold], S[hold])
    sample = np.random.default_rng(seed).permutation(fit)[:REFERENCE_ROWS]
    sample.sort()
    reference = model.score(X[sample], S[sample])
    return replace(
        model,
        metrics=_metrics(y[hold], on_hold),
        validation=_metrics(y[val], replace(on_val, blend=_blend(on_val, weights))),
        reference=X[sample].copy(), reference_scores=reference.blend,
        holdout=examples.holdout,
        details={"examples": {"fit": len(fit), "validation": len(val), "holdout": len(hold)},
                 "churned": {"fit": int(y[fit].sum()), "validation": int(y[val].sum()),
                             "holdout": int(y[hold].sum())},
                 "seconds": dict(run.seconds),
                 "sequence_earns_weight": weights["seq"] > 0},
    )


def _blend(scores: Any, weights: dict[str, float]) -> np.ndarray:
    return sum(weights[n] * getattr(scores, n) for n in MODEL_NAMES)


def _metrics(y: np.ndarray, scores: Any) -> dict[str, dict[str, float]]:
    return {name: classification_metrics(y, getattr(scores, name))
            for name in (*MODEL_NAMES, "blend")}


def compare_on_holdout(candidate: ChurnModel, current: ChurnModel) -> tuple[float, float]:
    """Blend ROC-AUC of the candidate and of the serving model on the candidate's holdout.

    The serving model reads the same examples through its own feature space, so the two
    figures are comparable even when the new training data brought new event types.
    """
    if candidate.holdout is None:
        raise ValueError(f"model {candidate.version} has no holdout to compare on")
    X, S = candidate.holdout.features(current.space)
    current_auc = classification_metrics(candidate.holdout.labels, current.score(X, S).blend)
    return candidate.metrics["blend"]["roc_auc"], current_auc["roc_auc"]
