"""One invariant suite applied to every model and to the blend they serve."""

import random
import threading
from datetime import timedelta

import numpy as np
import pytest

from churn_stream.events import Event
from churn_stream.features import FeatureStore
from churn_stream.models import MODEL_NAMES, ChurnModel
from churn_stream.models.sequence import FORWARD_MAX_ROWS
from tests.simulated import simulated_events, trained_model

SCORED = (*MODEL_NAMES, "blend")
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def model() -> ChurnModel:
    return trained_model()[0]


@pytest.fixture(scope="module")
def batch(model: ChurnModel) -> tuple[np.ndarray, np.ndarray]:
    """Feature rows of 40 simulated users, as the predictor would build them."""
    events = simulated_events()
    store = FeatureStore()
    store.update(list(events))
    user_ids = sorted({e.user_id for e in events})[:40]
    return store.matrix(user_ids, events[-1].ts, model.space)


def scores_of(model: ChurnModel, X: np.ndarray, S: np.ndarray, name: str) -> np.ndarray:
    return getattr(model.score(X, S), name)


@pytest.mark.parametrize("name", SCORED)
def test_scores_are_probabilities_one_per_row(model, batch, name) -> None:
    X, S = batch
    scores = scores_of(model, X, S, name)
    assert scores.shape == (len(X),)
    assert np.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()


@pytest.mark.parametrize("name", SCORED)
def test_same_score_whatever_the_key_order_of_a_row(model, batch, name) -> None:
    X, S = batch
    names = list(model.space.feature_names)
    for seed in range(3):
        order = random.Random(seed).sample(names, len(names))
        rows = np.stack([model.space.vector({n: float(X[i, names.index(n)]) for n in order})
                         for i in range(len(X))])
        np.testing.assert_array_equal(scores_of(model, rows, S, name),
                                      scores_of(model, X, S, name))


@pytest.mark.parametrize("name", SCORED)
def test_same_score_whatever_the_property_order_of_events(model, name) -> None:
    events = [e for e in simulated_events() if e.user_id in ("u000001", "u000002")]
    rng = random.Random(4)

    def reordered(event: Event) -> Event:
        numeric, categorical = list(event.numeric.items()), list(event.categorical.items())
        rng.shuffle(numeric)
        rng.shuffle(categorical)
        return event.model_copy(update={"numeric": dict(numeric),
                                        "categorical": dict(categorical)})

    first, second = FeatureStore(), FeatureStore()
    first.update(events)
    second.update([reordered(e) for e in events])
    users, as_of = ["u000001", "u000002"], events[-1].ts
    np.testing.assert_array_equal(
        scores_of(model, *first.matrix(users, as_of, model.space), name),
        scores_of(model, *second.matrix(users, as_of, model.space), name))


@pytest.mark.parametrize("name", SCORED)
def test_scoring_leaves_its_input_untouched(model, batch, name) -> None:
    X, S = batch
    X_before, S_before = X.copy(), S.copy()
    X_holes = X.copy()
    X_holes[0, 0] = np.nan
    holes_before = X_holes.copy()
    scores_of(model, X, S, name)
    scores_of(model, X_holes, S, name)
    np.testing.assert_array_equal(X, X_before)
    np.testing.assert_array_equal(S, S_before)
    np.testing.assert_array_equal(X_holes, holes_before)


@pytest.mark.parametrize("name", SCORED)
def test_unseen_category_values_and_event_types_do_not_raise(model, name) -> None:
    start = simulated_events()[0].ts

    def user(plan: str) -> list[Event]:
        return [Event(user_id="x", event_type="login", ts=start, categorical={"plan": plan}),
                Event(user_id="x", event_type="teleport", ts=start + timedelta(hours=1),
                      numeric={"distance_km": 3.0}, categorical={"galaxy": "far"})]

    rows = []
    for plan in ("enterprise", "platinum"):
        store = FeatureStore()
        store.update(user(plan))
        rows.append(store.matrix(["x"], start + timedelta(days=1), model.space))
    first, second = (scores_of(model, X, S, name) for X, S in rows)
    assert np.isfinite(first).all()
    # Both unseen plans read as <other>: the same row, the same score.
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("name", SCORED)
def test_missing_values_are_filled_with_training_medians(model, batch, name) -> None:
    X, S = batch
    holes = X.copy()
    holes[:, ::3] = np.nan
    holes[1, 1] = np.inf
    filled = np.where(np.isfinite(holes), holes, model.fill)
    scores = scores_of(model, holes, np.where(S > 0, S, np.nan), name)
    assert np.isfinite(scores).all()
    np.testing.assert_array_equal(scores, scores_of(model, filled, np.nan_to_num(
        np.where(S > 0, S, np.nan)), name))


@pytest.mark.parametrize("name", SCORED)
def test_a_row_scores_the_same_alone_and_in_a_batch(model, batch, name) -> None:
    X, S = batch
    together = scores_of(model, X, S, name)
    alone = np.array([scores_of(model, X[i:i + 1], S[i:i + 1], name)[0] for i in range(5)])
    np.testing.assert_allclose(alone, together[:5], rtol=1e-5, atol=1e-6)


def test_scores_are_the_same_from_several_threads(model, batch) -> None:
    X, S = batch
    expected = model.score(X, S).blend
    results: list[np.ndarray] = []

    def score() -> None:
        for _ in range(5):
            results.append(model.score(X, S).blend)

    threads = [threading.Thread(target=score) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 20
    for result in results:
        np.testing.assert_array_equal(result, expected)


def test_forest_walks_give_exactly_scikit_learns_probabilities(model, batch) -> None:
    X = np.repeat(batch[0], 3, axis=0)  # over the packed walk's batch limit too
    expected = model.forest.estimator.predict_proba(X)[:, 1]
    np.testing.assert_allclose(model.forest.predict(X), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.forest.predict_packed(X), expected, rtol=0, atol=1e-12)


def test_numpy_forward_pass_gives_keras_probabilities(model, batch) -> None:
    X, S = batch
    rng = np.random.default_rng(0)
    # Served rows, then rows far outside training (saturated gates, large activations).
    X = np.vstack([X, X * rng.uniform(0, 50, X.shape).astype(np.float32)])
    S = np.concatenate([S, S * 10 + rng.uniform(0, 3, S.shape).astype(np.float32)])
    expected = model.sequence.predict_keras(X, S)
    np.testing.assert_allclose(model.sequence.forward(model.sequence.sequence.apply(S),
                                                      model.sequence.static.apply(X)),
                               expected, rtol=0, atol=1e-5)
    assert np.ptp(expected) > 0.1, "the rows must spread the scores for the check to mean much"
    # Both paths of predict: a batch over FORWARD_MAX_ROWS goes through the traced graph.
    assert len(X) > FORWARD_MAX_ROWS
    np.testing.assert_allclose(model.sequence.predict(X, S), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(model.sequence.predict(X[:3], S[:3]), expected[:3], rtol=0,
                               atol=1e-5)


def test_a_model_rebuilt_from_its_parts_scores_and_explains_exactly_the_same(model,
                                                                             batch) -> None:
    X, S = batch
    rebuilt = ChurnModel.from_parts(model.parts())
    assert rebuilt.forest.estimator is None  # built from node arrays, not the fitted object
    for rows, sequences in ((X, S), (X[:1], S[:1])):  # numpy and traced paths alike
        for name in SCORED:
            np.testing.assert_array_equal(scores_of(rebuilt, rows, sequences, name),
                                          scores_of(model, rows, sequences, name))
    assert rebuilt.explain(X[0]) == model.explain(X[0])
    assert rebuilt.version == model.version and rebuilt.weights == model.weights


def test_a_scoring_only_model_scores_as_the_full_one_without_a_network(model, batch) -> None:
    X, S = batch
    scoring = ChurnModel.from_parts(model.parts(), network=False)
    assert scoring.sequence.network is None
    # One row takes the numpy pass in both: equal. A large batch takes the traced graph in
    # the full model and numpy here: equal to float32 rounding.
    for name in SCORED:
        np.testing.assert_array_equal(scores_of(scoring, X[:1], S[:1], name),
                                      scores_of(model, X[:1], S[:1], name))
    assert len(X) > FORWARD_MAX_ROWS
    np.testing.assert_allclose(scoring.score(X, S).blend, model.score(X, S).blend,
                               rtol=0, atol=1e-5)
    assert scoring.explain(X[0]) == model.explain(X[0])
    with pytest.raises(RuntimeError, match="no Keras network"):
        scoring.sequence.predict_keras(X[:1], S[:1])


def test_explain_names_the_strongest_features(model, batch) -> None:
    top = model.explain(batch[0][0], top_k=5)
    assert len(top) == 5
    assert all(name in model.space.feature_names for name, _ in top)
    sizes = [abs(value) for _, value in top]
    assert sizes == sorted(sizes, reverse=True)


def test_wrong_shapes_are_refused_with_the_expected_shape(model, batch) -> None:
    X, S = batch
    with pytest.raises(ValueError, match="rows of"):
        model.score(X[:, :-1], S)
    with pytest.raises(ValueError, match="sequences of shape"):
        model.score(X, S[:, :-1])


def test_an_empty_batch_scores_to_nothing(model, batch) -> None:
    X, S = batch
    scores = model.score(X[:0], S[:0])
    assert all(getattr(scores, n).shape == (0,) for n in SCORED)
