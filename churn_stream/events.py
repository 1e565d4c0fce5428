"""The user-activity event: one validated schema, JSON on the wire, keyed by ``user_id``.

``event_type`` is an open vocabulary: the simulator emits the names in ``SIMULATOR_TYPES``;
a replayed dataset brings its own. Properties are split by kind so that features can treat
them generically: ``numeric`` values are summed and averaged, ``categorical`` ones are the
latest profile attributes.
"""

import json
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from uuid import UUID, uuid4

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from churn_stream.errors import InvalidEvent

SIMULATOR_TYPES = (
    "login",
    "page_view",
    "session_end",
    "purchase",
    "support_ticket",
    "plan_change",
    "payment_failed",
    "subscription_cancelled",
)
CANCELLATION_TYPE = "subscription_cancelled"
PROFILE_TYPE = "profile"
MAX_PAYLOAD_BYTES = 64 * 1024
EARLIEST_TS = datetime(2000, 1, 1, tzinfo=UTC)
LATEST_TS = datetime(2068, 1, 1, tzinfo=UTC)
"""Event times outside these are refused: the feature store keeps times as 32-bit seconds
since 2000, and a stray 1970 stretches a training run over half a century."""
MAX_ABS_NUMBER = 1e15
"""Larger numeric properties are refused: they overflow the feature store's float32 sums."""

MAX_USER_ID_CHARS = 128
SHOWN_USER_ID_CHARS = 40
"""Most characters of a user id that an error message repeats."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_user_id(value: str) -> str:
    """Refuse control characters, surrounding whitespace and text no UTF-8 can hold.

    A user id is never rewritten: the id on the wire is the Kafka key, the stored value and
    the one the APIs answer to. Stripping it instead would file a record keyed " u1" on
    another partition than "u1" while storing both as "u1".
    """
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    if value != value.strip():
        raise ValueError("must not begin or end with whitespace")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which JSON can carry as "\ud800"
        raise ValueError("must be valid UTF-8 text") from None
    return value


def shown_user_id(value: str) -> str:
    """``value`` quoted for a message, cut to ``SHOWN_USER_ID_CHARS`` with its length said.

    >>> shown_user_id("u" * 50)
    "'uuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuu'... (50 chars)"
    """
    if len(value) <= SHOWN_USER_ID_CHARS:
        return repr(value)
    return f"{value[:SHOWN_USER_ID_CHARS]!r}... ({len(value)} chars)"


Name = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.]{0,47}$")]
UserId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_USER_ID_CHARS),
                   AfterValidator(check_user_id)]
"""A user id as every part of the stack takes it (events, feedback, the read APIs)."""


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    if abs(value) > MAX_ABS_NUMBER:
        raise ValueError(f"must be within +-{MAX_ABS_NUMBER:g}")
    return value


def _utc(value: datetime) -> datetime:
    try:
        value = value.astimezone(UTC)
    except OverflowError:  # year 1 or 9999 with an offset: not a ValueError, pydantic lets it out
        raise ValueError("is out of range") from None
    if not EARLIEST_TS <= value < LATEST_TS:
        raise ValueError(f"must be from {EARLIEST_TS.year} to before {LATEST_TS.year}")
    return value


class Event(BaseModel):
    """One thing a user did, at event time ``ts``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: UUID = Field(default_factory=uuid4)
    """Idempotency key: a redelivered event is stored once."""
    user_id: UserId
    event_type: Name
    ts: Annotated[AwareDatetime, AfterValidator(_utc)]
    numeric: dict[Name, Annotated[float, AfterValidator(_finite)]] = Field(
        default_factory=dict, max_length=32
    )
    categorical: dict[Name, Annotated[str, StringConstraints(max_length=128)]] = Field(
        default_factory=dict, max_length=32
    )

    def to_bytes(self) -> bytes:
        """The wire form: compact UTF-8 JSON."""
        return self.model_dump_json().encode()

    def key(self) -> bytes:
        """The Kafka key; all of one user's events go to one partition, in order."""
        return self.user_id.encode()


def parse_event(raw: bytes | None, max_ahead_s: float, now: datetime | None = None) -> Event:
    """Decode and validate one record, or raise ``InvalidEvent`` saying why."""
    if not raw:
        raise InvalidEvent("empty", "record has no value")
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise InvalidEvent("too_large", f"{len(raw)} bytes, limit {MAX_PAYLOAD_BYTES}")
    try:
        # pydantic parses JSON in Rust, several times faster than json.loads + validate.
        # Strict on the wire: a time is an ISO string (not a number), a number is a number
        # (not "5" or true). Events built in Python (replay readers) are converted leniently.
        event = Event.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise _classify(raw, exc) from None
    limit = (now or datetime.now(UTC)) + timedelta(seconds=max_ahead_s)
    if event.ts > limit:
        raise InvalidEvent("future_ts", f"ts {event.ts.isoformat()} is after {limit.isoformat()}")
    return event


def _classify(raw: bytes, exc: ValidationError) -> InvalidEvent:
    """The reason a record failed, told apart on the slow path that only bad records take."""
    try:
        document: Any = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        return InvalidEvent("not_utf8", str(error))
    except ValueError as error:
        return InvalidEvent("not_json", str(error))
    if not isinstance(document, dict):
        return InvalidEvent("not_object", f"expected a JSON object, got {type(document).__name__}")
    return InvalidEvent("invalid_field", _describe(exc))


def _describe(exc: ValidationError) -> str:
    """Name each failing field and what is wrong with it, briefly."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in error["loc"]) or "event"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
