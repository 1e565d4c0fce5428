"""Per-user state of the partitions this instance owns, rebuilt from the database on first sight.

A user's events all go to one partition, so one instance holds each user's state. When a
partition moves here (a rebalance, a restart) its users are unknown; before such a user is
scored for the first time, their history is read from ``user_activity`` (what the consumer
stored before the first event in hand) and replayed into the feature store. Replaying only
what precedes the batch keeps an event from being counted twice when it is both in the table
and in the batch, as happens when a batch is redelivered after a crash.
"""

import logging
import threading
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import NamedTuple

import numpy as np
import pandas as pd
import sqlalchemy as sa

from churn_stream.features import FeatureSpace, FeatureStore
from churn_stream.features.shared import SharedArrays
from churn_stream.history import load_history
from churn_stream.predictor.batching import Received
from churn_stream.predictor.metrics import STATE_BYTES, TRACKED_USERS, USERS_REBUILT

log = logging.getLogger(__name__)


class Features(NamedTuple):
    """One user's feature rows and sequences, and the moment they describe."""

    rows: np.ndarray
    sequences: np.ndarray
    as_of: datetime


def stored_features(engine: sa.Engine, user_id: str, as_of: datetime,
                    space: FeatureSpace) -> Features | None:
    """``user_id``'s features from their stored history (as of ``as_of``, or their last event
    if that is later); None if nothing is stored."""
    past = load_history(engine, user_ids=[user_id])
    if past.empty:
        return None
    scratch = FeatureStore(space, capacity=1)
    scratch.update_frame(past)
    moment = max(as_of, past["ts"].iloc[-1].to_pydatetime())
    return Features(*scratch.matrix([user_id], moment, space), moment)


class UserState:
    """The feature store of this instance, safe to read from the HTTP thread."""

    def __init__(self, store: FeatureStore, engine: sa.Engine) -> None:
        self.store = store
        self.engine = engine
        self.lock = threading.Lock()
        self.partition_of: dict[str, int] = {}
        self.clock: datetime | None = None
        """The stream's clock: the latest event time seen by this instance."""
        self.shared: SharedArrays | None = None

    def share(self, shared: SharedArrays) -> None:
        """Keep the state, and the stream's clock, in ``shared`` memory for a reading process
        (the HTTP API's)."""
        with self.lock:
            self.shared = shared
            self.store.share(shared)
            if self.clock is not None:
                shared.set_clock(self.clock)

    def apply(self, received: Sequence[Received]) -> None:
        """Rebuild the users seen for the first time, then add the batch's events."""
        first_ts: dict[str, datetime] = {}
        for item in received:
            first_ts.setdefault(item.event.user_id, item.event.ts)
        new_users = [u for u in first_ts if u not in self.store]
        history = self._history(new_users, first_ts) if new_users else None
        events = [item.event for item in received]
        latest = max(e.ts for e in events)
        with self.lock:
            self.clock = latest if self.clock is None else max(self.clock, latest)
            if self.shared is not None:
                # Before the events: a reader that copies a user's state and then reads the
                # clock never gets a moment earlier than the events in its copy.
                self.shared.set_clock(self.clock)
            if history is not None:
                self.store.forget(new_users)
                self.store.update_frame(history)
            self.store.update(events)
            for item in received:
                self.partition_of[item.event.user_id] = item.partition
        USERS_REBUILT.inc(len(new_users))
        self.export()

    def _history(self, user_ids: list[str],
                 before: dict[str, datetime] | None = None) -> pd.DataFrame:
        """The users' stored events (older than ``before[user]``, if given), in time order."""
        until = max(before.values()) if before else None
        frame = load_history(self.engine, until=until, user_ids=user_ids)
        if before is None or frame.empty:
            return frame
        cut = pd.to_datetime(frame["user_id"].map(before), utc=True)
        return frame[frame["ts"] < cut].reset_index(drop=True)

    def matrix(self, user_ids: Sequence[str], as_of: datetime,
               space: FeatureSpace) -> tuple[np.ndarray, np.ndarray]:
        """Feature rows and sequences of ``user_ids`` as of ``as_of``."""
        with self.lock:
            return self.store.matrix(user_ids, as_of, space)

    def now(self) -> datetime:
        """The stream's clock, or the wall clock before any event arrived."""
        return self.clock or datetime.now(UTC)

    def tracked(self) -> int:
        """Users whose state this instance holds."""
        return len(self.store)

    def held(self, user_id: str, space: FeatureSpace) -> Features | None:
        """One user's features now if this instance holds their state (no I/O); else None."""
        with self.lock:
            as_of = self.now()
            if user_id in self.store:
                return Features(*self.store.matrix([user_id], as_of, space), as_of)
        return None

    def lookup(self, user_id: str, space: FeatureSpace) -> Features | None:
        """One user's features now: from the store, else from stored history; None if unknown.

        A user read from the database is not added to the store: their partition may belong
        to another instance.
        """
        return self.held(user_id, space) or stored_features(self.engine, user_id, self.now(),
                                                            space)

    def forget_partitions(self, partitions: Iterable[int]) -> int:
        """Drop the state of every user of ``partitions``; returns how many were dropped."""
        gone = set(partitions)
        with self.lock:
            users = [u for u, p in self.partition_of.items() if p in gone]
            self.store.forget(users)
            for user_id in users:
                del self.partition_of[user_id]
        self.export()
        return len(users)

    def export(self) -> None:
        """Publish the state's size as gauges."""
        TRACKED_USERS.set(len(self.store))
        STATE_BYTES.set(self.store.nbytes())
