"""What scoring costs: microseconds per row of each model and of the blend, in batches."""

import time

import numpy as np

from churn_stream.models.blend import ChurnModel


def scoring_cost_us(model: ChurnModel, X: np.ndarray, S: np.ndarray, batch_rows: int = 1000,
                    repeats: int = 5) -> dict[str, float]:
    """Median microseconds per row over ``repeats`` calls on one batch of ``batch_rows``.

    Rows are recycled when fewer are given. ``one_row_ms`` is the blend's cost for one row,
    what a single ``/predict`` pays.
    """
    if len(X) == 0:
        raise ValueError("scoring cost needs at least one row")
    pick = np.arange(batch_rows) % len(X)
    rows, sequences = X[pick], S[pick]
    calls = {
        "rf": lambda r, s: model.forest.predict(r),
        "xgb": lambda r, s: model.boosted.predict(r),
        "seq": lambda r, s: model.sequence.predict(r, s),
        "blend": model.score,
    }
    cost = {name: _median_s(call, rows, sequences, repeats) / batch_rows * 1e6
            for name, call in calls.items()}
    cost["one_row_ms"] = _median_s(model.score, rows[:1], sequences[:1], repeats * 4) * 1e3
    return cost


def _median_s(call, rows: np.ndarray, sequences: np.ndarray, repeats: int) -> float:
    call(rows, sequences)  # the first call may trace or warm caches
    spent = []
    for _ in range(repeats):
        started = time.perf_counter()
        call(rows, sequences)
        spent.append(time.perf_counter() - started)
    return float(np.median(spent))
