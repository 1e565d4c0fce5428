"""The served model: three fitted models and the blend of their scores, held in memory only."""

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

import numpy as np

from churn_stream.features import FeatureSpace
from churn_stream.models.boosted import Boosted
from churn_stream.models.evaluation import mean_log_loss
from churn_stream.models.forest import Forest
from churn_stream.models.sequence import SequenceModel

MODEL_NAMES = ("rf", "xgb", "seq")
WEIGHT_STEP = 0.05


@dataclass(frozen=True)
class Scores:
    """Churn probabilities of a batch: the served blend and each model's own score."""

    blend: np.ndarray
    rf: np.ndarray
    xgb: np.ndarray
    seq: np.ndarray


@dataclass(frozen=True, eq=False)
class ChurnModel:
    """One trained, immutable bundle: random forest, XGBoost, LSTM-GRU and their blend.

    ``score`` and ``explain`` only read, so one instance serves many threads. A model is
    replaced, never changed: retraining builds a new one and swaps the reference.
    """

    version: str
    trained_at: datetime
    rows: int
    """Training examples the models were fitted on."""
    space: FeatureSpace
    forest: Forest
    boosted: Boosted
    sequence: SequenceModel
    weights: dict[str, float]
    """Blend weights chosen on validation data; they sum to 1."""
    fill: np.ndarray
    """Per-feature value that stands in for a missing (NaN or infinite) one: training median."""
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """Holdout quality of ``rf``, ``xgb``, ``seq`` and ``blend``."""
    validation: dict[str, dict[str, float]] = field(default_factory=dict)
    reference: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    """A sample of training feature rows: the reference distribution for drift."""
    reference_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    details: dict[str, Any] = field(default_factory=dict)
    """How the run went: example counts, split, seconds per stage."""
    holdout: Any = None
    """The holdout examples (``training.Holdout``), to compare a later model on them."""

    def score(self, X: np.ndarray, S: np.ndarray) -> Scores:
        """Score a batch: ``X`` (n, features) and ``S`` (n, days, channels); inputs untouched."""
        X, S = self._checked(X, S)
        rf = self.forest.predict(X)
        xgb = self.boosted.predict(X)
        seq = self.sequence.predict(X, S)
        blend = self.weights["rf"] * rf + self.weights["xgb"] * xgb + self.weights["seq"] * seq
        return Scores(blend=np.clip(blend, 0.0, 1.0), rf=rf, xgb=xgb, seq=seq)

    def explain(self, x: np.ndarray, top_k: int = 5) -> list[tuple[str, float]]:
        """The features that move this row's XGBoost log-odds most, with their shares."""
        row, _ = self._checked(np.asarray(x).reshape(1, -1), None)
        shares = self.boosted.contributions(row[0])[:-1]
        order = np.argsort(-np.abs(shares), kind="stable")[:top_k]
        return [(self.space.feature_names[i], float(shares[i])) for i in order]

    def _checked(self, X: np.ndarray, S: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        X = np.asarray(X, dtype=np.float32)
        width = len(self.space.feature_names)
        if X.ndim != 2 or X.shape[1] != width:
            raise ValueError(f"model {self.version} expects rows of {width} features, "
                             f"got shape {X.shape}")
        X = np.where(np.isfinite(X), X, self.fill)
        if S is None:
            return X, np.zeros((0,))
        S = np.asarray(S, dtype=np.float32)
        shape = (len(X), self.space.sequence_days, len(self.space.sequence_channels))
        if S.shape != shape:
            raise ValueError(f"model {self.version} expects sequences of shape {shape}, "
                             f"got {S.shape}")
        return X, np.where(np.isfinite(S), S, 0.0).astype(np.float32)

    def parts(self) -> dict[str, Any]:
        """The whole bundle as plain data (arrays, buffers, the feature space, the metrics),
        so that a model trained in one process can serve in another; nothing is written."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(forest=self.forest.parts(), boosted=self.boosted.parts(),
                      sequence=self.sequence.parts())
        return values

    @classmethod
    def from_parts(cls, parts: dict[str, Any], network: bool = True) -> "ChurnModel":
        """The model ``parts`` describes; it scores exactly as the one it came from.

        ``network`` False builds the sequence model's numpy pass only (no TensorFlow): for a
        process that scores a few rows at a time.
        """
        return cls(**{**parts, "forest": Forest.from_parts(parts["forest"]),
                      "boosted": Boosted.from_parts(parts["boosted"]),
                      "sequence": SequenceModel.from_parts(parts["sequence"], network)})

    def summary(self) -> dict[str, Any]:
        """What ``/model`` shows: identity, size, weights and holdout metrics."""
        return {"version": self.version, "trained_at": self.trained_at.isoformat(),
                "rows": self.rows, "features": len(self.space.feature_names),
                "weights": self.weights, "metrics": self.metrics}


def choose_weights(y: np.ndarray, scores: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Non-negative weights summing to 1 that minimise validation log loss (grid search).

    A grid over the simplex is deterministic and cannot diverge; a model that adds nothing
    gets weight 0, which is how the blend shows whether each model earns its place.
    """
    steps = int(round(1 / WEIGHT_STEP))
    best: tuple[float, tuple[int, ...]] | None = None
    for a, b in itertools.product(range(steps + 1), repeat=2):
        if a + b > steps:
            continue
        grid = (a, b, steps - a - b)
        blend = sum(g / steps * scores[name] for g, name in zip(grid, MODEL_NAMES, strict=True))
        loss = mean_log_loss(y, blend)
        if best is None or loss < best[0] - 1e-12:
            best = (loss, grid)
    assert best is not None
    return {name: g / steps for g, name in zip(best[1], MODEL_NAMES, strict=True)}
