"""The drift reference: the training history as the service sees it.

Training rows are features at daily cutoffs, some early in the history; the service reads a
user's features right after their events, as of the latest event of a micro-batch. Recency,
window counts and tenure differ between the two by construction, so a live window would
look drifted against training rows however stable the traffic. The reference is therefore
the last days of the training history replayed through the feature store the way the
consume loop reads it: each user right after their event.
"""

from dataclasses import replace
from datetime import timedelta

import numpy as np
import pandas as pd
import sqlalchemy as sa

from churn_stream import training
from churn_stream.features import replay
from churn_stream.models import ChurnModel

REFERENCE_DAYS = 3.0
"""Days at the end of the training history that the reference describes."""
REFERENCE_BATCH_EVENTS = 1
"""Events per replayed micro-batch: one, as a live stream meets it (micro-batches there span
milliseconds, so each user is read right after their own event)."""
REFERENCE_ROWS = 5000
"""Most reference rows kept (a seeded sample)."""


def serving_queries(history: pd.DataFrame, days: float = REFERENCE_DAYS,
                    batch_events: int = REFERENCE_BATCH_EVENTS, max_rows: int = REFERENCE_ROWS,
                    seed: int = 0) -> pd.DataFrame:
    """``(user_id, cutoff)`` of each user a micro-batch of the last ``days`` would score."""
    ts = pd.to_datetime(history["ts"], utc=True)
    tail = ts >= ts.max() - timedelta(days=days)
    events = pd.DataFrame({"user_id": history["user_id"][tail].to_numpy(),
                           "ts": ts[tail].to_numpy()}).sort_values("ts", kind="stable")
    events["batch"] = np.arange(len(events)) // batch_events
    events["cutoff"] = events.groupby("batch")["ts"].transform("max")
    queries = events.drop_duplicates(["batch", "user_id"])[["user_id", "cutoff"]]
    if len(queries) > max_rows:
        keep = np.sort(np.random.default_rng(seed).choice(len(queries), max_rows, replace=False))
        queries = queries.iloc[keep]
    return queries.reset_index(drop=True)


def serving_reference(history: pd.DataFrame, model: ChurnModel) -> tuple[np.ndarray, np.ndarray]:
    """Feature rows and blended scores of the reference (see the module docstring)."""
    queries = serving_queries(history)
    X, S, _ = replay(history, queries, model.space)
    return X, model.score(X, S).blend


def train_with_reference(engine: sa.Engine, version: str, *,
                         failure_injection: training.FailureInjection = None) -> ChurnModel:
    """``training.train`` whose model carries the serving reference for drift."""
    history, feedback = training.load_history(engine), training.load_feedback(engine)
    model = training.train_from_history(history, feedback, version,
                                        failure_injection=failure_injection)
    rows, scores = serving_reference(history, model)
    return replace(model, reference=rows, reference_scores=scores)
