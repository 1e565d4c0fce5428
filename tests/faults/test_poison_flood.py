"""A poison flood: one record in ten malformed, of every kind the consumer tells apart.

The dead-letter topic must hold exactly the bad records, each once with its reason and
its original bytes, and every good event must be stored.
"""

import json
from collections import Counter

import pytest
import sqlalchemy as sa

from churn_stream.settings import Settings
from tests.faults.conftest import (
    Figures,
    read_topic,
    send_all,
    simulated_events,
    stored_event_ids,
    wait_for_rows,
)

RECORDS = 5_000
BAD_EVERY = 10


def poison(index: int) -> tuple[bytes | None, str]:
    """The ``index``-th bad record (unique bytes) and the reason it must be dead-lettered for."""
    kinds: list[tuple[bytes | None, str]] = [
        (b"{not json %d" % index, "not_json"),
        (json.dumps([index, "login"]).encode(), "not_object"),
        (json.dumps({"event_type": "login", "ts": "2026-01-01T00:00:00Z", "n": index}).encode(),
         "invalid_field"),
        (json.dumps({"user_id": f"u{index}", "event_type": 3, "ts": index}).encode(),
         "invalid_field"),
        (json.dumps({"user_id": f"u{index}", "event_type": "Bad Type!",
                     "ts": "2026-01-01T00:00:00Z"}).encode(), "invalid_field"),
        (json.dumps({"user_id": f"u{index}", "event_type": "login",
                     "ts": "2060-01-01T00:00:00Z"}).encode(), "future_ts"),
        (b'{"user_id": "\xc3\x28%d"}' % index, "not_utf8"),
        (None, "empty"),
    ]
    return kinds[index % len(kinds)]


@pytest.mark.faults
@pytest.mark.timeout(120)
def test_poison_flood_dead_letters_exactly_the_bad_records(
    topics: Settings, engine: sa.Engine, services, report
) -> None:
    settings = topics
    good = simulated_events(RECORDS - RECORDS // BAD_EVERY, users=150, seed=75)
    records: list[tuple[bytes, bytes | None]] = []
    expected_reasons: Counter[str] = Counter()
    good_iter = iter(good)
    for index in range(RECORDS):
        if index % BAD_EVERY == BAD_EVERY - 1:
            value, reason = poison(index // BAD_EVERY)
            records.append((b"poison", value))
            expected_reasons[reason] += 1
        else:
            event = next(good_iter)
            records.append((event.key(), event.to_bytes()))
    bad = sum(expected_reasons.values())

    consumer = services("consumer.py", settings)
    send_all(settings, records)
    assert wait_for_rows(engine, len(good), 60), consumer.tail()
    dead = read_topic(settings, settings.topic_dead_letter, bad, timeout_s=60, settle_s=3)
    assert consumer.stop() == 0, consumer.tail()

    figures = Figures.count("poison flood", [str(e.event_id) for e in good],
                            stored_event_ids(engine))
    report(figures, bad_records=bad, dead_lettered=len(dead))
    assert (figures.stored, figures.duplicated, figures.lost) == (len(good), 0, 0)
    assert len(dead) == bad == RECORDS // BAD_EVERY
    headers = [dict(r.headers) for r in dead]
    assert len({h["source"] for h in headers}) == bad, "a bad record was dead-lettered twice"
    assert Counter(h["reason"].decode() for h in headers) == expected_reasons
    sent_bad = Counter(value or b"" for _key, value in records if _key == b"poison")
    assert Counter(r.value for r in dead) == sent_bad, "dead letters keep the original bytes"
