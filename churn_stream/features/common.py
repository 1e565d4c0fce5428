"""Units, limits and sentinels shared by the feature modules; time as seconds since 2000."""

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
EPOCH_NS = pd.Timestamp(EPOCH).value
EPOCH_S = EPOCH_NS // 1_000_000_000
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
# All-time figures (count_all, sum_all) see a whole window that outlasts the ring, e.g.
# the first days of a 30-day course: plain totals are what churn models lean on most.
TYPE_STATS = ("count_7d", "count_28d", "trend", "days_since_last", "count_all")
NUMERIC_STATS = ("sum_7d", "sum_28d", "mean_7d", "mean", "last", "sum_all")


def seconds(moment: datetime) -> int:
    """Seconds since ``EPOCH``, rounded down; a naive time is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - EPOCH) // timedelta(seconds=1)


def frame_ns(frame: pd.DataFrame) -> np.ndarray:
    """Nanoseconds since the Unix epoch of a frame's ``ts`` (naive values are UTC)."""
    return pd.to_datetime(frame["ts"], utc=True).to_numpy(dtype="datetime64[ns]").astype(np.int64)


def frame_seconds(frame: pd.DataFrame) -> np.ndarray:
    """Seconds since ``EPOCH`` of a frame's ``ts``, rounded down."""
    return frame_ns(frame) // 1_000_000_000 - EPOCH_S
