"""The predictor's HTTP API in process, over the real serving path and a trained model."""

from datetime import UTC, datetime
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from churn_stream import storage
from churn_stream.features import FeatureStore
from churn_stream.predictor.http import create_app
from churn_stream.predictor.retrain import ModelHolder, Retrainer
from churn_stream.predictor.serving import Serving
from churn_stream.predictor.state import UserState
from tests.simulated import simulated_events, trained_model


@pytest.fixture
def api(engine: sa.Engine) -> TestClient:
    """The predictor's API serving the shared trained model; users are read from ``engine``."""
    model, _ = trained_model()
    holder = ModelHolder()
    holder.promote(model)
    retrainer = Retrainer(engine, "test", holder, train=None, judge=None)  # type: ignore[arg-type]
    state = UserState(FeatureStore(), engine)
    return TestClient(create_app(Serving("test", holder, state, lambda: retrainer.running)))


def store_user(engine: sa.Engine, user_id: str) -> None:
    """One simulated user's history, stored under ``user_id``."""
    events = simulated_events()
    first = events[0].user_id
    renamed = [e.model_copy(update={"user_id": user_id}) for e in events if e.user_id == first]
    storage.write_events(engine, renamed, datetime.now(UTC))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("user_id", ["user/with/slash", "/leading", "a//b", "model", "x?y#z"])
def test_any_user_id_round_trips_through_predict(
    api: TestClient, engine: sa.Engine, user_id: str
) -> None:
    store_user(engine, user_id)
    response = api.get(f"/predict/{quote(user_id, safe='')}")
    assert response.status_code == 200, response.text
    assert response.json()["user_id"] == user_id


@pytest.mark.timeout(120)
def test_other_routes_are_not_shadowed_and_unknown_users_are_404(api: TestClient) -> None:
    assert api.get("/health").json()["status"] == "serving"
    assert api.get("/model").json()["version"] == "sim-1"
    assert "model_prediction_latency_seconds" in api.get("/metrics").text
    assert api.get("/predict/nobody%2Fhere").status_code == 404


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("path", "reason"), [
    ("x" * 5000, "at most 128 characters"), ("%20u000042", "whitespace"),
    ("u000042%20", "whitespace"), ("%00", "control characters"), ("", "at least 1 character"),
    ("u000042%0A", "control characters"), ("a%0Ab", "control characters"),
])
def test_an_id_no_event_could_carry_is_a_422_naming_the_field(
    api: TestClient, path: str, reason: str
) -> None:
    refused = api.get(f"/predict/{path}")
    assert refused.status_code == 422, refused.text
    detail = refused.json()["detail"]
    assert detail.startswith("user_id ") and reason in detail
    assert len(detail) < 120  # at most 40 characters of the id are repeated
