"""Per-user features from events, by one code path for serving and for training.

``FeatureStore`` keeps each tracked user's state in numpy arrays (one row per user, found
through a ``user_id -> slot`` dict): a ring buffer of daily event counts per event type, the
last time of each type, exponentially decayed sums of numeric properties and the latest
categorical attributes. Updating costs O(1) per event and the state is a few hundred bytes a
user. Training replays history through the very same store (``offline_features``), so a
feature served online equals the feature the model was trained on.

``FeatureSpace`` is what a model was trained with: which event types, numeric properties and
category values become columns. It is learned from training history; the store itself
tracks whatever the stream carries, so a new model with a wider space reads the same state.
"""

import logging
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from churn_stream.events import Event
from churn_stream.storage import from_db_time

log = logging.getLogger(__name__)

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
EPOCH_NS = pd.Timestamp(EPOCH).value
DAY_S = 86_400
RING_DAYS = 28
"""Days of daily counts kept per user; serves the long window and the sequence model."""
SHORT_DAYS = 7
LONG_DAYS = RING_DAYS
RECENCY_CAP_DAYS = 60.0
"""Recency of an event type never seen, or seen longer ago than this, reads as this."""
TAU_S = (SHORT_DAYS * DAY_S, LONG_DAYS * DAY_S, SHORT_DAYS * DAY_S)
"""Time constants of the decayed numeric state: short sum, long sum, short count."""

MAX_TYPES = 64
MAX_PAIRS = 32
MAX_CATEGORIES = 32
MAX_VALUES = 1000
OTHER_TYPE = "_other"
"""Channel for event types beyond ``MAX_TYPES``; real type names cannot start with ``_``."""
OTHER_VALUE = "<other>"
NEVER_S = np.iinfo(np.int32).min
LATEST_S = np.iinfo(np.int32).max
EMPTY_DAY = -(2**30)
COUNT_MAX = np.iinfo(np.uint8).max
"""Daily counts saturate here: one byte per type and day keeps a user under 1 KB."""
OVERFLOW_CODE = -1
TYPE_STATS = ("count_7d", "count_28d", "trend", "days_since_last")
NUMERIC_STATS = ("sum_7d", "sum_28d", "mean_7d", "mean", "last")


@dataclass(frozen=True)
class FeatureSpace:
    """The columns a model sees: learned from training history, then fixed."""

    event_types: tuple[str, ...]
    numeric_pairs: tuple[tuple[str, str], ...]
    """(event type, numeric property) pairs, e.g. ``("session_end", "duration_s")``."""
    categories: tuple[tuple[str, tuple[str, ...]], ...]
    """Categorical attributes and the values seen in training; others read as ``<other>``."""
    sequence_days: int = RING_DAYS
    feature_names: tuple[str, ...] = field(init=False)
    sequence_channels: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.sequence_days <= RING_DAYS:
            raise ValueError(f"sequence_days must be within 1..{RING_DAYS}")
        object.__setattr__(self, "feature_names", tuple(self._names()))
        object.__setattr__(self, "sequence_channels", (*self.event_types, "all"))

    def _names(self) -> Iterator[str]:
        yield from ("tenure_days", "all:events_per_day", "all:days_since_last")
        yield from ("all:count_7d", "all:count_28d", "all:trend")
        yield from ("all:active_days_7d", "all:active_days_28d")
        for kind in self.event_types:
            yield from (f"{kind}:{stat}" for stat in TYPE_STATS)
        for kind, key in self.numeric_pairs:
            yield from (f"{kind}.{key}:{stat}" for stat in NUMERIC_STATS)
        for key, values in self.categories:
            yield from (f"{key}={v}" for v in (*values, OTHER_VALUE))

    @classmethod
    def learn(
        cls,
        history: pd.DataFrame,
        max_types: int = 48,
        max_pairs: int = 24,
        max_categories: int = 16,
        max_values: int = 20,
        min_value_count: int = 2,
    ) -> "FeatureSpace":
        """The space of ``history`` (``user_activity`` rows): its most frequent names."""
        if history.empty:
            raise ValueError("cannot learn a feature space from an empty history")
        types = _top(Counter(history["event_type"]), max_types)
        pairs: Counter = Counter()
        keys: Counter = Counter()
        values: dict[str, Counter] = {}
        for kind, numeric in zip(history["event_type"], history["numeric_values"], strict=True):
            pairs.update((kind, key) for key in numeric or ())
        for categorical in history["categorical_values"]:
            for key, value in (categorical or {}).items():
                keys[key] += 1
                values.setdefault(key, Counter())[value] += 1
        categories = []
        for key in _top(keys, max_categories):
            common = {v: n for v, n in values[key].items() if n >= min_value_count}
            categories.append((key, _top(Counter(common), max_values)))
        return cls(types, _top(pairs, max_pairs), tuple(categories))

    def vector(self, row: Mapping[str, float]) -> np.ndarray:
        """A feature row from a ``{name: value}`` mapping; absent names become NaN."""
        unknown = set(row) - set(self.feature_names)
        if unknown:
            raise ValueError(f"unknown feature names: {sorted(unknown)[:5]}")
        return np.array([row.get(n, np.nan) for n in self.feature_names], dtype=np.float32)


def _top(counts: Counter, limit: int) -> tuple:
    """The ``limit`` most frequent keys (ties by key), in sorted order for stable columns."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    return tuple(sorted(k for k, _ in ranked))


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
        self._capacity = max(int(capacity), 1)
        self._state = _allocate(self._capacity, 0, 0, 0)
        if space is not None:
            for kind in space.event_types:
                self._type_channel(kind)
            for pair in space.numeric_pairs:
                self._pair_index(pair)
            for key, _ in space.categories:
                self._category_code(key, None)

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._slots

    def nbytes(self) -> int:
        """Bytes held for users: the state arrays plus the ``user_id -> slot`` dict."""
        import sys

        with self._lock:
            arrays = sum(a.nbytes for a in self._state.values())
            index = sys.getsizeof(self._slots) + sum(
                sys.getsizeof(u) + sys.getsizeof(s) for u, s in self._slots.items()
            )
            return arrays + index + sys.getsizeof(self._free) + 8 * len(self._free)

    def update(self, events: Sequence[Event]) -> None:
        """Fold a micro-batch of events (any users, time order per user) into the state."""
        if not events:
            return
        numerics = [(i, e.event_type, k, v)
                    for i, e in enumerate(events) for k, v in e.numeric.items()]
        categoricals = [(i, k, v) for i, e in enumerate(events) for k, v in e.categorical.items()]
        ts_s = np.fromiter(((e.ts - EPOCH) // timedelta(seconds=1) for e in events), np.int64,
                           len(events))
        with self._lock:
            self._apply(self._batch([e.user_id for e in events], [e.event_type for e in events],
                                    ts_s, numerics, categoricals))

    def update_frame(self, frame: pd.DataFrame) -> None:
        """Fold ``user_activity`` rows (a DataFrame in time order per user) into the state."""
        if frame.empty:
            return
        ts_s = _frame_ns(frame) // 1_000_000_000 - EPOCH_NS // 1_000_000_000
        types = frame["event_type"].tolist()
        numerics = [(i, types[i], k, v)
                    for i, values in enumerate(frame["numeric_values"]) if values
                    for k, v in values.items()]
        categoricals = [(i, k, v)
                        for i, values in enumerate(frame["categorical_values"]) if values
                        for k, v in values.items()]
        with self._lock:
            self._apply(self._batch(frame["user_id"].tolist(), types, ts_s, numerics,
                                    categoricals))

    def rebuild(self, user_id: str, events: Sequence[Event]) -> None:
        """Replace one user's state by the state of ``events`` (their stored history)."""
        strangers = {e.user_id for e in events} - {user_id}
        if strangers:
            raise ValueError(f"rebuild of {user_id} got events of {sorted(strangers)[:3]}")
        with self._lock:
            self.forget([user_id])
            self.update(sorted(events, key=lambda e: e.ts))

    def forget(self, user_ids: Iterable[str]) -> None:
        """Drop users' state; their slots are reused by new users."""
        with self._lock:
            slots = [self._slots.pop(u) for u in user_ids if u in self._slots]
            if slots:
                _reset(self._state, np.array(slots))
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
            copy._state = _allocate(copy._capacity, len(self._types), len(self._pairs),
                                    len(self._keys))
            for name, array in self._state.items():
                copy._state[name][: len(kept)] = array[rows]
            copy._slots = {u: i for i, u in enumerate(kept)}
            copy._used = len(kept)
            return copy

    def user_ids(self) -> list[str]:
        """Every tracked user."""
        with self._lock:
            return list(self._slots)

    def matrix(
        self, user_ids: Sequence[str], as_of: datetime, space: FeatureSpace
    ) -> tuple[np.ndarray, np.ndarray]:
        """Static features ``X`` (n, features) and sequences ``S`` (n, days, channels).

        A user the store does not track gets the row of a user with no history.
        """
        with self._lock:
            slots = np.array([self._slots.get(u, -1) for u in user_ids], dtype=np.int64)
            return _Reader(self, slots, _seconds(as_of), space).read()

    # -- writing ----------------------------------------------------------------------------

    def _batch(self, users: list[str], types: list[str], ts_s: np.ndarray,
               numerics: list[tuple], categoricals: list[tuple]) -> _Batch:
        if ts_s.min() <= NEVER_S or ts_s.max() >= LATEST_S:
            raise ValueError("event time outside 1932..2068 cannot be stored")
        numeric = [(i, self._pair_index((kind, key)), v) for i, kind, key, v in numerics]
        numeric = [n for n in numeric if n[1] >= 0]
        categorical = [(i, self._key_index(k), self._category_code(k, v))
                       for i, k, v in categoricals]
        categorical = [c for c in categorical if c[1] >= 0]
        return _Batch(
            slot=np.array([self._slot(u) for u in users], dtype=np.int64),
            ts_s=ts_s.astype(np.int64),
            channel=np.array([self._type_channel(t) for t in types], dtype=np.int64),
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
        fresh = _allocate(self._capacity, len(self._types), len(self._pairs), len(self._keys))
        for name, old in self._state.items():
            fresh[name][tuple(slice(0, n) for n in old.shape)] = old
        self._state = fresh

    def _apply(self, batch: _Batch) -> None:
        state, slot, ts = self._state, batch.slot, batch.ts_s.astype(np.int32)
        np.minimum.at(state["first_s"], slot, ts)
        np.maximum.at(state["last_s"], slot, ts)
        np.maximum.at(state["type_last_s"], (slot, batch.channel), ts)
        np.add.at(state["total"], slot, 1)
        _add_to_ring(state, slot, batch.ts_s // DAY_S, batch.channel)
        if batch.num_event.size:
            _add_numeric(state, slot[batch.num_event], batch.ts_s[batch.num_event],
                         batch.num_pair, batch.num_value, batch.num_event)
        if batch.cat_event.size:
            _set_categories(state, slot[batch.cat_event], batch.cat_key, batch.cat_code,
                            batch.cat_event)


def _allocate(capacity: int, types: int, pairs: int, keys: int) -> dict[str, np.ndarray]:
    """Fresh state arrays, every row in its 'no history' form."""
    state = {
        "counts": np.zeros((capacity, RING_DAYS, types), np.uint8),
        "anchor_day": np.empty(capacity, np.int32),
        "first_s": np.empty(capacity, np.int32),
        "last_s": np.empty(capacity, np.int32),
        "total": np.zeros(capacity, np.uint32),
        "type_last_s": np.empty((capacity, types), np.int32),
        "decayed": np.zeros((capacity, pairs, 3), np.float32),
        "pair_ref_s": np.empty((capacity, pairs), np.int32),
        "lifetime": np.zeros((capacity, pairs, 2), np.float32),
        "last_value": np.zeros((capacity, pairs), np.float32),
        "category": np.zeros((capacity, keys), np.int16),
    }
    _reset(state, slice(None))
    return state


def _reset(state: dict[str, np.ndarray], rows: Any) -> None:
    for name, array in state.items():
        array[rows] = _EMPTY.get(name, 0)


_EMPTY = {"anchor_day": EMPTY_DAY, "first_s": LATEST_S, "last_s": NEVER_S,
          "type_last_s": NEVER_S, "pair_ref_s": NEVER_S}


def _add_to_ring(state: dict[str, np.ndarray], slot: np.ndarray, day: np.ndarray,
                 channel: np.ndarray) -> None:
    """Count events into each user's ring of daily buckets, clearing days that rolled over."""
    counts = state["counts"]
    users, inverse = np.unique(slot, return_inverse=True)
    newest = np.full(users.size, EMPTY_DAY, np.int64)
    np.maximum.at(newest, inverse, day)
    old = state["anchor_day"][users].astype(np.int64)
    new = np.maximum(old, newest)
    moved = new > old
    if moved.any():
        # A bucket position is stale when the day it stands for under the new anchor
        # differs from the day it held under the old one.
        positions = np.arange(RING_DAYS)
        before = old[moved, None] - (old[moved, None] - positions) % RING_DAYS
        after = new[moved, None] - (new[moved, None] - positions) % RING_DAYS
        rows, cols = np.nonzero(before != after)
        counts[users[moved][rows], cols, :] = 0
    state["anchor_day"][users] = new
    keep = day > new[inverse] - RING_DAYS
    flat_index = (slot[keep] * RING_DAYS + day[keep] % RING_DAYS) * counts.shape[2] + channel[keep]
    cells, added = np.unique(flat_index, return_counts=True)
    flat = counts.reshape(-1)
    flat[cells] = np.minimum(flat[cells].astype(np.int64) + added, COUNT_MAX)


def _add_numeric(state: dict[str, np.ndarray], slot: np.ndarray, ts_s: np.ndarray,
                 pair: np.ndarray, value: np.ndarray, order: np.ndarray) -> None:
    """Apply numeric values one event at a time per (user, property), all users at once.

    Folding the k-th value of every (user, property) together keeps the arithmetic the same
    however the events were split into batches, so online and offline state are bit-equal.
    """
    sort = np.lexsort((order, pair, slot))
    slot, ts_s, pair, value = slot[sort], ts_s[sort], pair[sort], value[sort]
    starts = np.r_[True, (slot[1:] != slot[:-1]) | (pair[1:] != pair[:-1])]
    index = np.arange(slot.size)
    rank = index - np.maximum.accumulate(np.where(starts, index, 0))
    by_rank = np.argsort(rank, kind="stable")
    bounds = np.cumsum(np.bincount(rank))
    for chosen in np.split(by_rank, bounds[:-1]):
        _numeric_step(state, slot[chosen], pair[chosen], ts_s[chosen], value[chosen])


def _numeric_step(state: dict[str, np.ndarray], slot: np.ndarray, pair: np.ndarray,
                  ts_s: np.ndarray, value: np.ndarray) -> None:
    ref = state["pair_ref_s"][slot, pair].astype(np.int64)
    dt_s = np.where(ref == NEVER_S, 0, ts_s - ref).astype(np.float64)
    forward = dt_s >= 0
    tau = np.array(TAU_S, dtype=np.float64)
    # A late value is decayed back to the reference time instead of moving it.
    keep = np.exp(-np.maximum(dt_s, 0.0)[:, None] / tau)
    add = np.exp(np.minimum(dt_s, 0.0)[:, None] / tau)
    incoming = np.stack([value, value, np.ones_like(value)], axis=1)
    decayed = state["decayed"][slot, pair].astype(np.float64)
    state["decayed"][slot, pair] = decayed * keep + incoming * add
    state["pair_ref_s"][slot, pair] = np.where(forward, ts_s, ref)
    lifetime = state["lifetime"][slot, pair].astype(np.float64)
    state["lifetime"][slot, pair] = lifetime + np.stack([value, np.ones_like(value)], axis=1)
    state["last_value"][slot, pair] = np.where(forward, value, state["last_value"][slot, pair])


def _set_categories(state: dict[str, np.ndarray], slot: np.ndarray, key: np.ndarray,
                    code: np.ndarray, order: np.ndarray) -> None:
    """The last value of each (user, attribute) in the batch replaces the stored one."""
    sort = np.lexsort((order, key, slot))
    slot, key, code = slot[sort], key[sort], code[sort]
    last = np.r_[(slot[1:] != slot[:-1]) | (key[1:] != key[:-1]), True]
    state["category"][slot[last], key[last]] = code[last]


class _Reader:
    """Feature rows of some users, as of one moment, in the columns of one space."""

    def __init__(self, store: FeatureStore, slots: np.ndarray, as_of_s: int,
                 space: FeatureSpace) -> None:
        self.store, self.space, self.as_of_s = store, space, as_of_s
        self.known = slots >= 0
        self.slots = np.where(self.known, slots, 0)
        self.state = store._state

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        daily = self._daily_counts()
        per_type = self._pick(daily, self.store._types, self.space.event_types, axis=2)
        total = daily.sum(axis=2, dtype=np.int64)
        columns = [*self._activity(total), *self._per_type(per_type),
                   *self._numeric(), *self._categories()]
        X = np.column_stack(columns).astype(np.float32)
        days = self.space.sequence_days
        sequence = np.concatenate([per_type, total[:, :, None]], axis=2)[:, -days:, :]
        return X, np.log1p(sequence, dtype=np.float32)

    def _daily_counts(self) -> np.ndarray:
        """(n, RING_DAYS, store types): counts of the days ending on the as-of day, oldest first."""
        days = self.as_of_s // DAY_S - (RING_DAYS - 1) + np.arange(RING_DAYS)
        anchor = self.state["anchor_day"][self.slots].astype(np.int64)[:, None]
        held = (days > anchor - RING_DAYS) & (days <= anchor) & self.known[:, None]
        counts = self.state["counts"][self.slots[:, None], days % RING_DAYS, :].astype(np.int64)
        return counts * held[:, :, None]

    def _pick(self, values: np.ndarray, index: Mapping, names: Sequence, axis: int) -> np.ndarray:
        """Columns of ``values`` named by ``names`` (zeros for names the store never saw)."""
        where = np.array([index.get(n, -1) for n in names], dtype=np.int64)
        shape = list(values.shape)
        shape[axis] = len(names)
        picked = np.zeros(shape, values.dtype)
        found = where >= 0
        taken = np.take(values, where[found], axis=axis)
        indexer = [slice(None)] * values.ndim
        indexer[axis] = np.flatnonzero(found)
        picked[tuple(indexer)] = taken
        return picked

    def _days_since(self, ts_s: np.ndarray) -> np.ndarray:
        days = (self.as_of_s - ts_s.astype(np.float64)) / DAY_S
        never = (ts_s == NEVER_S) | ~self.known.reshape((-1,) + (1,) * (ts_s.ndim - 1))
        return np.where(never, RECENCY_CAP_DAYS, np.clip(days, 0.0, RECENCY_CAP_DAYS))

    def _activity(self, total: np.ndarray) -> list[np.ndarray]:
        first = self.state["first_s"][self.slots].astype(np.float64)
        tenure = np.where(self.known, np.maximum((self.as_of_s - first) / DAY_S, 0.0), 0.0)
        events = np.where(self.known, self.state["total"][self.slots], 0).astype(np.float64)
        short, long = _window_sums(total)
        active = total > 0
        return [tenure, events / np.maximum(tenure, 1.0),
                self._days_since(self.state["last_s"][self.slots]),
                short, long, _trend(short, long),
                active[:, -SHORT_DAYS:].sum(axis=1), active.sum(axis=1)]

    def _per_type(self, per_type: np.ndarray) -> list[np.ndarray]:
        short, long = _window_sums(per_type)
        last = self._pick(self.state["type_last_s"][self.slots], self.store._types,
                          self.space.event_types, axis=1)
        never = self._pick(np.ones((1, len(self.store._types)), bool), self.store._types,
                           self.space.event_types, axis=1)
        recency = np.where(never, self._days_since(last), RECENCY_CAP_DAYS)
        blocks = np.stack([short, long, _trend(short, long), recency], axis=2)
        return list(blocks.reshape(len(self.slots), -1).T)

    def _numeric(self) -> list[np.ndarray]:
        pairs, index = self.space.numeric_pairs, self.store._pairs
        if not pairs:
            return []
        rows = self.slots
        ref = self._pick(self.state["pair_ref_s"][rows], index, pairs, axis=1).astype(np.int64)
        seen = (self._pick(np.ones((1, len(index)), bool), index, pairs, axis=1)
                & (ref != NEVER_S) & self.known[:, None])
        decayed = self._pick(self.state["decayed"][rows], index, pairs, axis=1).astype(np.float64)
        lifetime = self._pick(self.state["lifetime"][rows], index, pairs, axis=1)
        last = self._pick(self.state["last_value"][rows], index, pairs, axis=1)
        dt_s = np.maximum(self.as_of_s - ref, 0).astype(np.float64)
        fade_short, fade_long = np.exp(-dt_s / TAU_S[0]), np.exp(-dt_s / TAU_S[1])
        count_short = decayed[:, :, 2]
        mean_short = np.divide(decayed[:, :, 0], count_short, out=np.zeros_like(count_short),
                               where=count_short > 0)
        lifetime = lifetime.astype(np.float64)
        mean = np.divide(lifetime[:, :, 0], lifetime[:, :, 1],
                         out=np.zeros_like(lifetime[:, :, 0]), where=lifetime[:, :, 1] > 0)
        blocks = np.stack([decayed[:, :, 0] * fade_short, decayed[:, :, 1] * fade_long,
                           mean_short, mean, last.astype(np.float64)], axis=2)
        blocks = np.where(seen[:, :, None], blocks, 0.0)
        return list(blocks.reshape(len(rows), -1).T)

    def _categories(self) -> list[np.ndarray]:
        columns: list[np.ndarray] = []
        codes = self.state["category"][self.slots].astype(np.int64)
        for key, values in self.space.categories:
            width = len(values) + 1
            onehot = np.zeros((len(self.slots), width))
            k = self.store._keys.get(key)
            if k is not None:
                # Map the store's codes to this space's columns; unseen values go to <other>.
                store_codes = self.store._codes[k]
                lookup = np.full(len(store_codes) + 2, width - 1, np.int64)
                lookup[0] = -1
                position = {v: i for i, v in enumerate(values)}
                for value, code in store_codes.items():
                    lookup[code] = position.get(value, width - 1)
                column = lookup[codes[:, k]]  # OVERFLOW_CODE (-1) indexes the last: <other>
                hit = (column >= 0) & self.known
                onehot[np.flatnonzero(hit), column[hit]] = 1.0
            columns.extend(onehot.T)
        return columns


def _window_sums(daily: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return daily[:, -SHORT_DAYS:].sum(axis=1), daily[:, -LONG_DAYS:].sum(axis=1)


def _trend(short: np.ndarray, long: np.ndarray) -> np.ndarray:
    """Daily rate of the short window minus that of the long one: negative when fading."""
    return short / SHORT_DAYS - long / LONG_DAYS


def _seconds(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - EPOCH) // timedelta(seconds=1)


def _frame_ns(frame: pd.DataFrame) -> np.ndarray:
    """Nanoseconds since the Unix epoch of a frame's ``ts`` (naive values are UTC)."""
    return pd.to_datetime(frame["ts"], utc=True).to_numpy(dtype="datetime64[ns]").astype(np.int64)


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
    ns = _frame_ns(history)
    return history.iloc[np.argsort(ns, kind="stable")].reset_index(drop=True)


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
    ordered = in_time_order(history)
    ns = _frame_ns(ordered)
    store = FeatureStore(space)
    X = np.zeros((len(queries), len(space.feature_names)), np.float32)
    S = np.zeros((len(queries), space.sequence_days, len(space.sequence_channels)), np.float32)
    cutoffs = pd.to_datetime(queries["cutoff"], utc=True)
    done = 0
    for cutoff, rows in queries.groupby(cutoffs, sort=True).indices.items():
        upto = int(np.searchsorted(ns, pd.Timestamp(cutoff).value, side="right"))
        store.update_frame(ordered.iloc[done:upto])
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
