"""Population stability index over bins learned from the reference sample.

A feature with few distinct reference values (a coded category, a flag, a small count) is
binned by value, with one extra bin for values never seen in the reference; any other is
binned at the reference's quantiles. Empty bins are floored at ``EPSILON`` so the index stays
finite, as evidently does.
"""

from dataclasses import dataclass

import numpy as np

from churn_stream.drift.base import DriftResult, finite, is_constant, register

EPSILON = 1e-4
DEFAULT_BINS = 10
DEFAULT_THRESHOLD = 0.2
"""The customary reading: below 0.1 stable, 0.1 to 0.2 moderate, above 0.2 a real shift."""


@dataclass(frozen=True)
class Bins:
    """How a reference sample splits values: by value (``categories``) or at ``edges``."""

    categories: np.ndarray | None
    edges: np.ndarray | None

    @classmethod
    def fit(cls, reference: np.ndarray, max_bins: int = DEFAULT_BINS) -> "Bins":
        """Bins for ``reference`` (finite values): by value if it has at most ``max_bins``."""
        distinct = np.unique(reference)
        if distinct.size <= max_bins:
            return cls(categories=distinct, edges=None)
        quantiles = np.quantile(reference, np.linspace(0, 1, max_bins + 1)[1:-1])
        return cls(categories=None, edges=np.unique(quantiles))

    @property
    def count(self) -> int:
        """Number of bins, the unseen-value bin included."""
        if self.categories is not None:
            return self.categories.size + 1
        assert self.edges is not None
        return self.edges.size + 1

    def index(self, values: np.ndarray) -> np.ndarray:
        """The bin of each value; for categories the last bin holds values never seen."""
        if self.categories is None:
            assert self.edges is not None
            return np.searchsorted(self.edges, values, side="right")
        position = np.searchsorted(self.categories, values)
        clipped = np.minimum(position, self.categories.size - 1)
        seen = (position < self.categories.size) & (self.categories[clipped] == values)
        return np.where(seen, position, self.categories.size)

    def proportions(self, values: np.ndarray) -> np.ndarray:
        """Share of ``values`` in each bin, floored at ``EPSILON``."""
        counts = np.bincount(self.index(values), minlength=self.count).astype(np.float64)
        shares = counts / max(values.size, 1)
        return np.maximum(shares, EPSILON)


def psi_index(expected: np.ndarray, actual: np.ndarray) -> float:
    """PSI of two proportion vectors over the same bins (both floored, so always finite)."""
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def psi_binned(
    bins: Bins, expected: np.ndarray, n_reference: int, constant: bool,
    current: np.ndarray, threshold: float, statistic: str = "psi",
) -> DriftResult:
    """PSI of ``current`` against reference proportions ``expected`` already computed."""
    current = finite(current)
    if current.size == 0:
        return DriftResult(statistic, 0.0, threshold, False, n_reference, 0)
    score = psi_index(expected, bins.proportions(current))
    # A reference without spread taught the model nothing about this feature, so its
    # movement alone is reported but is no reason to retrain.
    drifted = score > threshold and not constant
    return DriftResult(statistic, score, threshold, drifted, n_reference, current.size)


@register("psi")
def psi(
    reference: np.ndarray, current: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
    max_bins: int = DEFAULT_BINS,
) -> DriftResult:
    """Population stability index of ``current`` against ``reference``.

    >>> rng = np.random.default_rng(0)
    >>> psi(rng.normal(size=5000), rng.normal(size=5000)).drifted
    False
    >>> psi(rng.normal(size=5000), rng.normal(1.0, size=5000)).drifted
    True
    """
    reference = finite(reference)
    if reference.size == 0:
        return DriftResult("psi", 0.0, threshold, False, 0, finite(current).size)
    bins = Bins.fit(reference, max_bins)
    return psi_binned(bins, bins.proportions(reference), reference.size,
                      is_constant(reference), current, threshold)
