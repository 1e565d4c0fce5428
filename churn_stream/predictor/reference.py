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

from churn_stream import storage, training
from churn_stream.features import replay
from churn_stream.history import load_history
from churn_stream.models import ChurnModel

REFERENCE_DAYS = 3.0
"""Days at the end of the training history that the reference describes."""
REFERENCE_BATCH_EVENTS = 1
"""Events per replayed micro-batch: one, as a live stream meets it (micro-batches there span
milliseconds, so each user is read right after their own event)."""
REFERENCE_ROWS = 5000
"""Most reference rows kept (a seeded sample)."""
REFERENCE_USERS = 2000
"""Most users whose history is read for the reference (a seeded sample of the recent ones)."""
FIRST_RUN_MAX_EXAMPLES = 5000
"""Fit examples of a smaller first run at most (a full run fits ``training.MAX_EXAMPLES``)."""
FIRST_RUN_REFERENCE_ROWS = 2000
FIRST_RUN_REFERENCE_USERS = 500
"""The reference of a smaller first run: about 3 s instead of 11 s on 10,000 users."""


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


def recent_users(engine: sa.Engine, days: float, max_users: int, seed: int = 0) -> list[str]:
    """A seeded sample of the users active in the last ``days`` of stored activity."""
    table = storage.user_activity
    with engine.connect() as conn:
        latest = conn.execute(sa.select(sa.func.max(table.c.ts))).scalar_one_or_none()
        if latest is None:
            return []
        since = latest - timedelta(days=days)
        query = sa.select(table.c.user_id).where(table.c.ts >= since).distinct()
        users = sorted(conn.execute(query).scalars().all())
    if len(users) <= max_users:
        return users
    return sorted(np.random.default_rng(seed).choice(users, max_users, replace=False).tolist())


def serving_reference(engine: sa.Engine, model: ChurnModel, days: float = REFERENCE_DAYS,
                      max_users: int = REFERENCE_USERS,
                      max_rows: int = REFERENCE_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Feature rows and blended scores of the reference (see the module docstring)."""
    history = load_history(engine, user_ids=recent_users(engine, days, max_users))
    if history.empty:
        return np.zeros((0, len(model.space.feature_names)), np.float32), np.zeros(0)
    queries = serving_queries(history, days, max_rows=max_rows)
    X, S, _ = replay(history, queries, model.space)
    return X, model.score(X, S).blend


def train_with_reference(engine: sa.Engine, version: str, *,
                         failure_injection: training.FailureInjection = None,
                         max_users: int = training.MAX_USERS,
                         progress: training.Progress | None = None) -> ChurnModel:
    """``training.train`` whose model carries the serving reference for drift.

    A run of fewer than ``training.MAX_USERS`` users (the predictor's smaller first run)
    also fits fewer examples and builds a smaller reference (the ``FIRST_RUN_*`` bounds):
    the sequence model's epochs and the reference's replay take time by the row.
    """
    full = max_users >= training.MAX_USERS
    model = training.train(
        engine, version, failure_injection=failure_injection, max_users=max_users,
        max_examples=training.MAX_EXAMPLES if full else FIRST_RUN_MAX_EXAMPLES,
        progress=progress)
    if progress is not None:
        progress("reference", 1.0)
    rows, scores = serving_reference(
        engine, model, max_users=REFERENCE_USERS if full else FIRST_RUN_REFERENCE_USERS,
        max_rows=REFERENCE_ROWS if full else FIRST_RUN_REFERENCE_ROWS)
    return replace(model, reference=rows, reference_scores=scores)
