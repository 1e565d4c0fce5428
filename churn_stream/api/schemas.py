"""Request and response bodies of the feedback API.

Input models forbid unknown fields and coerce nothing: ``churned`` takes only JSON
``true``/``false``, ``observed_at`` only an ISO 8601 string with a time zone, ``user_id``
what an event's ``user_id`` takes (the one rule, ``churn_stream.events.UserId``). Each rule
fails with a 422 that names the field.
"""

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
)

from churn_stream.events import UserId

MAX_BATCH_ITEMS = 1000
"""Most items in one ``POST /feedback/batch``."""
MAX_CLOCK_SKEW_S = 60.0
"""How far past the server's clock an ``observed_at`` may be: clients' clocks drift."""


def _encodable(value: str) -> str:
    # JSON may carry lone surrogates ("\ud800"); no database or Kafka record can hold them.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 text") from None
    return value


def _text_time(value: Any) -> Any:
    # Pydantic would read a bare number as a Unix time, seconds or milliseconds by guess.
    if not isinstance(value, str | datetime):
        raise ValueError("must be an ISO 8601 date-time string with a time zone")
    return value


def _past_utc(value: datetime) -> datetime:
    try:
        value = value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of the representable range") from None
    if value > datetime.now(UTC) + timedelta(seconds=MAX_CLOCK_SKEW_S):
        raise ValueError("must not be in the future")
    return value


FeedbackId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]
Source = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=64),
    AfterValidator(_encodable),
]
ObservedAt = Annotated[AwareDatetime, BeforeValidator(_text_time), AfterValidator(_past_utc)]


class FeedbackIn(BaseModel):
    """A true outcome for one user, as a CRM reports it."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "user_id": "u000042",
                    "churned": True,
                    "observed_at": "2025-01-31T09:30:00Z",
                    "source": "crm",
                    "feedback_id": "crm-7f3a9c",
                }
            ]
        },
    )

    user_id: UserId
    churned: StrictBool
    """JSON ``true`` if the user churned, ``false`` if they are known to have stayed."""
    observed_at: ObservedAt = Field(default_factory=lambda: datetime.now(UTC))
    """When the outcome happened; now if left out; never in the future."""
    source: Source | None = None
    """Which system reported it, e.g. ``crm``."""
    feedback_id: FeedbackId | None = None
    """Client-chosen id that makes a retry idempotent; one is generated if left out."""


class FeedbackOut(BaseModel):
    """One stored outcome."""

    feedback_id: str
    user_id: str
    churned: bool
    observed_at: datetime
    source: str | None
    received_at: datetime
    published_at: datetime | None
    """When ``churn-feedback`` acknowledged it; null until then."""


class FeedbackAccepted(FeedbackOut):
    """The answer to ``POST /feedback``."""

    created: bool
    """False when this ``feedback_id`` was already stored (a retry); nothing was changed."""


class FieldError(BaseModel):
    """What is wrong with one field."""

    field: str
    message: str
    type: str


class FeedbackBatchIn(BaseModel):
    """Up to ``MAX_BATCH_ITEMS`` outcomes; each item is checked on its own."""

    model_config = ConfigDict(extra="forbid")

    items: list[Any] = Field(
        min_length=1,
        max_length=MAX_BATCH_ITEMS,
        # Honest about per-item checking: any item is accepted into the batch, and one
        # that is not a valid FeedbackIn comes back with status "invalid".
        json_schema_extra={
            "items": {
                "anyOf": [
                    {"$ref": "#/components/schemas/FeedbackIn"},
                    {"description": "Anything else is reported back as invalid"},
                ]
            }
        },
    )


class BatchItemResult(BaseModel):
    """What happened to one item of a batch."""

    index: int
    status: Literal["created", "duplicate", "conflict", "invalid"]
    feedback_id: str | None = None
    errors: list[FieldError] = Field(default_factory=list)


class FeedbackBatchOut(BaseModel):
    """The answer to ``POST /feedback/batch``: a result per item, in order."""

    created: int
    duplicates: int
    rejected: int
    results: list[BatchItemResult]


class PredictionOut(BaseModel):
    """One stored score of a user."""

    scored_at: datetime
    event_ts: datetime
    score: float
    score_rf: float | None
    score_xgb: float | None
    score_seq: float | None
    model_version: str
    latency_ms: float


class UserPredictions(BaseModel):
    """A user's latest score and the score history, newest first."""

    user_id: str
    latest: PredictionOut
    history: list[PredictionOut]


class AtRiskUser(BaseModel):
    """A user whose latest score is at or above the threshold asked for."""

    user_id: str
    score: float
    scored_at: datetime
    model_version: str


class Health(BaseModel):
    """Whether the API can reach what it depends on."""

    status: Literal["ok", "degraded"]
    database: Literal["ok", "unreachable"]
    broker: Literal["ok", "unreachable"]
    pending_feedback: int | None
    """Stored feedback not yet published to ``churn-feedback``; null if unknown."""


class Problem(BaseModel):
    """An error answer: what went wrong and, for bad input, each field at fault."""

    detail: str
    errors: list[FieldError] = Field(default_factory=list)
