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

from churn_stream.features.common import LONG_DAYS, RECENCY_CAP_DAYS, RING_DAYS, SHORT_DAYS
from churn_stream.features.offline import (
    Snapshot,
    events_from_rows,
    features_at,
    in_time_order,
    offline_features,
    replay,
)
from churn_stream.features.space import FeatureSpace
from churn_stream.features.store import FeatureStore

__all__ = [
    "LONG_DAYS", "RECENCY_CAP_DAYS", "RING_DAYS", "SHORT_DAYS", "FeatureSpace", "FeatureStore",
    "Snapshot", "events_from_rows", "features_at", "in_time_order", "offline_features", "replay",
]
