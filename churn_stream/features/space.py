"""``FeatureSpace``: the columns one model sees, learned from its training history."""

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from churn_stream.features.common import NUMERIC_STATS, OTHER_VALUE, RING_DAYS, TYPE_STATS


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
        types = _top(Counter(history["event_type"].value_counts().to_dict()), max_types)
        numeric = history["numeric_values"]
        with_numbers = numeric.map(_filled).to_numpy(dtype=bool)
        pairs = Counter((kind, key)
                        for kind, values in zip(history["event_type"].to_numpy()[with_numbers],
                                                numeric.to_numpy()[with_numbers], strict=True)
                        for key in values)
        keys: Counter = Counter()
        values: dict[str, Counter] = {}
        categorical = history["categorical_values"]
        for attributes in categorical.to_numpy()[categorical.map(_filled).to_numpy(dtype=bool)]:
            for key, value in attributes.items():
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


def _filled(values: object) -> bool:
    """A non-empty dict of properties (other sources may hold None or NaN for none)."""
    return isinstance(values, dict) and bool(values)
