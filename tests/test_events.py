"""The event schema: what it accepts, and the reason it gives for what it refuses."""

import json
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from churn_stream.errors import InvalidEvent
from churn_stream.events import MAX_PAYLOAD_BYTES, Event, parse_event

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


def good(**changes: object) -> dict:
    document = {
        "event_id": str(uuid4()),
        "user_id": "u1",
        "event_type": "session_end",
        "ts": "2026-06-01T11:00:00+02:00",
        "numeric": {"duration_s": 300.5},
        "categorical": {"plan": "basic"},
    }
    document.update(changes)
    return document


def reason_for(raw: bytes) -> str:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(raw, max_ahead_s=86_400, now=NOW)
    return caught.value.reason


def test_a_valid_event_round_trips_and_is_normalised_to_utc() -> None:
    event = parse_event(json.dumps(good()).encode(), max_ahead_s=86_400, now=NOW)
    assert event.ts == datetime(2026, 6, 1, 9, tzinfo=UTC)
    assert parse_event(event.to_bytes(), max_ahead_s=86_400, now=NOW) == event
    assert event.key() == b"u1"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json at all", "not_json"),
        (b"[1, 2, 3]", "not_object"),
        (b"\xff\xfe\x00garbage", "not_utf8"),
        (json.dumps(good(user_id=None)).encode(), "invalid_field"),
        (json.dumps({k: v for k, v in good().items() if k != "user_id"}).encode(), "invalid_field"),
        (json.dumps(good(ts="yesterday")).encode(), "invalid_field"),
        (json.dumps(good(ts="2026-06-01T11:00:00")).encode(), "invalid_field"),
        (json.dumps(good(event_type="")).encode(), "invalid_field"),
        (json.dumps(good(event_type="x" * 500)).encode(), "invalid_field"),
        (json.dumps(good(numeric={"amount": "ten"})).encode(), "invalid_field"),
        (json.dumps(good(surprise=1)).encode(), "invalid_field"),
        (json.dumps(good(ts="2030-01-01T00:00:00Z")).encode(), "future_ts"),
        # Out of range: these once raised OverflowError and took the consumer down.
        (json.dumps(good(ts="0001-01-01T00:00:00+01:00")).encode(), "invalid_field"),
        (json.dumps(good(ts="9999-12-31T23:59:59-01:00")).encode(), "invalid_field"),
        (json.dumps(good(ts="1970-01-01T00:00:00Z")).encode(), "invalid_field"),
        (json.dumps(good(ts=1700000000)).encode(), "invalid_field"),
        (json.dumps(good(numeric={"amount": "5"})).encode(), "invalid_field"),
        (json.dumps(good(numeric={"amount": True})).encode(), "invalid_field"),
        (json.dumps(good(numeric={"amount": 1e308})).encode(), "invalid_field"),
        (json.dumps(good(user_id="u\x00")).encode(), "invalid_field"),
        (json.dumps(good(user_id="u\x1b[2J")).encode(), "invalid_field"),
        # Stored as "u1" it would be keyed apart from u1's other events: refused, not stripped.
        (json.dumps(good(user_id=" u1")).encode(), "invalid_field"),
        (json.dumps(good(user_id="u1\n")).encode(), "invalid_field"),
        (b"", "empty"),
        (b"{" + b" " * MAX_PAYLOAD_BYTES + b"}", "too_large"),
    ],
)
def test_each_kind_of_bad_record_has_its_reason(raw: bytes, reason: str) -> None:
    assert reason_for(raw) == reason


def test_the_detail_names_the_failing_field() -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(json.dumps(good(user_id=7)).encode(), max_ahead_s=0, now=NOW)
    assert "user_id" in caught.value.detail


def test_non_finite_numbers_are_refused() -> None:
    raw = (
        b'{"user_id": "u", "event_type": "purchase", "ts": "2026-01-01T00:00:00Z", '
        b'"numeric": {"amount": NaN}}'
    )
    assert reason_for(raw) == "invalid_field"


def test_an_event_slightly_ahead_of_the_clock_is_accepted() -> None:
    ts = (NOW + timedelta(hours=1)).isoformat()
    assert parse_event(json.dumps(good(ts=ts)).encode(), max_ahead_s=86_400, now=NOW)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_invalid_event(raw: bytes) -> None:
    try:
        parse_event(raw, max_ahead_s=86_400, now=NOW)
    except InvalidEvent:
        pass


def test_events_are_immutable() -> None:
    event = Event(user_id="u", event_type="login", ts=NOW)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error type is internal
        event.user_id = "v"  # type: ignore[misc]
