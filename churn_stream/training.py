"""Training runs: labelled history from the database to a ``ChurnModel``, all in memory.

The split is by time and by user. Holdout examples are those of a random share of users at
the latest cutoffs; the models learn from the other users at cutoffs whose labels were
settled before the holdout begins, so no outcome seen in training lies in the holdout
period. Validation (early stopping, blend weights) is a share of the training users.
Nothing is written anywhere: no model files, no rows (the predictor records its runs).
"""

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from churn_stream import storage
from churn_stream.errors import NotEnoughData, TrainingFailed
from churn_stream.features import FeatureSpace, Snapshot, replay
from churn_stream.labels import LabelPolicy, describe, label_examples
from churn_stream.models import MODEL_NAMES, ChurnModel, choose_weights, classification_metrics

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
"""Called with the stage starting (or ``done``) and the share of the run finished so far."""
FailureInjection = str | Callable[[str], None] | None
"""Tests only: ``"raise"`` or ``"memory"`` fails the fit stage; a callable sees each stage."""

STAGES = {"load": 0.10, "label": 0.05, "features": 0.15, "rf": 0.15, "xgb": 0.10,
          "seq": 0.35, "evaluate": 0.10}
FIT, VALIDATION, HOLDOUT, UNUSED = 0, 1, 2, -1
Split = Callable[[pd.DataFrame, LabelPolicy, float, int], np.ndarray]
"""``(queries, policy, holdout_share, seed) -> role per example``."""
VALIDATION_SHARE = 0.2
MIN_PER_CLASS = 10
MAX_USERS = 5000
"""Users whose history one training run reads at most (a seeded sample beyond that)."""
MAX_EXAMPLES = 20_000
"""Fit examples at most (a seeded sample beyond that): bounds the sequence model's epochs."""
USER_CHUNK = 900
"""Users per ``IN (...)`` query; SQL Server takes at most 2,100 parameters."""
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


def load_history(engine: sa.Engine, until: datetime | None = None,
                 user_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """``user_activity`` rows with ``ts <= until`` in time order; ``ts`` as aware UTC.

    ``user_ids`` limits the rows to those users (read in chunks of ``USER_CHUNK``).
    """
    if user_ids is None:
        return _read_history(engine, until, None)
    chunks = [_read_history(engine, until, list(user_ids[i:i + USER_CHUNK]))
              for i in range(0, len(user_ids), USER_CHUNK)]
    frame = pd.concat(chunks, ignore_index=True) if chunks else _read_history(engine, until, [])
    return frame.sort_values(["ts", "event_id"], kind="stable").reset_index(drop=True)


def _read_history(engine: sa.Engine, until: datetime | None,
                  user_ids: list[str] | None) -> pd.DataFrame:
    table = storage.user_activity
    # Reading JSON and times as text and parsing them in bulk is several times faster than
    # the per-row conversions of the column types.
    columns = [table.c.event_id, table.c.user_id, table.c.event_type,
               sa.type_coerce(table.c.ts, sa.String).label("ts"),
               sa.type_coerce(table.c.numeric_values, sa.Text).label("numeric_values"),
               sa.type_coerce(table.c.categorical_values, sa.Text).label("categorical_values")]
    query = sa.select(*columns).order_by(table.c.ts, table.c.event_id)
    if until is not None:
        query = query.where(table.c.ts <= storage.to_db_time(until))
    if user_ids is not None:
        query = query.where(table.c.user_id.in_(user_ids))
    with engine.connect() as conn:
        result = conn.execute(query)
        frame = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
    text = len(frame) > 0 and isinstance(frame["ts"].iloc[0], str)
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True, format="ISO8601" if text else None)
    for column in ("numeric_values", "categorical_values"):
        frame[column] = [_json_dict(v) for v in frame[column]]
    return frame


def sample_users(engine: sa.Engine, max_users: int, seed: int) -> list[str] | None:
    """A seeded sample of ``max_users`` stored users, or None when there are no more."""
    table = storage.user_activity
    with engine.connect() as conn:
        users = conn.execute(sa.select(table.c.user_id).distinct()).scalars().all()
    if len(users) <= max_users:
        return None
    chosen = np.random.default_rng(seed).choice(sorted(users), max_users, replace=False)
    return sorted(chosen.tolist())


def _json_dict(value: Any) -> dict:
    if isinstance(value, dict):
        return value
    return {} if value in (None, "{}", "") else json.loads(value)


def load_feedback(engine: sa.Engine, until: datetime | None = None) -> pd.DataFrame:
    """Reported outcomes: ``user_id``, ``churned``, ``observed_at`` (aware UTC)."""
    table = storage.feedback
    query = sa.select(table.c.user_id, table.c.churned, table.c.observed_at)
    if until is not None:
        query = query.where(table.c.observed_at <= storage.to_db_time(until))
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    frame = pd.DataFrame(rows, columns=["user_id", "churned", "observed_at"])
    frame["observed_at"] = pd.to_datetime(frame["observed_at"], utc=True)
    frame["churned"] = frame["churned"].astype(bool)
    return frame


def train(
    engine: sa.Engine, version: str, *, holdout_share: float = 0.2,
    progress: Progress | None = None, failure_injection: FailureInjection = None,
    policy: LabelPolicy | None = None, seed: int = 0, max_users: int | None = MAX_USERS,
) -> ChurnModel:
    """Train the three models and the blend from the database; raises ``NotEnoughData``
    while there is too little labelled history and ``TrainingFailed`` if the run fails.

    With more than ``max_users`` users stored, a seeded sample of them is read: training
    time then stays bounded however long the service has run.
    """
    run = Run(version, progress, failure_injection)
    # TensorFlow takes seconds to import; let that overlap with reading the database.
    threading.Thread(target=_import_tensorflow, name="tensorflow-import", daemon=True).start()
    with _failures(run), run.stage("load"):
        sample = sample_users(engine, max_users, seed) if max_users else None
        history, feedback = load_history(engine, user_ids=sample), load_feedback(engine)
    log.info("training run %s: %d events of %d users%s, %d outcomes reported", version,
             len(history), history["user_id"].nunique() if len(history) else 0,
             " (a sample)" if sample else "", len(feedback))
    return train_from_history(history, feedback, version, holdout_share=holdout_share,
                              policy=policy, seed=seed, run=run)


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
        queries = _cap(queries[queries["role"] != UNUSED], max_examples, seed)
        _check_classes(queries, policy)
    with run.stage("features"):
        space = FeatureSpace.learn(history)
        keep = queries["role"].to_numpy() == HOLDOUT
        X, S, snapshots = replay(history, queries, space, keep=keep)
    holdout = Holdout(queries["churned"].to_numpy()[keep], _renumber(snapshots, keep))
    return Examples(space, queries, X, S, holdout)


def split_roles(queries: pd.DataFrame, policy: LabelPolicy, holdout_share: float,
                seed: int) -> np.ndarray:
    """Role of each example: fit, validation, holdout, or unused (its label overlaps the holdout).

    Holdout: the examples of the latest ``holdout_share`` (by count) of held-out users,
    who are every user seen only then and a random ``holdout_share`` of those seen both
    before and then. Fit and validation: the other users' examples whose labels were
    settled by the time the holdout starts; validation is a random share of those users.
    """
    if not 0 < holdout_share < 1:
        raise ValueError("holdout_share must be between 0 and 1")
    roles = np.full(len(queries), UNUSED)
    if queries.empty:
        return roles
    cutoff = queries["cutoff"]
    ordered = cutoff.sort_values(kind="stable")
    start = ordered.iloc[min(len(ordered) - 1, int(np.floor((1 - holdout_share) * len(ordered))))]
    late = (cutoff >= start).to_numpy()
    early = (cutoff + policy.horizon <= start).to_numpy()
    user = queries["user_id"].to_numpy()
    seen_early, seen_late = set(user[early]), set(user[late])
    rng = np.random.default_rng(seed)
    spanning = sorted(seen_early & seen_late)
    held = set(_some(rng, spanning, holdout_share)) | (seen_late - seen_early)
    learning = sorted(seen_early - held)
    validating = _some(rng, learning, VALIDATION_SHARE)
    in_held = np.isin(user, list(held))
    roles[in_held & late] = HOLDOUT
    roles[~in_held & early] = FIT
    roles[~in_held & early & np.isin(user, validating)] = VALIDATION
    return roles


def split_users(queries: pd.DataFrame, policy: LabelPolicy, holdout_share: float,
                seed: int) -> np.ndarray:
    """Roles by user alone: a random ``holdout_share`` of users is the holdout, a share of
    the rest validates. For one snapshot of every user, where time cannot split."""
    del policy  # every example is settled by construction in a snapshot
    rng = np.random.default_rng(seed)
    users = sorted(queries["user_id"].unique())
    held = _some(rng, users, holdout_share)
    validating = _some(rng, sorted(set(users) - set(held)), VALIDATION_SHARE)
    user = queries["user_id"].to_numpy()
    return np.select([np.isin(user, held), np.isin(user, validating)], [HOLDOUT, VALIDATION],
                     FIT)


def _some(rng: np.random.Generator, users: list[str], share: float) -> list[str]:
    """A seeded ``share`` of ``users`` (at least one when there are any)."""
    if not users:
        return []
    return list(rng.permutation(users)[:max(1, round(share * len(users)))])


def _cap(queries: pd.DataFrame, max_examples: int, seed: int) -> pd.DataFrame:
    """At most ``max_examples`` fit and a quarter of that validation examples, seeded samples;
    the order by cutoff stays."""
    rng = np.random.default_rng(seed)
    dropped = []
    for role, limit in ((FIT, max_examples), (VALIDATION, max(max_examples // 4, 1))):
        rows = np.flatnonzero(queries["role"].to_numpy() == role)
        if len(rows) > limit:
            dropped.append(rng.choice(rows, len(rows) - limit, replace=False))
    if dropped:
        queries = queries.drop(queries.index[np.concatenate(dropped)])
    return queries.reset_index(drop=True)


def _check_classes(queries: pd.DataFrame, policy: LabelPolicy) -> None:
    """Refuse to train on too few churners or non-churners in any part of the split."""
    for role, name in ((FIT, "training"), (VALIDATION, "validation"), (HOLDOUT, "holdout")):
        labels = queries.loc[queries["role"] == role, "churned"]
        churned = int(labels.sum())
        if min(churned, len(labels) - churned) < MIN_PER_CLASS:
            raise NotEnoughData(
                f"{name} examples have {churned} churned and {len(labels) - churned} not; "
                f"each needs at least {MIN_PER_CLASS}. Labels are settled "
                f"{policy.settle.days} days after a cutoff, so more history (or more "
                f"reported outcomes) is needed")


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
