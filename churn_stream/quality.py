"""Model quality on public datasets: cross-validated splits, per model and for the blend.

The examples are those a live stack would label (``label_examples``) with the features the
predictor would serve (``replay``, the serving code path), read once; each fold then only
reassigns roles (fit, validation, holdout) and fits the three models and the blend through
``training.fit_examples``. KDD Cup 2015 has one example per enrollment, read at the end of
its course's 30-day window (the label is about the 10 days after it); it is split two ways:

- ``enrollments``: stratified folds of enrollments, every course on both sides;
- ``courses``: folds of whole courses, so the models score courses they never saw.

Telco is one profile per customer: stratified folds. Within each fold a stratified share of
the training examples validates (early stopping, blend weights).
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from churn_stream.features import FeatureSpace, replay
from churn_stream.labels import LabelPolicy, label_examples
from churn_stream.models import MODEL_NAMES
from churn_stream.splits import FIT, HOLDOUT, VALIDATION, VALIDATION_SHARE
from churn_stream.training import Examples, Holdout, fit_examples

log = logging.getLogger(__name__)

METRICS = ("roc_auc", "pr_auc", "brier", "log_loss")
SCORED = (*MODEL_NAMES, "blend")


@dataclass(frozen=True)
class Plan:
    """How one dataset is labelled and split."""

    policy: LabelPolicy
    splits: tuple[str, ...]
    group_key: str | None = None
    """Categorical attribute whose values are held out whole by the ``courses`` split."""


PLANS = {
    # The outcome is reported 10 days after the window; silence is not churn by itself.
    "kdd2015": Plan(LabelPolicy(horizon_days=10, inactivity_days=None, feedback_cutoffs=True),
                    ("enrollments", "courses"), group_key="course"),
    "telco": Plan(LabelPolicy(horizon_days=30, inactivity_days=None, feedback_cutoffs=True),
                  ("stratified",)),
}
Progress = Callable[[str], None]


@dataclass
class FoldResult:
    """One fold: holdout metrics per model and blend, the blend weights, sizes and seconds."""

    split: str
    fold: int
    metrics: dict[str, dict[str, float]]
    weights: dict[str, float]
    sizes: dict[str, int]
    seconds: float


@dataclass
class QualityReport:
    """Every fold of every split of one dataset, and how the run was made."""

    dataset: str
    users: int
    churn_share: float
    folds: list[FoldResult] = field(default_factory=list)
    seed: int = 0
    feature_seconds: float = 0.0

    def table(self) -> pd.DataFrame:
        """Mean and standard deviation over folds: one row per (split, model), ordered."""
        rows = [{"split": f.split, "model": name, **f.metrics[name],
                 **({"weight": f.weights[name]} if name in f.weights else {})}
                for f in self.folds for name in SCORED]
        frame = pd.DataFrame(rows)
        grouped = frame.groupby(["split", "model"], sort=False)
        summary = grouped.mean().join(grouped[list(METRICS)].std(ddof=0), rsuffix="_sd")
        summary["folds"] = grouped.size()
        return summary.reset_index()

    def blend_auc(self, split: str) -> float:
        """Mean holdout ROC-AUC of the served blend over the folds of ``split``."""
        return float(np.mean([f.metrics["blend"]["roc_auc"] for f in self.folds
                              if f.split == split]))


def load_dataset(name_or_path: str, data_root: Path | None = None,
                 limit_users: int | None = None, seed: int = 0,
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(history, feedback) of a public dataset through its replay reader."""
    from churn_stream.replay.frames import training_frames
    from churn_stream.replay.registry import DATA_ROOT, open_replay

    source = open_replay(name_or_path, data_root=data_root or DATA_ROOT,
                         limit_users=limit_users, seed=seed)
    return training_frames(source)


def dataset_examples(history: pd.DataFrame, feedback: pd.DataFrame,
                     policy: LabelPolicy) -> Examples:
    """Every labelled example with its served features; roles are set per fold later."""
    queries = label_examples(history, feedback, policy)
    if queries.empty:
        raise ValueError("the dataset gave no labelled examples")
    space = FeatureSpace.learn(history)
    X, S, _ = replay(history, queries, space)
    queries["role"] = FIT
    return Examples(space, queries, X, S, Holdout(np.zeros(0, np.int8), []))


def user_groups(history: pd.DataFrame, queries: pd.DataFrame, key: str) -> np.ndarray:
    """Each example's latest value of the categorical attribute ``key`` (e.g. its course)."""
    values = history["categorical_values"].map(lambda c: c.get(key) if c else None)
    latest = values[values.notna()].groupby(history["user_id"]).last()
    groups = latest.reindex(queries["user_id"]).to_numpy()
    if pd.isna(groups).any():
        raise ValueError(f"some users never carried the attribute {key!r}")
    return groups.astype(str)


def stratified_folds(y: np.ndarray, n_folds: int, seed: int) -> list[np.ndarray]:
    """Holdout rows of each fold: each class dealt round-robin in a seeded order."""
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(y), np.int64)
    for label in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == label))
        fold_of[rows] = np.arange(len(rows)) % n_folds
    return [np.flatnonzero(fold_of == k) for k in range(n_folds)]


def group_folds(groups: np.ndarray, n_folds: int, seed: int) -> list[np.ndarray]:
    """Holdout rows of each fold: whole groups, dealt in a seeded order to the smallest fold."""
    names, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    if len(names) < n_folds:
        raise ValueError(f"{len(names)} groups cannot fill {n_folds} folds")
    filled = np.zeros(n_folds, np.int64)
    fold_of_group = np.empty(len(names), np.int64)
    for g in np.random.default_rng(seed).permutation(len(names)):
        fold_of_group[g] = int(np.argmin(filled))
        filled[fold_of_group[g]] += sizes[g]
    fold_of = fold_of_group[inverse]
    return [np.flatnonzero(fold_of == k) for k in range(n_folds)]


def fold_roles(n: int, holdout: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """HOLDOUT for ``holdout``; of the rest a stratified ``VALIDATION_SHARE`` validates."""
    roles = np.full(n, FIT)
    roles[holdout] = HOLDOUT
    rest = np.setdiff1d(np.arange(n), holdout)
    n_validation_folds = int(round(1 / VALIDATION_SHARE))
    validation = stratified_folds(y[rest], n_validation_folds, seed)[0]
    roles[rest[validation]] = VALIDATION
    return roles


def split_folds(examples: Examples, split: str, plan: Plan, history: pd.DataFrame,
                n_folds: int, seed: int) -> list[np.ndarray]:
    """The holdout rows of each fold of ``split``."""
    if split == "courses":
        return group_folds(user_groups(history, examples.queries, plan.group_key), n_folds, seed)
    return stratified_folds(examples.y, n_folds, seed)


def evaluate_folds(examples: Examples, split: str, folds: list[np.ndarray], seed: int,
                   progress: Progress | None = None,
                   labels: np.ndarray | None = None) -> list[FoldResult]:
    """Fit and score every fold; ``labels`` replaces the training labels (shuffle tests)."""
    results = []
    for k, holdout in enumerate(folds):
        if progress:
            progress(f"{split} fold {k + 1}/{len(folds)}")
        started = time.perf_counter()
        queries = examples.queries.copy()
        queries["role"] = fold_roles(len(queries), holdout, examples.y, seed + k)
        if labels is not None:
            trained = queries["role"].to_numpy() != HOLDOUT
            queries.loc[trained, "churned"] = labels[trained]
        fold = Examples(examples.space, queries, examples.X, examples.S, examples.holdout)
        model = fit_examples(fold, f"quality-{split}-{k}", seed + k)
        sizes = {"fit": int((queries["role"] == FIT).sum()),
                 "validation": int((queries["role"] == VALIDATION).sum()),
                 "holdout": len(holdout)}
        results.append(FoldResult(split, k, model.metrics, model.weights, sizes,
                                  time.perf_counter() - started))
        log.info("quality %s fold %d: blend ROC-AUC %.4f, weights %s", split, k,
                 model.metrics["blend"]["roc_auc"], model.weights)
    return results


def evaluate_dataset(name: str, history: pd.DataFrame, feedback: pd.DataFrame, *,
                     n_folds: int = 5, seed: int = 0, max_folds: int | None = None,
                     splits: tuple[str, ...] | None = None,
                     progress: Progress | None = None) -> QualityReport:
    """Cross-validated quality of the three models and the blend on one dataset."""
    plan = PLANS[name]
    started = time.perf_counter()
    if progress:
        progress("features")
    examples = dataset_examples(history, feedback, plan.policy)
    report = QualityReport(name, len(examples.y), float(examples.y.mean()), seed=seed,
                           feature_seconds=time.perf_counter() - started)
    for split in splits or plan.splits:
        folds = split_folds(examples, split, plan, history, n_folds, seed)
        report.folds += evaluate_folds(examples, split, folds[:max_folds], seed, progress)
    return report


def rich_tables(report: QualityReport) -> list[Any]:
    """One ``rich`` table per split: mean (and spread) over folds per model and the blend."""
    from rich.table import Table

    summary = report.table()
    tables = []
    for split, rows in summary.groupby("split", sort=False):
        table = Table(title=f"{report.dataset}: {split} held out, {int(rows['folds'].iloc[0])} "
                      f"folds, {report.users} users, seed {report.seed}")
        for column in ("model", "ROC-AUC", "PR-AUC", "Brier", "log loss", "blend weight"):
            table.add_column(column, justify="left" if column == "model" else "right")
        for row in rows.itertuples():
            weight = getattr(row, "weight", float("nan"))
            table.add_row(row.model, *(f"{getattr(row, m):.4f} ±{getattr(row, m + '_sd'):.4f}"
                                       for m in METRICS),
                          "" if pd.isna(weight) else f"{weight:.2f}")
        tables.append(table)
    return tables
