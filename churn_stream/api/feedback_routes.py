"""Write and read true outcomes: ``/feedback`` and ``/feedback/batch``.

The handlers are plain ``def``: FastAPI runs them in its thread pool, so a batch written to
the database never holds up the event loop (nor ``/health``).
"""

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Query, Request, Response, Security, status
from pydantic import ValidationError

from churn_stream import storage
from churn_stream.api.auth import documented_key
from churn_stream.api.metrics import FEEDBACK_RECEIVED
from churn_stream.api.problems import validation_problem
from churn_stream.api.schemas import (
    BatchItemResult,
    FeedbackAccepted,
    FeedbackBatchIn,
    FeedbackBatchOut,
    FeedbackIn,
    FeedbackOut,
    Problem,
    UserId,
)
from churn_stream.outbox import store_feedback

INVALID: dict[int | str, dict[str, Any]] = {
    422: {"model": Problem, "description": "A field or parameter is missing, unknown or invalid"},
}
# What a write can be refused with besides its own outcomes. JSON that does not parse is a
# 422 like any invalid field (FastAPI's choice): the field is ``body.<character offset>``.
WRITE_REFUSALS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "The body is not UTF-8 text"},
    401: {"model": Problem, "description": "X-API-Key missing or wrong"},
    413: {"model": Problem, "description": "The body is larger than FEEDBACK_MAX_BODY_BYTES"},
    422: {"model": Problem, "description": "The body is not parseable JSON (the field is "
          "body.<character offset>), or a field is missing, unknown or invalid"},
}

router = APIRouter(tags=["feedback"], responses=INVALID)


def feedback_row(item: FeedbackIn, received_at: datetime) -> dict[str, Any]:
    """The ``feedback`` row of a validated item; an id is generated if the client gave none."""
    return {
        "feedback_id": item.feedback_id or str(uuid.uuid4()),
        "user_id": item.user_id,
        "churned": item.churned,
        "observed_at": storage.to_db_time(item.observed_at),
        "source": item.source,
        "received_at": storage.to_db_time(received_at),
        "published_at": None,
    }


def feedback_out(row: Any) -> FeedbackOut:
    """A stored row (mapping or Row) as the API shows it, times in UTC."""
    data = dict(row._mapping) if hasattr(row, "_mapping") else dict(row)
    for name in ("observed_at", "received_at", "published_at"):
        if data[name] is not None:
            data[name] = storage.from_db_time(data[name])
    return FeedbackOut.model_validate(data)


@router.post(
    "/feedback",
    status_code=status.HTTP_201_CREATED,
    dependencies=[Security(documented_key)],
    responses={
        200: {"model": FeedbackAccepted, "description": "Already stored under this feedback_id"},
        409: {"model": Problem, "description": "feedback_id taken by another user or outcome"},
        **WRITE_REFUSALS,
    },
)
def post_feedback(item: FeedbackIn, request: Request, response: Response) -> FeedbackAccepted:
    """Store one true outcome; it is published to ``churn-feedback`` right after.

    Sending the same ``feedback_id`` again stores nothing new and answers 200.
    """
    row = feedback_row(item, datetime.now(UTC))
    (outcome,) = store_feedback(request.app.state.engine, [row])
    FEEDBACK_RECEIVED.labels(outcome).inc()
    if outcome == "conflict":
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"feedback_id {row['feedback_id']} is already stored for another user "
            "or outcome; choose a new feedback_id",
        )
    _wake_outbox(request)
    if outcome == "duplicate":
        response.status_code = status.HTTP_200_OK
        stored = _load(request.app.state.engine, row["feedback_id"])
        return FeedbackAccepted(**stored.model_dump(), created=False)
    return FeedbackAccepted(**feedback_out(row).model_dump(), created=True)


@router.post(
    "/feedback/batch",
    dependencies=[Security(documented_key)],
    responses=WRITE_REFUSALS,
)
def post_feedback_batch(batch: FeedbackBatchIn, request: Request) -> FeedbackBatchOut:
    """Store up to 1000 outcomes (``MAX_BATCH_ITEMS``) at once, with a result per item.

    Invalid items are reported (``status: invalid`` with the fields at fault) and the
    valid ones stored all the same. An empty or oversize batch is refused whole with 422.
    """
    received_at = datetime.now(UTC)
    results: list[BatchItemResult | None] = [None] * len(batch.items)
    rows, positions = [], []
    for index, raw in enumerate(batch.items):
        try:
            item = FeedbackIn.model_validate(raw)
        except ValidationError as exc:
            errors = validation_problem(exc, prefix=f"items.{index}")
            results[index] = BatchItemResult(index=index, status="invalid", errors=errors)
            continue
        rows.append(feedback_row(item, received_at))
        positions.append(index)
    for index, row, outcome in zip(
        positions, rows, store_feedback(request.app.state.engine, rows) if rows else [],
        strict=True,
    ):
        results[index] = BatchItemResult(index=index, status=outcome,
                                         feedback_id=row["feedback_id"])
    done = [r for r in results if r is not None]
    for result in done:
        FEEDBACK_RECEIVED.labels(result.status).inc()
    _wake_outbox(request)
    created = sum(r.status == "created" for r in done)
    duplicates = sum(r.status == "duplicate" for r in done)
    return FeedbackBatchOut(created=created, duplicates=duplicates,
                            rejected=len(done) - created - duplicates, results=done)


@router.get("/feedback")
def list_feedback(
    request: Request,
    user_id: Annotated[UserId | None, Query(description="Only this user's outcomes")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[FeedbackOut]:
    """Stored outcomes, newest observation first."""
    table = storage.feedback
    query = sa.select(table).order_by(table.c.observed_at.desc(), table.c.feedback_id)
    if user_id is not None:
        query = query.where(table.c.user_id == user_id)
    with request.app.state.engine.connect() as conn:
        return [feedback_out(row) for row in conn.execute(query.limit(limit))]


def _load(engine: sa.Engine, feedback_id: str) -> FeedbackOut:
    query = sa.select(storage.feedback).where(storage.feedback.c.feedback_id == feedback_id)
    with engine.connect() as conn:
        return feedback_out(conn.execute(query).one())


def _wake_outbox(request: Request) -> None:
    outbox = request.app.state.outbox
    if outbox is not None:
        outbox.wake()
