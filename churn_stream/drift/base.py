"""What every drift statistic returns, and the registry that names them."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DriftResult:
    """One statistic comparing a ``reference`` sample with a ``current`` one.

    ``drifted`` is ``score > threshold``, except where the comparison means nothing (an empty
    current window, a reference without spread): then it is False and ``score`` stays finite.
    """

    statistic: str
    score: float
    threshold: float
    drifted: bool
    n_reference: int
    n_current: int


Statistic = Callable[[np.ndarray, np.ndarray, float], DriftResult]
"""``(reference, current, threshold) -> DriftResult``, the shape of every registered statistic."""

REGISTRY: dict[str, Statistic] = {}


def register(name: str) -> Callable[[Statistic], Statistic]:
    """Add a statistic to ``REGISTRY`` under ``name``."""

    def add(function: Statistic) -> Statistic:
        REGISTRY[name] = function
        return function

    return add


def finite(values: np.ndarray) -> np.ndarray:
    """The finite values of a 1-d sample as float64; NaN and infinities carry no distribution."""
    values = np.asarray(values, dtype=np.float64).ravel()
    return values[np.isfinite(values)]


def is_constant(values: np.ndarray) -> bool:
    """Whether a sample has a single value (or none): nothing a model could have learned from."""
    return values.size == 0 or bool(values.min() == values.max())
