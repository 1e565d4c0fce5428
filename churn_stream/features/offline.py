"""The offline side: history replayed through a ``FeatureStore`` as of chosen cutoffs."""

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from churn_stream.events import Event
from churn_stream.features.common import EPOCH_S, frame_ns
from churn_stream.features.space import FeatureSpace
from churn_stream.features.store import FeatureStore
from churn_stream.storage import from_db_time


def events_from_rows(rows: Iterable[Any]) -> list[Event]:
    """Events from ``user_activity`` rows (mappings or SQLAlchemy rows), e.g. for ``rebuild``."""
    events = []
    for row in rows:
        values = row if isinstance(row, Mapping) else row._mapping
        ts = values["ts"]
        events.append(Event(
            event_id=values["event_id"], user_id=values["user_id"],
            event_type=values["event_type"],
            ts=from_db_time(ts) if ts.tzinfo is None else ts,
            numeric=values["numeric_values"] or {}, categorical=values["categorical_values"] or {},
        ))
    return events


def in_time_order(history: pd.DataFrame) -> pd.DataFrame:
    """``history`` sorted by event time, keeping the given order among equal times."""
    return history.iloc[_time_order(frame_ns(history))].reset_index(drop=True)


def _time_order(ns: np.ndarray) -> np.ndarray:
    """Positions in time order, stable among equal times."""
    if ns.size < 2 or bool(np.all(ns[1:] >= ns[:-1])):
        return np.arange(ns.size)
    return np.argsort(ns, kind="stable")


Snapshot = tuple[pd.Timestamp, FeatureStore, np.ndarray]
"""(cutoff, the state of some users at that cutoff, the query rows they answer)."""


def features_at(
    history: pd.DataFrame, queries: pd.DataFrame, space: FeatureSpace
) -> tuple[np.ndarray, np.ndarray]:
    """Features of each ``(user_id, cutoff)`` query row, from events with ``ts <= cutoff``.

    History is replayed once through a ``FeatureStore`` in time order, pausing at each
    distinct cutoff to read the users asked about then: the serving code path, no leakage.
    """
    X, S, _ = replay(history, queries, space)
    return X, S


def replay(
    history: pd.DataFrame, queries: pd.DataFrame, space: FeatureSpace,
    keep: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, list[Snapshot]]:
    """``features_at``, also keeping the state behind the query rows flagged in ``keep``.

    The kept state lets another model, with another feature space, read the same examples.
    """
    snapshots: list[Snapshot] = []
    ns = frame_ns(history)
    order = _time_order(ns)
    ns = ns[order]
    ts_s = ns // 1_000_000_000 - EPOCH_S
    columns = [history[c].to_numpy()[order]
               for c in ("user_id", "event_type", "numeric_values", "categorical_values")]
    store = FeatureStore(space)
    X = np.zeros((len(queries), len(space.feature_names)), np.float32)
    S = np.zeros((len(queries), space.sequence_days, len(space.sequence_channels)), np.float32)
    cutoffs = pd.to_datetime(queries["cutoff"], utc=True)
    done = 0
    for cutoff, rows in queries.groupby(cutoffs, sort=True).indices.items():
        upto = int(np.searchsorted(ns, pd.Timestamp(cutoff).value, side="right"))
        if upto > done:
            users, types, numeric, categorical = (c[done:upto] for c in columns)
            store.update_columns(users, types, ts_s[done:upto], numeric, categorical)
        done = upto
        users = queries["user_id"].iloc[rows].tolist()
        X[rows], S[rows] = store.matrix(users, pd.Timestamp(cutoff).to_pydatetime(), space)
        if keep is not None and keep[rows].any():
            flagged = rows[keep[rows]]
            kept = store.subset(queries["user_id"].iloc[flagged].tolist())
            snapshots.append((pd.Timestamp(cutoff), kept, flagged))
    return X, S, snapshots


def offline_features(
    history: pd.DataFrame, cutoff: datetime, space: FeatureSpace
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every user with an event at or before ``cutoff``, and their features as of it."""
    seen = history[pd.to_datetime(history["ts"], utc=True) <= pd.Timestamp(cutoff)]
    user_ids = sorted(seen["user_id"].unique().tolist())
    queries = pd.DataFrame({"user_id": user_ids, "cutoff": [cutoff] * len(user_ids)})
    X, S = features_at(seen, queries, space)
    return user_ids, X, S
