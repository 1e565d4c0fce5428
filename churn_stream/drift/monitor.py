"""Live windows of scored rows compared with a model's reference: one report per window.

The reference is profiled once per model (bins, proportions, sorted columns), so that each
window costs a histogram per feature and a KS test per numeric feature.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from churn_stream.drift.base import DriftResult, finite, is_constant
from churn_stream.drift.ks import ks
from churn_stream.drift.psi import DEFAULT_BINS, Bins, psi_binned
from churn_stream.drift.score import score_drift


@dataclass(frozen=True)
class Thresholds:
    """Where each statistic starts to call a window drifted."""

    psi: float = 0.2
    ks: float = 0.1
    score_psi: float = 0.2


@dataclass(frozen=True)
class FeatureDrift:
    """One statistic of one feature in one window."""

    feature: str
    result: DriftResult


@dataclass(frozen=True)
class WindowReport:
    """Every statistic of one window of live rows against the reference."""

    model_version: str
    n_current: int
    features: list[FeatureDrift]
    score: DriftResult
    exempt_features: frozenset[str] = frozenset()
    """Features reported but never counted as drifted: those without spread in the reference
    and those the caller exempts (e.g. clocks such as tenure, which move by themselves)."""

    def psi_results(self) -> list[FeatureDrift]:
        """The PSI of each feature: the statistic that decides whether a feature drifted."""
        return [f for f in self.features if f.result.statistic == "psi"]

    @property
    def drifted_features(self) -> list[str]:
        """Features whose PSI is over its threshold, the exempt ones left out."""
        return [f.feature for f in self.psi_results()
                if f.result.drifted and f.feature not in self.exempt_features]

    @property
    def drifted_share(self) -> float:
        """Drifted features over the features that count."""
        counted = [f for f in self.psi_results() if f.feature not in self.exempt_features]
        return len(self.drifted_features) / len(counted) if counted else 0.0


@dataclass(frozen=True)
class _Column:
    name: str
    bins: Bins
    expected: np.ndarray
    sorted_reference: np.ndarray
    constant: bool

    @property
    def numeric(self) -> bool:
        return self.bins.categories is None


class ReferenceProfile:
    """A model's reference rows and scores, prepared for comparison with live windows."""

    def __init__(
        self, model_version: str, feature_names: Sequence[str], reference: np.ndarray,
        reference_scores: np.ndarray, thresholds: Thresholds = Thresholds(),
        max_bins: int = DEFAULT_BINS, exempt: Callable[[str], bool] = lambda _name: False,
    ) -> None:
        reference = np.asarray(reference, dtype=np.float64)
        if reference.ndim != 2 or reference.shape[1] != len(feature_names):
            raise ValueError(
                f"reference has shape {reference.shape}, expected (rows, {len(feature_names)})"
            )
        self.model_version = model_version
        self.thresholds = thresholds
        self.max_bins = max_bins
        self.reference_scores = finite(reference_scores)
        self.columns = [self._profile(n, reference[:, i]) for i, n in enumerate(feature_names)]
        self.exempt = frozenset(c.name for c in self.columns if c.constant or exempt(c.name))

    def _profile(self, name: str, values: np.ndarray) -> _Column:
        values = finite(values)
        bins = Bins.fit(values, self.max_bins) if values.size else Bins(np.empty(0), None)
        return _Column(name, bins, bins.proportions(values), np.sort(values), is_constant(values))

    def compare(self, current: np.ndarray, current_scores: np.ndarray) -> WindowReport:
        """PSI of every feature, KS of the numeric ones, PSI of the scores."""
        current = np.asarray(current, dtype=np.float64).reshape(-1, len(self.columns))
        results: list[FeatureDrift] = []
        for i, column in enumerate(self.columns):
            values = current[:, i]
            psi = psi_binned(column.bins, column.expected, column.sorted_reference.size,
                             column.constant, values, self.thresholds.psi)
            results.append(FeatureDrift(column.name, psi))
            if column.numeric:
                results.append(FeatureDrift(
                    column.name, ks(column.sorted_reference, values, self.thresholds.ks)))
        score = score_drift(self.reference_scores, current_scores, self.thresholds.score_psi,
                            self.max_bins)
        return WindowReport(self.model_version, current.shape[0], results, score, self.exempt)


class DriftWindow:
    """A tumbling window of live rows, closed by row count or by age, whichever comes first."""

    def __init__(self, max_rows: int, max_age_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self.clock = clock
        self._rows: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []
        self._count = 0
        self._opened_s = clock()

    def __len__(self) -> int:
        return self._count

    def add(self, rows: np.ndarray, scores: np.ndarray) -> None:
        """Append scored rows (a batch at a time)."""
        self._rows.append(np.asarray(rows))
        self._scores.append(np.asarray(scores))
        self._count += len(rows)

    def closed(self) -> bool:
        """Whether the window is full or old enough to be evaluated."""
        return self._count >= self.max_rows or self.clock() - self._opened_s >= self.max_age_s

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """The window's rows and scores; the next window opens empty."""
        rows = np.concatenate(self._rows) if self._rows else np.empty((0, 0))
        scores = np.concatenate(self._scores) if self._scores else np.empty(0)
        self.reset()
        return rows, scores

    def reset(self) -> None:
        """Drop what the window holds (a new model brings a new reference)."""
        self._rows, self._scores, self._count = [], [], 0
        self._opened_s = self.clock()
