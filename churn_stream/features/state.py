"""The state arrays of ``FeatureStore`` and the vectorised steps that fold events into them.

Every function takes the state dict (name -> array with one row per user slot) and columns
of events; none loops over events in Python except ``_add_numeric``, which loops over
ranks (the k-th value of each user and property) to keep float arithmetic batch-invariant.
"""

from collections.abc import Callable
from typing import Any

import numpy as np

from churn_stream.features.common import (
    COUNT_MAX,
    EMPTY_DAY,
    LATEST_S,
    NEVER_S,
    RING_DAYS,
    TAU_S,
)

Shapes = dict[str, tuple[tuple[int, ...], type]]
"""Name -> (shape, dtype) of each state array."""


def shapes(capacity: int, types: int, pairs: int, keys: int) -> Shapes:
    """The state arrays for ``capacity`` users and this vocabulary."""
    return {
        "counts": ((capacity, RING_DAYS, types), np.uint8),
        "anchor_day": ((capacity,), np.int32),
        "first_s": ((capacity,), np.int32),
        "last_s": ((capacity,), np.int32),
        "total": ((capacity,), np.uint32),
        "type_last_s": ((capacity, types), np.int32),
        "type_total": ((capacity, types), np.uint32),
        "decayed": ((capacity, pairs, 3), np.float32),
        "pair_ref_s": ((capacity, pairs), np.int32),
        "lifetime": ((capacity, pairs, 2), np.float32),
        "last_value": ((capacity, pairs), np.float32),
        "category": ((capacity, keys), np.int16),
    }


def allocate(capacity: int, types: int, pairs: int, keys: int,
             make: Callable[[Shapes], dict[str, np.ndarray]] | None = None,
             ) -> dict[str, np.ndarray]:
    """Fresh state arrays, every row in its 'no history' form; ``make`` provides the memory
    (by default, this process's heap)."""
    wanted = shapes(capacity, types, pairs, keys)
    if make is None:
        state = {name: np.empty(shape, dtype) for name, (shape, dtype) in wanted.items()}
    else:
        state = make(wanted)
    reset(state, slice(None))
    return state


def reset(state: dict[str, np.ndarray], rows: Any) -> None:
    for name, array in state.items():
        array[rows] = _EMPTY.get(name, 0)


_EMPTY = {"anchor_day": EMPTY_DAY, "first_s": LATEST_S, "last_s": NEVER_S,
          "type_last_s": NEVER_S, "pair_ref_s": NEVER_S}


def add_to_ring(state: dict[str, np.ndarray], slot: np.ndarray, day: np.ndarray,
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


def add_numeric(state: dict[str, np.ndarray], slot: np.ndarray, ts_s: np.ndarray,
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


def set_categories(state: dict[str, np.ndarray], slot: np.ndarray, key: np.ndarray,
                    code: np.ndarray, order: np.ndarray) -> None:
    """The last value of each (user, attribute) in the batch replaces the stored one."""
    sort = np.lexsort((order, key, slot))
    slot, key, code = slot[sort], key[sort], code[sort]
    last = np.r_[(slot[1:] != slot[:-1]) | (key[1:] != key[:-1]), True]
    state["category"][slot[last], key[last]] = code[last]

