"""Read-only views of the scores: a user's history and the users most at risk."""

from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Path, Query, Request, status

from churn_stream import storage
from churn_stream.api.feedback_routes import INVALID
from churn_stream.api.schemas import AtRiskUser, PredictionOut, Problem, UserPredictions
from churn_stream.events import UserId, shown_user_id
from churn_stream.routes import USER_ID

router = APIRouter(tags=["predictions"], responses=INVALID)

PREDICTION_COLUMNS = ("scored_at", "event_ts", "score", "score_rf", "score_xgb", "score_seq",
                      "model_version", "latency_ms")


def _prediction(row: Any) -> PredictionOut:
    data = {name: getattr(row, name) for name in PREDICTION_COLUMNS}
    data["scored_at"] = storage.from_db_time(data["scored_at"])
    data["event_ts"] = storage.from_db_time(data["event_ts"])
    return PredictionOut.model_validate(data)


@router.get(
    # Any text: a user id may hold "/" (sent as %2F, which the server decodes before routing).
    f"/predictions/{USER_ID}",
    responses={404: {"model": Problem, "description": "No score stored for this user"}},
)
def user_predictions(
    request: Request,
    user_id: Annotated[UserId, Path()],
    limit: Annotated[int, Query(ge=1, le=1000, description="Most history rows")] = 100,
) -> UserPredictions:
    """The user's latest score and their score history, newest first."""
    table = storage.predictions
    query = (
        sa.select(*[table.c[name] for name in PREDICTION_COLUMNS])
        .where(table.c.user_id == user_id)
        .order_by(table.c.scored_at.desc(), table.c.id.desc())
        .limit(limit)
    )
    with request.app.state.engine.connect() as conn:
        history = [_prediction(row) for row in conn.execute(query)]
    if not history:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            detail=f"no score stored for {shown_user_id(user_id)}")
    return UserPredictions(user_id=user_id, latest=history[0], history=history)


@router.get("/users/at-risk")
def users_at_risk(
    request: Request,
    threshold: Annotated[
        float,
        Query(ge=0.0, le=1.0, allow_inf_nan=False, description="Least latest score to list"),
    ] = 0.5,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AtRiskUser]:
    """Users whose latest score is at or above ``threshold``, riskiest first."""
    table = storage.predictions
    newest = (
        sa.select(
            table.c.user_id, table.c.score, table.c.scored_at, table.c.model_version,
            sa.func.row_number()
            .over(partition_by=table.c.user_id,
                  order_by=(table.c.scored_at.desc(), table.c.id.desc()))
            .label("rank"),
        )
    ).subquery()
    query = (
        sa.select(newest.c.user_id, newest.c.score, newest.c.scored_at, newest.c.model_version)
        .where(newest.c.rank == 1, newest.c.score >= threshold)
        .order_by(newest.c.score.desc(), newest.c.user_id)
        .limit(limit)
    )
    with request.app.state.engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        AtRiskUser(user_id=r.user_id, score=r.score, scored_at=storage.from_db_time(r.scored_at),
                   model_version=r.model_version)
        for r in rows
    ]
