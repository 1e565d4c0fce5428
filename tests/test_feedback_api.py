"""The feedback API in-process against a real SQLite database and the real test broker."""

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import httpx
import pytest
import schemathesis
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from kafka import KafkaConsumer
from prometheus_client import REGISTRY
from pydantic import SecretStr, ValidationError
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from churn_stream import storage
from churn_stream.api import create_app
from churn_stream.api.schemas import MAX_BATCH_ITEMS, FeedbackIn
from churn_stream.broker import EmbeddedBroker
from churn_stream.errors import ConfigurationError
from churn_stream.events import Event
from churn_stream.kafka_io import create_topics
from churn_stream.outbox import OutboxPublisher, pending_count
from churn_stream.settings import Settings
from tests.brokers import free_port
from tests.conftest import count_rows, start_service, wait_until

API_KEY = "test-key-5b1f"
JSON = {"content-type": "application/json"}


@pytest.fixture
def client(settings: Settings, engine: sa.Engine) -> TestClient:
    """The API without its outbox publisher: requests only store."""
    return TestClient(create_app(settings, engine, publish=False))


@pytest.fixture
def keyed_client(settings: Settings, engine: sa.Engine) -> TestClient:
    keyed = settings.model_copy(update={"churn_api_key": SecretStr(API_KEY)})
    return TestClient(create_app(keyed, engine, publish=False))


def outcome(user_id: str = "u000001", **extra: object) -> dict[str, object]:
    return {"user_id": user_id, "churned": True, **extra}


def fields_at_fault(response: httpx.Response) -> list[str]:
    return [error["field"] for error in response.json()["errors"]]


def test_docs_and_schema_are_served(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {"/feedback", "/feedback/batch", "/predictions/{user_id}",
                          "/users/at-risk", "/health", "/metrics"}


def test_feedback_is_stored_and_listed(client: TestClient, engine: sa.Engine) -> None:
    observed = "2025-03-01T10:00:00+02:00"
    response = client.post("/feedback", json=outcome(observed_at=observed, source="crm"))
    assert response.status_code == 201
    body = response.json()
    assert body["created"] is True and body["published_at"] is None
    assert body["observed_at"] == "2025-03-01T08:00:00Z"
    listed = client.get("/feedback", params={"user_id": "u000001"}).json()
    assert [(f["feedback_id"], f["churned"], f["source"]) for f in listed] == [
        (body["feedback_id"], True, "crm")
    ]
    assert client.get("/feedback", params={"user_id": "nobody"}).json() == []
    assert count_rows(engine, storage.feedback) == 1


def test_same_feedback_id_twice_stores_one_row(client: TestClient, engine: sa.Engine) -> None:
    first = client.post("/feedback", json=outcome(feedback_id="crm-1"))
    again = client.post("/feedback", json=outcome(feedback_id="crm-1"))
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["created"] is False
    assert again.json()["received_at"] == first.json()["received_at"]
    assert count_rows(engine, storage.feedback) == 1


def test_feedback_id_reused_for_another_outcome_is_a_conflict(
    client: TestClient, engine: sa.Engine
) -> None:
    client.post("/feedback", json=outcome(feedback_id="crm-2"))
    response = client.post("/feedback", json={**outcome(feedback_id="crm-2"), "churned": False})
    assert response.status_code == 409
    assert "crm-2" in response.json()["detail"]
    assert count_rows(engine, storage.feedback) == 1


FUTURE = (datetime.now(UTC) + timedelta(days=2)).isoformat()
BAD_BODIES = {
    "string for a boolean": ('{"user_id": "u1", "churned": "NO"}', "body.churned"),
    "number for a boolean": ('{"user_id": "u1", "churned": 1}', "body.churned"),
    "NaN for a boolean": ('{"user_id": "u1", "churned": NaN}', "body.churned"),
    "infinity for a string": ('{"user_id": "u1", "churned": true, "source": Infinity}',
                              "body.source"),
    "NaN for a time": ('{"user_id": "u1", "churned": true, "observed_at": NaN}',
                       "body.observed_at"),
    "number for a time": ('{"user_id": "u1", "churned": true, "observed_at": 1700000000}',
                          "body.observed_at"),
    "time in the future": (json.dumps(outcome("u1", observed_at=FUTURE)), "body.observed_at"),
    "time without zone": ('{"user_id": "u1", "churned": true, '
                          '"observed_at": "2025-01-01T00:00:00"}', "body.observed_at"),
    "unknown field": ('{"user_id": "u1", "churned": true, "score": 0.3}', "body.score"),
    "missing field": ('{"user_id": "u1"}', "body.churned"),
    "empty user": ('{"user_id": "  ", "churned": true}', "body.user_id"),
    "NUL in user": ('{"user_id": "u\\u0000", "churned": true}', "body.user_id"),
    "escape in user": ('{"user_id": "u\\u001b[31m", "churned": true}', "body.user_id"),
    "user with a leading space": ('{"user_id": " u1", "churned": true}', "body.user_id"),
    "129-char user": (json.dumps(outcome("u" * 129)), "body.user_id"),
    "wrong feedback_id": ('{"user_id": "u1", "churned": true, "feedback_id": "a b"}',
                          "body.feedback_id"),
}


@pytest.mark.parametrize("raw,field", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_input_is_422_naming_the_field(
    client: TestClient, engine: sa.Engine, raw: str, field: str
) -> None:
    response = client.post("/feedback", content=raw, headers=JSON)
    assert response.status_code == 422
    assert fields_at_fault(response) == [field]
    assert field in response.json()["detail"]
    assert count_rows(engine, storage.feedback) == 0


@pytest.mark.parametrize("user_id", ["u\x00", "u\x1f", "u\x7f", " u1", "u1\t", "\u00a0u1",
                                     "\ud800", "u" * 129, ""])
def test_feedback_user_ids_follow_the_event_rule(user_id: str) -> None:
    with pytest.raises(ValidationError):
        Event(user_id=user_id, event_type="login", ts=datetime.now(UTC))
    with pytest.raises(ValidationError):
        FeedbackIn(user_id=user_id, churned=True)


@pytest.mark.parametrize("user_id", ["u1", "a b", "ünïcødé", "user/with/slash", "u" * 128])
def test_user_ids_either_takes_are_kept_as_sent(user_id: str) -> None:
    event = Event(user_id=user_id, event_type="login", ts=datetime.now(UTC))
    assert FeedbackIn(user_id=user_id, churned=True).user_id == event.user_id == user_id
    assert event.key() == user_id.encode()


def test_user_id_reads_refuse_what_no_write_takes(client: TestClient) -> None:
    for path in ("/predictions/u%00", "/predictions/%20u1", "/feedback?user_id=u%1b",
                 "/predictions/u1%0A", "/predictions/a%0Ab"):
        response = client.get(path)
        assert response.status_code == 422, path
        assert "control characters" in response.text or "whitespace" in response.text


def test_error_answers_quote_a_long_user_id_cut_short(client: TestClient) -> None:
    response = client.get("/predictions/" + "x" * 128)
    assert response.status_code == 404
    assert len(response.json()["detail"]) < 100 and "(128 chars)" in response.json()["detail"]


@pytest.mark.parametrize("params,field", [
    ({"threshold": "nan"}, "query.threshold"),
    ({"threshold": "inf"}, "query.threshold"),
    ({"threshold": "1.5"}, "query.threshold"),
    ({"limit": "0"}, "query.limit"),
    ({"limit": "ten"}, "query.limit"),
])
def test_bad_query_is_422_naming_the_parameter(
    client: TestClient, params: dict[str, str], field: str
) -> None:
    response = client.get("/users/at-risk", params=params)
    assert response.status_code == 422
    assert fields_at_fault(response) == [field]


def test_batch_reports_each_item(client: TestClient, engine: sa.Engine) -> None:
    items = [
        outcome("u1", feedback_id="b-1"),
        {"user_id": "u2", "churned": "NO"},
        outcome("u1", feedback_id="b-1"),
        7,
        {**outcome("u3", feedback_id="b-1")},
        outcome("u4", observed_at=FUTURE),
        {"user_id": "u5", "churned": False},
    ]
    response = client.post("/feedback/batch", json={"items": items})
    assert response.status_code == 200
    body = response.json()
    assert [r["status"] for r in body["results"]] == [
        "created", "invalid", "duplicate", "invalid", "conflict", "invalid", "created"
    ]
    assert [e["field"] for r in body["results"] for e in r["errors"]] == [
        "items.1.churned", "items.3", "items.5.observed_at"
    ]
    assert (body["created"], body["duplicates"], body["rejected"]) == (2, 1, 4)
    assert count_rows(engine, storage.feedback) == 2


@pytest.mark.parametrize("size", [0, MAX_BATCH_ITEMS + 1])
def test_empty_or_oversize_batch_is_422(client: TestClient, engine: sa.Engine, size: int) -> None:
    items = [outcome(f"u{i}") for i in range(size)]
    response = client.post("/feedback/batch", json={"items": items})
    assert response.status_code == 422
    assert fields_at_fault(response) == ["body.items"]
    assert count_rows(engine, storage.feedback) == 0


def test_bad_bodies_get_the_code_the_schema_documents(client: TestClient) -> None:
    documented = client.get("/openapi.json").json()["paths"]["/feedback"]["post"]["responses"]
    answers = {
        b'{"user_id": "u1",': (422, "body.17"),  # JSON that does not parse: 422, not 400
        b"[1,2": (422, "body.4"),
        "\x00\xff".encode(): (422, "body.0"),
        b"": (422, "body"),
        b'{"user_id": "u1"}\xff': (400, None),  # not UTF-8: FastAPI's own 400
    }
    for raw, (code, field) in answers.items():
        response = client.post("/feedback", content=raw, headers=JSON)
        assert response.status_code == code, raw
        assert str(code) in documented, raw
        if field:
            assert fields_at_fault(response) == [field], raw
    assert "not parseable JSON" in documented["422"]["description"]
    assert "JSON" not in documented["400"]["description"]


# --- The body size limit ---------------------------------------------------------------------

SMALL_LIMIT_BYTES = 1000
LONG_STREAM = [b"x" * 100] * 1000
"""A chunked body a hundred times the small limit (finite: a test must fail, not hang)."""


@pytest.fixture
def small_limit_app(settings: Settings, engine: sa.Engine) -> FastAPI:
    limited = settings.model_copy(update={"feedback_max_body_bytes": SMALL_LIMIT_BYTES})
    return create_app(limited, engine, publish=False)


def padded_outcome(size_bytes: int, user_id: str) -> bytes:
    """A valid outcome as JSON of exactly ``size_bytes`` (trailing blanks are valid JSON)."""
    raw = json.dumps(outcome(user_id)).encode()
    return raw + b" " * (size_bytes - len(raw))


def post_streamed(app: FastAPI, chunks: Iterable[bytes], headers: dict[str, str] | None = None,
                  path: str = "/feedback") -> tuple[httpx.Response, int]:
    """POST a body sent chunk by chunk (chunked unless ``headers`` give a Content-Length);
    the answer and how many chunks the server pulled."""
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for chunk in chunks:
            pulled += 1
            yield chunk

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as api:
            return await api.post(path, content=body(), headers={**JSON, **(headers or {})})

    return asyncio.run(post()), pulled


def test_a_full_batch_of_the_longest_items_fits_the_default_limit(
    client: TestClient, engine: sa.Engine
) -> None:
    observed = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    items = [{"user_id": f"{i:04d}".ljust(128, "u"), "churned": i % 2 == 0,
              "observed_at": observed, "source": "s" * 64, "feedback_id": f"{i:04d}".ljust(64, "f")}
             for i in range(MAX_BATCH_ITEMS)]
    raw = json.dumps({"items": items}, indent=4).encode()
    assert 2 * len(raw) < Settings().feedback_max_body_bytes
    response = client.post("/feedback/batch", content=raw, headers=JSON)
    assert response.status_code == 200
    assert response.json()["created"] == MAX_BATCH_ITEMS
    assert count_rows(engine, storage.feedback) == MAX_BATCH_ITEMS


def test_a_body_at_the_limit_is_read_and_one_byte_more_is_413(
    small_limit_app: FastAPI, engine: sa.Engine
) -> None:
    client = TestClient(small_limit_app)
    refused_before = too_large_count()
    at_limit = client.post("/feedback", content=padded_outcome(SMALL_LIMIT_BYTES, "u1"),
                           headers=JSON)
    assert at_limit.status_code == 201
    over = client.post("/feedback", content=padded_outcome(SMALL_LIMIT_BYTES + 1, "u2"),
                       headers=JSON)
    assert over.status_code == 413
    assert "FEEDBACK_MAX_BODY_BYTES" in over.json()["detail"]
    assert count_rows(engine, storage.feedback) == 1
    assert too_large_count() == refused_before + 1


def too_large_count() -> float:
    return REGISTRY.get_sample_value("feedback_api_errors_total", {"kind": "too_large"}) or 0.0


@pytest.mark.timeout(30)
def test_a_declared_oversize_body_is_refused_before_a_byte_is_read(
    small_limit_app: FastAPI
) -> None:
    declared = {"Content-Length": str(SMALL_LIMIT_BYTES + 1)}
    response, pulled = post_streamed(small_limit_app, [b"x"] * (SMALL_LIMIT_BYTES + 1), declared)
    assert (response.status_code, pulled) == (413, 0)


@pytest.mark.timeout(30)
def test_a_chunked_body_is_cut_off_once_past_the_limit(small_limit_app: FastAPI) -> None:
    response, pulled = post_streamed(small_limit_app, LONG_STREAM)
    assert response.status_code == 413
    assert pulled == SMALL_LIMIT_BYTES // 100 + 1, "read on past the limit"


@pytest.mark.timeout(30)
def test_the_key_is_checked_before_the_body_is_read(settings: Settings, engine: sa.Engine) -> None:
    keyed = settings.model_copy(update={"churn_api_key": SecretStr(API_KEY),
                                        "feedback_max_body_bytes": SMALL_LIMIT_BYTES})
    app = create_app(keyed, engine, publish=False)
    client = TestClient(app)
    oversize = b"x" * (SMALL_LIMIT_BYTES + 1)
    for headers in ({}, {"X-API-Key": "wrong"}):
        for path in ("/feedback", "/feedback/batch"):
            for raw in (b'{"user_id": "u1",', oversize):  # a 422 and a 413, were it read
                answer = client.post(path, content=raw, headers={**JSON, **headers})
                assert answer.status_code == 401, (path, headers, raw[:20])
        response, pulled = post_streamed(app, LONG_STREAM, headers)
        assert (response.status_code, pulled) == (401, 0)
    right = {**JSON, "X-API-Key": API_KEY}
    assert client.post("/feedback", content=oversize, headers=right).status_code == 413
    assert client.post("/feedback", content=b"{", headers=right).status_code == 422
    assert count_rows(engine, storage.feedback) == 0


@pytest.mark.timeout(30)
def test_a_chunked_body_within_the_limit_is_stored(
    small_limit_app: FastAPI, engine: sa.Engine
) -> None:
    raw = padded_outcome(SMALL_LIMIT_BYTES, "u1")
    response, _ = post_streamed(small_limit_app, [raw[i:i + 64] for i in range(0, len(raw), 64)])
    assert response.status_code == 201
    assert count_rows(engine, storage.feedback) == 1


def test_write_endpoints_need_the_api_key(keyed_client: TestClient, engine: sa.Engine) -> None:
    assert keyed_client.post("/feedback", json=outcome()).status_code == 401
    wrong = {"X-API-Key": "guess"}
    assert keyed_client.post("/feedback", json=outcome(), headers=wrong).status_code == 401
    batch = {"items": [outcome()]}
    assert keyed_client.post("/feedback/batch", json=batch).status_code == 401
    assert count_rows(engine, storage.feedback) == 0
    right = {"X-API-Key": API_KEY}
    assert keyed_client.post("/feedback", json=outcome(), headers=right).status_code == 201
    assert keyed_client.get("/feedback").status_code == 200  # reads stay open


def test_secrets_stay_out_of_health_and_logs(
    keyed_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    keyed_client.post("/feedback", json=outcome(), headers={"X-API-Key": "wrong-secret-guess"})
    health = keyed_client.get("/health").text
    assert API_KEY not in health and API_KEY not in caplog.text
    assert "wrong-secret-guess" not in caplog.text


def add_predictions(engine: sa.Engine, rows: list[tuple[str, str, float]]) -> None:
    """Predictions (user, scored_at ISO, score) of model v1."""
    with engine.begin() as conn:
        conn.execute(sa.insert(storage.predictions), [
            {"user_id": user, "scored_at": datetime.fromisoformat(at),
             "event_ts": datetime.fromisoformat(at) - timedelta(seconds=1), "score": score,
             "score_rf": score, "score_xgb": None, "score_seq": None, "model_version": "v1",
             "latency_ms": 2.5}
            for user, at, score in rows
        ])


def test_predictions_and_users_at_risk(client: TestClient, engine: sa.Engine) -> None:
    add_predictions(engine, [
        ("a", "2025-01-01T10:00:00", 0.2), ("a", "2025-01-02T10:00:00", 0.9),
        ("b", "2025-01-02T10:00:00", 0.8), ("b", "2025-01-03T10:00:00", 0.4),
        ("c", "2025-01-01T10:00:00", 0.6),
    ])
    history = client.get("/predictions/a").json()
    assert history["latest"]["score"] == 0.9
    assert history["latest"]["scored_at"] == "2025-01-02T10:00:00Z"
    assert [p["score"] for p in history["history"]] == [0.9, 0.2]
    assert [p["score"] for p in client.get("/predictions/a?limit=1").json()["history"]] == [0.9]
    assert client.get("/predictions/nobody").status_code == 404
    at_risk = client.get("/users/at-risk", params={"threshold": 0.5}).json()
    assert [(u["user_id"], u["score"]) for u in at_risk] == [("a", 0.9), ("c", 0.6)]
    top = client.get("/users/at-risk", params={"threshold": 0.0, "limit": 2}).json()
    assert [u["user_id"] for u in top] == ["a", "c"]


@pytest.mark.parametrize("user_id", ["user/with/slash", "/leading", "a//b", "at-risk", "x?y#z"])
def test_any_user_id_round_trips_through_predictions(
    client: TestClient, engine: sa.Engine, user_id: str
) -> None:
    add_predictions(engine, [(user_id, "2025-01-02T10:00:00", 0.7)])
    response = client.get(f"/predictions/{quote(user_id, safe='')}")
    assert response.status_code == 200, response.text
    assert response.json()["user_id"] == user_id
    assert client.get("/users/at-risk").json()[0]["user_id"] == user_id
    metrics = client.get("/metrics").text
    assert 'route="/predictions/{user_id}",status="200"' in metrics


def test_health_and_metrics(client: TestClient) -> None:
    client.post("/feedback", json=outcome())
    client.post("/feedback", json={"user_id": "u1", "churned": "NO"})
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "database": "ok", "broker": "ok",
                             "pending_feedback": 1}
    metrics = client.get("/metrics").text
    assert 'feedback_received_total{status="created"}' in metrics
    assert 'feedback_api_requests_total{method="POST",route="/feedback",status="422"}' in metrics
    assert 'feedback_api_errors_total{kind="validation"}' in metrics


def test_health_reports_an_unreachable_broker(settings: Settings, engine: sa.Engine) -> None:
    offline = settings.model_copy(update={"kafka_bootstrap_servers": f"127.0.0.1:{free_port()}"})
    response = TestClient(create_app(offline, engine, publish=False)).get("/health")
    assert response.status_code == 503
    assert response.json()["broker"] == "unreachable"


@pytest.mark.timeout(60)
def test_health_answers_while_batches_are_written(settings: Settings, engine: sa.Engine) -> None:
    # Were the writes on the event loop, no /health answer could complete before they end.
    app = create_app(settings, engine, publish=False)
    batches = [{"items": [outcome(f"w{b}-{i}") for i in range(MAX_BATCH_ITEMS)]}
               for b in range(4)]

    async def scenario() -> tuple[int, float]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as api:
            writes = [asyncio.create_task(api.post("/feedback/batch", json=b)) for b in batches]
            answered_during_writes, slowest_s = 0, 0.0
            while not all(w.done() for w in writes):
                started = time.perf_counter()
                assert (await api.get("/health")).status_code == 200
                slowest_s = max(slowest_s, time.perf_counter() - started)
                answered_during_writes += not all(w.done() for w in writes)
            assert all(r.status_code == 200 for r in await asyncio.gather(*writes))
            return answered_during_writes, slowest_s

    answered, slowest_s = asyncio.run(scenario())
    assert count_rows(engine, storage.feedback) == 4 * MAX_BATCH_ITEMS
    assert answered >= 3, f"only {answered} /health answers while the batches were written"
    assert slowest_s < 2.0, f"/health took {slowest_s:.3f} s during writes"


def read_topic(bootstrap_servers: str, topic: str, expected: int, timeout_s: float = 30) -> list:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap_servers, group_id=None,
                             auto_offset_reset="earliest", consumer_timeout_ms=3000)
    records: list = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(records) < expected:
        records.extend(r for batch in consumer.poll(timeout_ms=500).values() for r in batch)
    # A little longer, to see any record that should not be there.
    records.extend(r for batch in consumer.poll(timeout_ms=1000).values() for r in batch)
    consumer.close()
    return records


@pytest.mark.timeout(90)
def test_stored_feedback_is_published_once(topics: Settings, engine: sa.Engine) -> None:
    with TestClient(create_app(topics, engine)) as api:
        ids = [api.post("/feedback", json=outcome(f"p{i}")).json()["feedback_id"]
               for i in range(5)]
        assert wait_until(lambda: pending_count(engine) == 0, timeout_s=30)
    records = read_topic(topics.bootstrap_servers, topics.topic_feedback, expected=5)
    assert sorted(json.loads(r.value)["feedback_id"] for r in records) == sorted(ids)
    assert {r.key for r in records} == {f"p{i}".encode() for i in range(5)}


@pytest.mark.timeout(120)
def test_feedback_stored_while_the_broker_is_down_is_published_when_it_returns(
    settings: Settings, engine: sa.Engine
) -> None:
    broker = EmbeddedBroker(free_port())
    local = settings.model_copy(update={"kafka_bootstrap_servers": broker.bootstrap_servers,
                                        "outbox_interval_s": 0.2})
    topic = local.topic_feedback
    with TestClient(create_app(local, engine)) as api:
        broker.start()
        create_topics(broker.bootstrap_servers, [_feedback_topic(topic)])
        first = api.post("/feedback", json=outcome("before")).json()["feedback_id"]
        assert wait_until(lambda: pending_count(engine) == 0, timeout_s=30)
        broker.stop()
        down = api.post("/feedback", json=outcome("during")).json()["feedback_id"]
        time.sleep(2)
        assert pending_count(engine) == 1, "published to a broker that is down"
        # Tansu keeps nothing across a restart: the topic comes back empty.
        broker.start()
        try:
            create_topics(broker.bootstrap_servers, [_feedback_topic(topic)])
            assert wait_until(lambda: pending_count(engine) == 0, timeout_s=60)
            records = read_topic(broker.bootstrap_servers, topic, expected=1)
        finally:
            broker.stop()
    assert [json.loads(r.value)["feedback_id"] for r in records] == [down]
    assert first != down


def _feedback_topic(name: str):
    from kafka.admin import NewTopic

    return NewTopic(name, 1, 1)


def test_outbox_pass_without_broker_keeps_rows_pending(
    settings: Settings, engine: sa.Engine
) -> None:
    client = TestClient(create_app(settings, engine, publish=False))
    client.post("/feedback", json=outcome())
    publisher = OutboxPublisher(engine, f"127.0.0.1:{free_port()}", settings.topic_feedback)
    with pytest.raises(Exception, match="no broker answers"):
        publisher.publish_pending()
    assert pending_count(engine) == 1


EXAMPLES_PER_OPERATION = 40


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_no_5xx_for_any_input(topics: Settings, engine: sa.Engine, mode: GenerationMode) -> None:
    keyed = topics.model_copy(update={"churn_api_key": SecretStr(API_KEY)})
    add_predictions(engine, [("u000042", "2025-01-02T10:00:00", 0.7)])
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(keyed, engine,
                                                                       publish=False))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 7

    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.path in ("/health", "/metrics"):
            continue  # no input to get wrong

        @given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis_settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None,
                             suppress_health_check=list(HealthCheck), derandomize=True,
                             database=None)
        def call(case: schemathesis.Case) -> None:
            # Rules beyond JSON Schema ("not in the future", text a database can hold)
            # reject some schema-valid input with 422 by design: that check is left out.
            case.call_and_validate(headers={"X-API-Key": API_KEY},
                                   excluded_checks=[positive_data_acceptance])

        call()


@pytest.mark.parametrize("host,key,refused", [
    ("127.0.0.1", None, False), ("localhost", None, False), ("::1", None, False),
    ("0.0.0.0", None, True), ("feedback-api", None, True), ("0.0.0.0", "k", False),
    ("0.0.0.0", "", True), ("0.0.0.0", "  ", True),
])
def test_the_api_refuses_to_listen_beyond_loopback_without_a_key(
    host: str, key: str | None, refused: bool
) -> None:
    from feedback_api import check_exposure

    settings = Settings(feedback_api_host=host, churn_api_key=key)
    if refused:
        with pytest.raises(ConfigurationError, match="set CHURN_API_KEY"):
            check_exposure(settings)
    else:
        check_exposure(settings)


@pytest.mark.timeout(60)
def test_a_refused_start_is_one_error_line_and_a_nonzero_exit(settings: Settings) -> None:
    process = start_service("feedback_api.py", settings, FEEDBACK_API_HOST="0.0.0.0",
                            CHURN_API_KEY="")
    output = process.communicate(timeout=50)[0].decode()
    errors = [line for line in output.splitlines() if "ERROR" in line.split()]
    assert process.returncode == 1, output
    assert "Traceback" not in output
    assert len(errors) == 1 and "set CHURN_API_KEY" in errors[0], output
