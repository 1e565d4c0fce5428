"""What the HTTP API shows: health, the serving model, a user's score now."""

import logging
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np
from prometheus_client import Histogram

from churn_stream.features import FeatureSpace
from churn_stream.predictor.http import (
    Contribution,
    HealthOut,
    ModelOut,
    PredictionOut,
)
from churn_stream.predictor.retrain import ModelHolder
from churn_stream.predictor.state import Features

log = logging.getLogger(__name__)
TOP_FEATURES = 5


class StateView(Protocol):
    """What serving reads of the per-user state: a held user's features, or any user's."""

    def held(self, user_id: str, space: FeatureSpace) -> Features | None: ...
    def lookup(self, user_id: str, space: FeatureSpace) -> Features | None: ...
    def tracked(self) -> int: ...


class Serving:
    """Reads the predictor's model and state for the HTTP API; never writes them.

    In the predictor, ``state`` is the consume loop's state seen from the HTTP API process
    (``api_process.RemoteState``); in tests it may be a ``UserState`` itself.
    """

    def __init__(self, instance: str, holder: ModelHolder, state: StateView,
                 retraining: Callable[[], bool], latency: Histogram | None = None) -> None:
        self.instance = instance
        self.holder = holder
        self.state = state
        self.retraining = retraining
        self.latency = latency
        """Observes the seconds of each score and explanation, if given."""

    def health(self) -> HealthOut:
        """Serving once a model is in place; training before."""
        model = self.holder.current
        return HealthOut(
            status="serving" if model else "training",
            instance=self.instance,
            model_version=model.version if model else None,
            tracked_users=self.state.tracked(),
            retraining=self.retraining(),
        )

    def has_model(self) -> bool:
        return self.holder.current is not None

    def model_out(self) -> ModelOut | None:
        """The serving model's description, or None before the first one."""
        model = self.holder.current
        if model is None:
            return None
        return ModelOut(
            version=model.version, trained_at=model.trained_at, rows=model.rows,
            features=list(model.space.feature_names),
            sequence_channels=list(model.space.sequence_channels),
            sequence_days=model.space.sequence_days,
            metrics={m: {k: _finite_or_none(v) for k, v in values.items()}
                     for m, values in model.metrics.items()},
            weights=dict(model.weights),
        )

    def predict_now(self, user_id: str) -> PredictionOut | None:
        """``user_id``'s score as of the stream's clock; None if the user is unknown.

        A user this instance does not hold is read from the database.
        """
        return self._predict(user_id, held_only=False)

    def predict_held(self, user_id: str) -> PredictionOut | None:
        """``user_id``'s score if this instance holds their state; None otherwise (no I/O)."""
        return self._predict(user_id, held_only=True)

    def _predict(self, user_id: str, held_only: bool) -> PredictionOut | None:
        model = self.holder.current
        if model is None:
            return None
        if held_only:
            found = self.state.held(user_id, model.space)
        else:
            found = self.state.lookup(user_id, model.space)
        if found is None:
            return None
        started = time.perf_counter()
        scores = model.score(found.rows, found.sequences)
        top = model.explain(found.rows[0], top_k=TOP_FEATURES)
        if self.latency is not None:
            self.latency.observe(time.perf_counter() - started)
        return PredictionOut(
            user_id=user_id, model_version=model.version, as_of=found.as_of,
            score=float(scores.blend[0]),
            scores={"rf": float(scores.rf[0]), "xgb": float(scores.xgb[0]),
                    "seq": float(scores.seq[0]), "blend": float(scores.blend[0])},
            top_features=[Contribution(feature=f, contribution=float(c)) for f, c in top],
        )


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
