"""``FeatureStore``: online per-user state, O(1) work per event, a few hundred bytes a user."""

import logging
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pandas as pd

from churn_stream.events import Event
from churn_stream.features import state as st
from churn_stream.features.common import (
    DAY_S,
    EPOCH,
    LATEST_S,
    MAX_CATEGORIES,
    MAX_PAIRS,
    MAX_TYPES,
    MAX_VALUES,
    NEVER_S,
    OTHER_TYPE,
    OVERFLOW_CODE,
    frame_seconds,
    seconds,
)
from churn_stream.features.reader import Reader
from churn_stream.features.shared import SharedArrays
from churn_stream.features.space import FeatureSpace

log = logging.getLogger(__name__)

INT_BYTES = sys.getsizeof(2**20)


@dataclass
class _Batch:
    """Events as columns: what ``FeatureStore._apply`` consumes."""

    slot: np.ndarray
    ts_s: np.ndarray
    channel: np.ndarray
    num_event: np.ndarray
    num_pair: np.ndarray
    num_value: np.ndarray
    cat_event: np.ndarray
    cat_key: np.ndarray
    cat_code: np.ndarray


class FeatureStore:
    """Online per-user state; ``matrix`` turns it into feature rows for any ``FeatureSpace``.

    Events of one user must arrive in time order (as one Kafka partition delivers them);
    ``matrix`` must be asked as of a time no earlier than the events it has been fed.
    Safe to share between the consume loop and HTTP handlers: one lock guards the state.
    """

    def __init__(self, space: FeatureSpace | None = None, capacity: int = 1024) -> None:
        self._lock = threading.RLock()
        self._slots: dict[str, int] = {}
        self._free: list[int] = []
        self._used = 0
        self._types: dict[str, int] = {}
        self._pairs: dict[tuple[str, str], int] = {}
        self._keys: dict[str, int] = {}
        self._codes: list[dict[str, int]] = []
        self._ignored: set[str] = set()
        self._key_bytes = 0
        self._capacity = max(int(capacity), 1)
        self._shared: SharedArrays | None = None
        self._change = _Change()
        self._state = st.allocate(self._capacity, 0, 0, 0)
        if space is not None:
            for kind in space.event_types:
                self._type_channel(kind)
            for pair in space.numeric_pairs:
                self._pair_index(pair)
            for key, _ in space.categories:
                self._category_code(key, None)

    def __getstate__(self) -> dict[str, Any]:
        """The state without its lock or sharing (arrays are copied), so that a store can
        cross to another process."""
        with self._lock:
            kept = {name: value for name, value in vars(self).items()
                    if name not in ("_lock", "_shared", "_change")}
            return kept | {"_state": {name: a.copy() for name, a in self._state.items()}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self._lock = threading.RLock()
        self._shared, self._change = None, _Change()

    @classmethod
    def of_rows(cls, user_id: str, vocabulary: dict[str, Any],
                rows: dict[str, np.ndarray]) -> "FeatureStore":
        """A store holding one user: their state ``rows`` (one row per array) described by
        ``vocabulary`` (as ``vocabulary()`` gives it)."""
        store = cls(capacity=1)
        store._types, store._pairs = vocabulary["types"], vocabulary["pairs"]
        store._keys, store._codes = vocabulary["keys"], vocabulary["codes"]
        store._state, store._slots, store._used = rows, {user_id: 0}, 1
        return store

    def vocabulary(self) -> dict[str, Any]:
        """Copies of what the state's columns stand for: event types, numeric properties,
        categorical attributes and their values' codes."""
        with self._lock:
            return {"types": dict(self._types), "pairs": dict(self._pairs),
                    "keys": dict(self._keys), "codes": [dict(c) for c in self._codes]}

    def share(self, shared: SharedArrays) -> None:
        """Move the state arrays into ``shared`` memory; from now on every change is counted
        and told to its reader (see ``features.shared``)."""
        with self._lock:
            self._shared = shared
            self._resize()

    def connect_reader(self, reader: Connection) -> None:
        """Give ``reader`` (a process's end of a socket pipe) the shared state and its index."""
        with self._lock:
            if self._shared is None:
                raise RuntimeError("the store is not shared: call share() first")
            self._shared.connect(reader, {"slots": dict(self._slots),
                                          "vocabulary": self.vocabulary()})

    @contextmanager
    def _changing(self) -> Iterator[None]:
        """Count one change of a shared store and send what it did (outermost call only)."""
        change, shared = self._change, self._shared
        if shared is None or change.depth:
            change.depth += 1
            try:
                yield
            finally:
                change.depth -= 1
            return
        change.start(self._vocabulary_size())
        shared.begin()
        try:
            yield
        finally:
            change.depth = 0
            grown = self._vocabulary_size() != change.vocabulary_size
            shared.end({"assigned": change.assigned, "forgotten": change.forgotten,
                        "vocabulary": self.vocabulary() if grown else None},
                       new_arrays=change.new_arrays)

    def _vocabulary_size(self) -> tuple[int, ...]:
        return (len(self._types), len(self._pairs), len(self._keys),
                *(len(c) for c in self._codes))

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._slots

    def nbytes(self) -> int:
        """Bytes held for users: the state arrays plus the ``user_id -> slot`` dict."""
        with self._lock:
            arrays = sum(a.nbytes for a in self._state.values())
            # Key sizes are tallied as users come and go, so this stays O(1) at a million
            # users; each slot number is an int object of its own.
            index = sys.getsizeof(self._slots) + self._key_bytes + INT_BYTES * len(self._slots)
            return arrays + index + sys.getsizeof(self._free)

    def update(self, events: Sequence[Event]) -> None:
        """Fold a micro-batch of events (any users, time order per user) into the state."""
        if not events:
            return
        ts_s = np.fromiter(((e.ts - EPOCH) // timedelta(seconds=1) for e in events), np.int64,
                           len(events))
        self.update_columns([e.user_id for e in events], [e.event_type for e in events], ts_s,
                            [e.numeric for e in events], [e.categorical for e in events])

    def update_frame(self, frame: pd.DataFrame) -> None:
        """Fold ``user_activity`` rows (a DataFrame in time order per user) into the state."""
        if not frame.empty:
            self.update_columns(frame["user_id"].to_numpy(), frame["event_type"].to_numpy(),
                                frame_seconds(frame), frame["numeric_values"].to_numpy(),
                                frame["categorical_values"].to_numpy())

    def update_columns(self, user_ids: Sequence[str], event_types: Sequence[str],
                       ts_s: np.ndarray, numeric: Sequence[dict], categorical: Sequence[dict],
                       ) -> None:
        """``update`` for events given as columns; ``ts_s`` in seconds since 2000 (UTC)."""
        numerics = [(i, event_types[i], k, v)
                    for i, values in enumerate(numeric) if values for k, v in values.items()]
        categoricals = [(i, k, v)
                        for i, values in enumerate(categorical) if values
                        for k, v in values.items()]
        with self._lock, self._changing():
            self._apply(self._batch(user_ids, event_types, ts_s, numerics, categoricals))

    def rebuild(self, user_id: str, events: Sequence[Event]) -> None:
        """Replace one user's state by the state of ``events`` (their stored history)."""
        strangers = {e.user_id for e in events} - {user_id}
        if strangers:
            raise ValueError(f"rebuild of {user_id} got events of {sorted(strangers)[:3]}")
        with self._lock, self._changing():
            self.forget([user_id])
            self.update(sorted(events, key=lambda e: e.ts))

    def forget(self, user_ids: Iterable[str]) -> None:
        """Drop users' state; their slots are reused by new users."""
        with self._lock, self._changing():
            gone = [u for u in dict.fromkeys(user_ids) if u in self._slots]
            slots = [self._slots.pop(u) for u in gone]
            if self._shared is not None:
                self._change.forgotten.extend(gone)
            self._key_bytes -= sum(sys.getsizeof(u) for u in gone)
            if slots:
                st.reset(self._state, np.array(slots))
                self._free.extend(slots)

    def subset(self, user_ids: Iterable[str]) -> "FeatureStore":
        """A separate store with copies of these users' state (users not tracked are skipped)."""
        with self._lock:
            kept = [u for u in dict.fromkeys(user_ids) if u in self._slots]
            rows = np.array([self._slots[u] for u in kept], dtype=np.int64)
            copy = FeatureStore(capacity=max(len(kept), 1))
            copy._types, copy._pairs, copy._keys = dict(self._types), dict(self._pairs), dict(
                self._keys)
            copy._codes = [dict(codes) for codes in self._codes]
            copy._state = st.allocate(copy._capacity, len(self._types), len(self._pairs),
                                    len(self._keys))
            for name, array in self._state.items():
                copy._state[name][: len(kept)] = array[rows]
            copy._slots = {u: i for i, u in enumerate(kept)}
            copy._key_bytes = sum(sys.getsizeof(u) for u in kept)
            copy._used = len(kept)
            return copy

    def user_ids(self) -> list[str]:
        """Every tracked user."""
        with self._lock:
            return list(self._slots)

    def matrix(
        self, user_ids: Sequence[str], as_of: datetime | Sequence[datetime], space: FeatureSpace
    ) -> tuple[np.ndarray, np.ndarray]:
        """Static features ``X`` (n, features) and sequences ``S`` (n, days, channels).

        ``as_of`` is one moment for all rows or one per row. A user the store does not
        track gets the row of a user with no history.
        """
        if isinstance(as_of, datetime):
            moments = np.int64(seconds(as_of))
        else:
            moments = np.array([seconds(m) for m in as_of], dtype=np.int64)
            if len(moments) != len(user_ids):
                raise ValueError(f"{len(moments)} as-of times for {len(user_ids)} users")
        return self.matrix_at_seconds(user_ids, moments, space)

    def matrix_at_seconds(self, user_ids: Sequence[str], as_of_s: np.ndarray | np.int64,
                          space: FeatureSpace) -> tuple[np.ndarray, np.ndarray]:
        """``matrix`` with as-of times in seconds since 2000 (one, or one per row)."""
        with self._lock:
            slots = np.array([self._slots.get(u, -1) for u in user_ids], dtype=np.int64)
            return Reader(self, slots, as_of_s, space).read()

    def check_nothing_after(self, user_ids: Sequence[str], as_of_s: np.ndarray) -> None:
        """Raise if any of these users has an event later than their as-of time."""
        with self._lock:
            slots = np.array([self._slots.get(u, -1) for u in user_ids], dtype=np.int64)
            latest = np.where(slots >= 0, self._state["last_s"][slots], NEVER_S)
        late = np.flatnonzero(latest > as_of_s)
        if late.size:
            raise ValueError(f"user {user_ids[late[0]]} has events after the as-of time "
                             "of a feature row: they would leak into it")

    # -- writing ----------------------------------------------------------------------------

    def _batch(self, users: Sequence[str], types: Sequence[str], ts_s: np.ndarray,
               numerics: list[tuple], categoricals: list[tuple]) -> _Batch:
        if ts_s.min() <= NEVER_S or ts_s.max() >= LATEST_S:
            raise ValueError("event time outside 1932..2068 cannot be stored")
        numeric = [(i, self._pair_index((kind, key)), v) for i, kind, key, v in numerics]
        numeric = [n for n in numeric if n[1] >= 0]
        categorical = [(i, self._key_index(k), self._category_code(k, v))
                       for i, k, v in categoricals]
        categorical = [c for c in categorical if c[1] >= 0]
        return _Batch(
            slot=_lookup(users, self._slot),
            ts_s=ts_s.astype(np.int64),
            channel=_lookup(types, self._type_channel),
            num_event=np.array([n[0] for n in numeric], dtype=np.int64),
            num_pair=np.array([n[1] for n in numeric], dtype=np.int64),
            num_value=np.array([n[2] for n in numeric], dtype=np.float64),
            cat_event=np.array([c[0] for c in categorical], dtype=np.int64),
            cat_key=np.array([c[1] for c in categorical], dtype=np.int64),
            cat_code=np.array([c[2] for c in categorical], dtype=np.int64),
        )

    def _slot(self, user_id: str) -> int:
        slot = self._slots.get(user_id)
        if slot is None:
            if self._free:
                slot = self._free.pop()
            else:
                slot = self._used
                self._used += 1
                if slot >= self._capacity:
                    self._resize(capacity=self._capacity * 2)
            self._slots[user_id] = slot
            self._key_bytes += sys.getsizeof(user_id)
            if self._shared is not None:
                self._change.assigned.append((user_id, slot))
        return slot

    def _type_channel(self, kind: str) -> int:
        channel = self._types.get(kind)
        if channel is None:
            if len(self._types) >= MAX_TYPES - 1 and kind != OTHER_TYPE:
                log.warning("event type %s beyond the first %d types: counted as %s",
                            kind, MAX_TYPES - 1, OTHER_TYPE)
                return self._type_channel(OTHER_TYPE)
            channel = self._types[kind] = len(self._types)
            self._resize()
        return channel

    def _pair_index(self, pair: tuple[str, str]) -> int:
        index = self._pairs.get(pair)
        if index is None:
            if len(self._pairs) >= MAX_PAIRS:
                return self._beyond_limit("numeric property", ".".join(pair), MAX_PAIRS)
            index = self._pairs[pair] = len(self._pairs)
            self._resize()
        return index

    def _key_index(self, key: str) -> int:
        index = self._keys.get(key)
        if index is None:
            if len(self._keys) >= MAX_CATEGORIES:
                return self._beyond_limit("categorical attribute", key, MAX_CATEGORIES)
            index = self._keys[key] = len(self._keys)
            self._codes.append({})
            self._resize()
        return index

    def _beyond_limit(self, what: str, name: str, limit: int) -> int:
        if name not in self._ignored:
            self._ignored.add(name)
            log.warning("%s %s ignored by the feature store: it tracks at most %d",
                        what, name, limit)
        return -1

    def _category_code(self, key: str, value: str | None) -> int:
        index = self._key_index(key)
        if value is None or index < 0:
            return 0
        codes = self._codes[index]
        code = codes.get(value)
        if code is None:
            if len(codes) >= MAX_VALUES:
                return OVERFLOW_CODE
            code = codes[value] = len(codes) + 1
        return code

    def _resize(self, capacity: int | None = None) -> None:
        self._capacity = capacity or self._capacity
        make = None if self._shared is None else self._shared.allocate
        fresh = st.allocate(self._capacity, len(self._types), len(self._pairs), len(self._keys),
                            make)
        self._change.new_arrays |= make is not None
        for name, old in self._state.items():
            fresh[name][tuple(slice(0, n) for n in old.shape)] = old
        self._state = fresh

    def _apply(self, batch: _Batch) -> None:
        state, slot, ts = self._state, batch.slot, batch.ts_s.astype(np.int32)
        np.minimum.at(state["first_s"], slot, ts)
        np.maximum.at(state["last_s"], slot, ts)
        np.maximum.at(state["type_last_s"], (slot, batch.channel), ts)
        np.add.at(state["total"], slot, 1)
        np.add.at(state["type_total"], (slot, batch.channel), 1)
        st.add_to_ring(state, slot, batch.ts_s // DAY_S, batch.channel)
        if batch.num_event.size:
            st.add_numeric(state, slot[batch.num_event], batch.ts_s[batch.num_event],
                         batch.num_pair, batch.num_value, batch.num_event)
        if batch.cat_event.size:
            st.set_categories(state, slot[batch.cat_event], batch.cat_key, batch.cat_code,
                            batch.cat_event)



@dataclass
class _Change:
    """What one change of a shared store did, for its reader."""

    depth: int = 0
    assigned: list[tuple[str, int]] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    new_arrays: bool = False
    vocabulary_size: tuple[int, ...] = ()

    def start(self, vocabulary_size: tuple[int, ...]) -> None:
        self.depth, self.assigned, self.forgotten = 1, [], []
        self.new_arrays, self.vocabulary_size = False, vocabulary_size


def _lookup(names: Sequence[str], index_of: Callable[[str], int]) -> np.ndarray:
    """``index_of`` of every name, called once per distinct name."""
    codes, distinct = pd.factorize(np.asarray(names, dtype=object))
    return np.array([index_of(n) for n in distinct], dtype=np.int64)[codes]
