"""Rows of ``model_runs``: one per training run, written when it starts and when it ends.

The row is inserted first, so that its id names the version (``v<id>``: unique across
instances, increasing) and a run cut short by a crash still leaves a trace saying so.
"""

import logging
import math
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from churn_stream import storage

log = logging.getLogger(__name__)
UNFINISHED = "unfinished: the process ended before this run did"


def start_run(engine: sa.Engine, instance: str, reason: str) -> tuple[int, str]:
    """Record a run as started; returns its id and the version its model will carry."""
    table = storage.model_runs
    with engine.begin() as conn:
        run_id = conn.execute(table.insert().values(
            model_version="pending", instance=instance, reason=reason,
            started_at=storage.to_db_time(datetime.now(UTC)), seconds=0.0, rows=0, metrics={},
            promoted=False, error=UNFINISHED,
        )).inserted_primary_key[0]
        version = version_name(run_id)
        conn.execute(table.update().where(table.c.id == run_id).values(model_version=version))
    return run_id, version


def finish_run(
    engine: sa.Engine, run_id: int, seconds: float, rows: int, metrics: dict[str, Any],
    promoted: bool, error: str | None,
) -> None:
    """Record how a run ended."""
    table = storage.model_runs
    with engine.begin() as conn:
        conn.execute(table.update().where(table.c.id == run_id).values(
            seconds=seconds, rows=rows, metrics=json_safe(metrics), promoted=promoted,
            error=error[:4000] if error else None,
        ))


def note_waiting(engine: sa.Engine, run_id: int, message: str) -> None:
    """A run that waits for data tries again: it starts anew and says what it waits for."""
    table = storage.model_runs
    with engine.begin() as conn:
        conn.execute(table.update().where(table.c.id == run_id).values(
            started_at=storage.to_db_time(datetime.now(UTC)), error=message[:4000]))


def version_name(run_id: int) -> str:
    """The version of the model trained by run ``run_id``."""
    return f"v{run_id}"


def version_number(version: str) -> int:
    """The number in a version name (0 if it has none), for the version gauge."""
    digits = version.removeprefix("v")
    return int(digits) if digits.isdigit() else 0


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None: JSON has no NaN."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):  # numpy scalars
        return json_safe(value.item())
    return value
