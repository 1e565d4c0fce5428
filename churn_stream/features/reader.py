"""``matrix``: feature rows and sequences of some users as of one moment, in one space."""

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from churn_stream.features.common import (
    DAY_S,
    LONG_DAYS,
    NEVER_S,
    RECENCY_CAP_DAYS,
    RING_DAYS,
    SHORT_DAYS,
    TAU_S,
)
from churn_stream.features.space import FeatureSpace

if TYPE_CHECKING:
    from churn_stream.features.store import FeatureStore


class Reader:
    """Feature rows of some users, each as of its own moment, in the columns of one space."""

    def __init__(self, store: "FeatureStore", slots: np.ndarray, as_of_s: np.ndarray,
                 space: FeatureSpace) -> None:
        self.store, self.space = store, space
        self.as_of_s = np.broadcast_to(np.asarray(as_of_s, dtype=np.int64), slots.shape)
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
        days = (self.as_of_s // DAY_S - (RING_DAYS - 1))[:, None] + np.arange(RING_DAYS)
        anchor = self.state["anchor_day"][self.slots].astype(np.int64)[:, None]
        held = (days > anchor - RING_DAYS) & (days <= anchor) & self.known[:, None]
        counts = self.state["counts"][self.slots[:, None], days % RING_DAYS].astype(np.int64)
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
        per_row = (-1,) + (1,) * (ts_s.ndim - 1)
        days = (self.as_of_s.reshape(per_row) - ts_s.astype(np.float64)) / DAY_S
        never = (ts_s == NEVER_S) | ~self.known.reshape(per_row)
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
        totals = self._pick(self.state["type_total"][self.slots], self.store._types,
                            self.space.event_types, axis=1) * self.known[:, None]
        blocks = np.stack([short, long, _trend(short, long), recency, totals], axis=2)
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
        dt_s = np.maximum(self.as_of_s[:, None] - ref, 0).astype(np.float64)
        fade_short, fade_long = np.exp(-dt_s / TAU_S[0]), np.exp(-dt_s / TAU_S[1])
        count_short = decayed[:, :, 2]
        mean_short = np.divide(decayed[:, :, 0], count_short, out=np.zeros_like(count_short),
                               where=count_short > 0)
        lifetime = lifetime.astype(np.float64)
        mean = np.divide(lifetime[:, :, 0], lifetime[:, :, 1],
                         out=np.zeros_like(lifetime[:, :, 0]), where=lifetime[:, :, 1] > 0)
        blocks = np.stack([decayed[:, :, 0] * fade_short, decayed[:, :, 1] * fade_long,
                           mean_short, mean, last.astype(np.float64), lifetime[:, :, 0]],
                          axis=2)
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

