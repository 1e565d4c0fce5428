"""A replay as training data: the rows the stack would have stored, without the stack.

``training_frames`` runs the same reader that ``producer.py --replay`` streams and returns
the ``user_activity`` rows and the ``feedback`` rows the consumer and the feedback API would
have written, so that ``train_from_history(history_df, feedback_df, ...)`` trains on a
dataset directly, and a model trained this way sees exactly what the live stack sees.
"""

from datetime import datetime

import pandas as pd

from churn_stream.replay.base import ReplaySource
from churn_stream.storage import event_row, to_db_time

HISTORY_COLUMNS = ["event_id", "user_id", "event_type", "ts", "numeric_values",
                   "categorical_values", "ingested_at"]
FEEDBACK_COLUMNS = ["feedback_id", "user_id", "churned", "observed_at", "source",
                    "received_at"]


def training_frames(
    source: ReplaySource, until: datetime | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(history, feedback) frames shaped like the ``user_activity`` and ``feedback`` tables.

    Times are naive UTC, as the tables hold them; each event's ``ingested_at`` is its own
    ``ts``. ``until`` keeps only events and outcomes known by then, as a live stack
    would have had them at that moment.
    """
    history = pd.DataFrame(
        (event_row(e, e.ts) for e in source.events() if until is None or e.ts <= until),
        columns=HISTORY_COLUMNS,
    )
    rows = [
        {
            "feedback_id": outcome.feedback_id(source.name),
            "user_id": outcome.user_id,
            "churned": outcome.churned,
            "observed_at": to_db_time(outcome.known_at),
            "source": f"replay-{source.name}",
            "received_at": to_db_time(outcome.known_at),
        }
        for outcome in source.outcomes()
        if until is None or outcome.known_at <= until
    ]
    return history, pd.DataFrame(rows, columns=FEEDBACK_COLUMNS)
