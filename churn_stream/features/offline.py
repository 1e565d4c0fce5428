"""The offline side: history replayed through a ``FeatureStore`` as of chosen cutoffs."""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Snapshot:
    """The state of some users as it was when their query rows were read."""

    store: FeatureStore
    user_ids: list[str]
    as_of_s: np.ndarray
    """Each row's as-of time, in seconds since 2000."""
    rows: np.ndarray
    """Positions of these rows among the queries."""

    def matrix(self, space: FeatureSpace) -> tuple[np.ndarray, np.ndarray]:
        """The rows again, in the columns of ``space``."""
        return self.store.matrix_at_seconds(self.user_ids, self.as_of_s, space)


def features_at(
    history: pd.DataFrame, queries: pd.DataFrame, space: FeatureSpace
) -> tuple[np.ndarray, np.ndarray]:
    """Features of each ``(user_id, cutoff)`` query row, from the user's events up to cutoff.

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

    Queries may carry ``batch_at``, a later moment at which to read them (many cutoffs then
    share one pause of the replay); a row's user must have no event between its cutoff and
    its ``batch_at``, which is checked. The kept state lets another model, with another
    feature space, read the same examples.
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
    as_of_ns = pd.to_datetime(queries["cutoff"], utc=True).to_numpy("datetime64[ns]").astype(
        np.int64)
    pauses = pd.to_datetime(queries.get("batch_at", queries["cutoff"]), utc=True)
    done = 0
    for pause, rows in queries.groupby(pauses, sort=True).indices.items():
        upto = int(np.searchsorted(ns, pd.Timestamp(pause).value, side="right"))
        if upto > done:
            users, types, numeric, categorical = (c[done:upto] for c in columns)
            store.update_columns(users, types, ts_s[done:upto], numeric, categorical)
        done = upto
        users = queries["user_id"].iloc[rows].tolist()
        as_of_s = as_of_ns[rows] // 1_000_000_000 - EPOCH_S
        store.check_nothing_after(users, as_of_s)
        X[rows], S[rows] = store.matrix_at_seconds(users, as_of_s, space)
        if keep is not None and keep[rows].any():
            flagged = keep[rows]
            kept = [u for u, k in zip(users, flagged, strict=True) if k]
            snapshots.append(Snapshot(store.subset(kept), kept, as_of_s[flagged], rows[flagged]))
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
