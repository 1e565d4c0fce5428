"""Training from the database: quality on seeded simulator data, and every way it can refuse."""

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from churn_stream import storage, training
from churn_stream.errors import NotEnoughData, TrainingFailed
from churn_stream.events import Event
from churn_stream.labels import LabelPolicy, label_examples
from churn_stream.models import MODEL_NAMES
from churn_stream.models.boosted import fit_boosted
from churn_stream.models.forest import fit_forest
from tests.simulated import simulated_database, trained_model

THRESHOLD_ROC_AUC = 0.80
T0 = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def sim_engine():
    engine = storage.make_engine(simulated_database())
    yield engine
    engine.dispose()


@pytest.mark.timeout(600)
def test_served_blend_reaches_the_threshold_on_seeded_simulator_data() -> None:
    model, _ = trained_model()
    assert model.metrics["blend"]["roc_auc"] >= THRESHOLD_ROC_AUC
    for name in (*MODEL_NAMES, "blend"):
        assert set(model.metrics[name]) == {"roc_auc", "pr_auc", "brier", "log_loss"}
        assert all(math.isfinite(v) for v in model.metrics[name].values())
    assert sum(model.weights.values()) == pytest.approx(1.0)
    assert min(model.weights.values()) >= 0
    assert model.details["churned"]["holdout"] >= 10
    assert model.rows == model.details["examples"]["fit"]
    assert 0 < len(model.reference) <= 5000
    assert model.reference_scores.shape == (len(model.reference),)


@pytest.mark.timeout(600)
def test_a_model_fitted_on_shuffled_labels_cannot_pass_the_threshold(sim_engine) -> None:
    history, feedback = training.load_history(sim_engine), training.load_feedback(sim_engine)
    examples = training.build_examples(history, feedback, LabelPolicy(), 0.2, seed=0,
                                       max_examples=50_000)
    learnt = examples.queries["role"].isin([training.FIT, training.VALIDATION]).to_numpy()
    labels = examples.queries["churned"].to_numpy().copy()
    labels[learnt] = np.random.default_rng(1).permutation(labels[learnt])
    examples.queries["churned"] = labels
    broken = training.fit_examples(examples, "broken", seed=0)
    assert broken.metrics["blend"]["roc_auc"] < THRESHOLD_ROC_AUC
    assert broken.metrics["xgb"]["roc_auc"] < THRESHOLD_ROC_AUC


@pytest.mark.timeout(600)
def test_progress_goes_through_every_stage_in_order() -> None:
    _, reports = trained_model()
    stages = [stage for stage, _ in reports]
    assert stages == ["load", "label", "features", "rf", "xgb", "seq", "evaluate", "done"]
    shares = [share for _, share in reports]
    assert shares == sorted(shares) and shares[-1] == 1.0


@pytest.mark.timeout(600)
def test_compare_on_holdout_scores_the_serving_model_on_the_same_examples() -> None:
    model, _ = trained_model()
    candidate_auc, current_auc = training.compare_on_holdout(model, model)
    assert candidate_auc == model.metrics["blend"]["roc_auc"]
    assert current_auc == pytest.approx(candidate_auc, abs=1e-9)


@pytest.mark.timeout(120)
def test_trees_are_deterministic_under_a_seed(sim_engine) -> None:
    history = training.load_history(sim_engine)
    examples = training.build_examples(history, None, LabelPolicy(), 0.2, 0, 50_000)
    fit, val = examples.rows(training.FIT), examples.rows(training.VALIDATION)
    X, y = examples.X, examples.y
    for make in (lambda: fit_forest(X[fit], y[fit], 3),
                 lambda: fit_boosted(X[fit], y[fit], X[val], y[val], 3)):
        np.testing.assert_array_equal(make().predict(X[val]), make().predict(X[val]))


def test_an_empty_database_is_not_enough_data(engine) -> None:
    with pytest.raises(NotEnoughData, match="no activity"):
        training.train(engine, "empty")


def steady_users(n_users: int, days: int) -> list[Event]:
    """Users who log in every day and never churn."""
    return [Event(user_id=f"u{u}", event_type="login", ts=T0 + timedelta(days=d, hours=u % 24))
            for d in range(days) for u in range(n_users)]


def test_one_class_of_labels_is_not_enough_data_never_nan(engine) -> None:
    storage.write_events(engine, steady_users(30, 40), T0)
    with pytest.raises(NotEnoughData, match="0 churned"):
        training.train(engine, "one-class")


def test_history_too_short_for_settled_labels_is_not_enough_data(engine) -> None:
    storage.write_events(engine, steady_users(5, 10), T0)
    with pytest.raises(NotEnoughData, match="history spans 9.2 days; labels need 24.0") as all_:
        training.train(engine, "short")
    with pytest.raises(NotEnoughData, match=r"need 24.0 .*\(in a sample of 3 users\)") as some:
        training.train(engine, "short", max_users=3)
    assert (all_.value.sampled, some.value.sampled) == (False, True)


@pytest.mark.parametrize(("injection", "cause"), [("raise", RuntimeError),
                                                   ("memory", MemoryError)])
@pytest.mark.timeout(120)
def test_an_injected_failure_raises_training_failed(sim_engine, injection, cause) -> None:
    with pytest.raises(TrainingFailed, match="injected") as failure:
        training.train(sim_engine, "doomed", failure_injection=injection)
    assert isinstance(failure.value.__cause__, cause)


def test_a_failing_stage_is_named(sim_engine) -> None:
    def explode(stage: str) -> None:
        if stage == "features":
            raise ValueError("disk on fire")

    with pytest.raises(TrainingFailed, match="stage features: ValueError: disk on fire"):
        training.train(sim_engine, "doomed", failure_injection=explode)


def test_history_loads_in_time_order_with_aware_times_and_dicts(sim_engine) -> None:
    history = training.load_history(sim_engine, until=T0 + timedelta(days=2))
    assert len(history) > 0
    assert str(history["ts"].dt.tz) == "UTC"
    assert history["ts"].is_monotonic_increasing
    assert history["ts"].max() <= T0 + timedelta(days=2)
    assert all(isinstance(v, dict) for v in history["numeric_values"])
    assert any(v for v in history["categorical_values"])


def test_feedback_outcomes_become_labels(engine) -> None:
    storage.write_events(engine, steady_users(30, 40), T0)
    with engine.begin() as conn:
        conn.execute(storage.feedback.insert(), [
            {"feedback_id": f"f{u}", "user_id": f"u{u}", "churned": True,
             "observed_at": storage.to_db_time(T0 + timedelta(days=12 + u % 10)),
             "source": "test", "received_at": storage.to_db_time(T0)} for u in range(15)])
    labels = label_examples(training.load_history(engine), training.load_feedback(engine),
                            LabelPolicy(inactivity_days=None))
    churned = labels[labels["churned"] == 1]
    assert set(churned["user_id"]) == {f"u{u}" for u in range(15)}
    # Once the churn is reported the user is no longer an example.
    last = labels.groupby("user_id")["cutoff"].max()
    for u in range(15):
        assert last[f"u{u}"] < T0 + timedelta(days=12 + u % 10)


def scenario() -> list[Event]:
    """C logs in daily (08:00) and never churns; A cancels on day 20; B falls silent after
    day 15. A and B act at 12:00; C's last event (day 40, 12:00) ends the data."""
    def at(day: int, hour: int) -> datetime:
        return T0 + timedelta(days=day, hours=hour)

    events = [Event(user_id="C", event_type="login", ts=at(d, 8)) for d in range(40)]
    events.append(Event(user_id="C", event_type="login", ts=at(40, 12)))
    events += [Event(user_id="A", event_type="login", ts=at(d, 12)) for d in range(20)]
    events.append(Event(user_id="A", event_type="subscription_cancelled", ts=at(20, 12)))
    events += [Event(user_id="B", event_type="login", ts=at(d, 12)) for d in range(16)]
    return events


def test_labels_of_a_hand_made_scenario() -> None:
    from tests.simulated import history_frame

    labels = label_examples(history_frame(scenario()), None, LabelPolicy())
    grid = [T0 + timedelta(days=d, hours=12) for d in range(7, 24)]
    assert sorted(labels["batch_at"].unique()) == grid
    by_user = {u: group.set_index("batch_at") for u, group in labels.groupby("user_id")}
    # A: an example until it cancels (day 20), positive within 7 days of it.
    assert list(by_user["A"].index) == grid[:13]
    assert by_user["A"]["churned"].tolist() == [0] * 6 + [1] * 7
    # B: silent from day 15 12:00, known on day 25; positive from the cutoff 7 days before.
    assert list(by_user["B"].index) == grid
    assert by_user["B"]["churned"].tolist() == [0] + [1] * 16
    # C never churns, and is read right after its 08:00 login, as the stream would score it.
    assert by_user["C"]["churned"].tolist() == [0] * 17
    assert (by_user["C"]["cutoff"] == by_user["C"].index - timedelta(hours=4)).all()
    assert (by_user["A"]["cutoff"] == by_user["A"].index).all()


def test_replay_refuses_rows_that_later_events_would_leak_into() -> None:
    from churn_stream.features import FeatureSpace, replay
    from tests.simulated import history_frame

    history = history_frame(scenario())
    queries = label_examples(history, None, LabelPolicy())
    space = FeatureSpace.learn(history)
    replay(history, queries, space)  # anchored rows are safe
    leaky = queries.assign(cutoff=queries["cutoff"] - timedelta(hours=5))
    with pytest.raises(ValueError, match="would leak"):
        replay(history, leaky, space)


def test_history_of_chosen_users_and_a_seeded_sample_of_users(sim_engine) -> None:
    chosen = training.sample_users(sim_engine, 2, seed=5)
    assert chosen is not None and len(chosen) == 2
    assert chosen == training.sample_users(sim_engine, 2, seed=5)
    history = training.load_history(sim_engine, user_ids=chosen)
    assert set(history["user_id"]) == set(chosen)
    assert history["ts"].is_monotonic_increasing
    full = training.load_history(sim_engine)
    assert len(history) == full["user_id"].isin(chosen).sum()
    assert training.sample_users(sim_engine, 10_000, seed=5) is None


def test_the_split_keeps_holdout_users_and_outcomes_out_of_training(sim_engine) -> None:
    policy = LabelPolicy()
    queries = label_examples(training.load_history(sim_engine), None, policy)
    roles = training.split_roles(queries, policy, 0.2, seed=0)
    users = {role: set(queries["user_id"][roles == role])
             for role in (training.FIT, training.VALIDATION, training.HOLDOUT)}
    assert not users[training.HOLDOUT] & (users[training.FIT] | users[training.VALIDATION])
    assert not users[training.FIT] & users[training.VALIDATION]
    learnt = queries["cutoff"][np.isin(roles, [training.FIT, training.VALIDATION])]
    held = queries["cutoff"][roles == training.HOLDOUT]
    assert learnt.max() + policy.horizon <= held.min()
    assert (roles == training.HOLDOUT).sum() >= 100


def test_split_users_for_a_snapshot_holds_out_whole_users() -> None:
    queries = pd.DataFrame({"user_id": [f"u{i}" for i in range(100)],
                            "cutoff": pd.Timestamp("2018-01-01", tz="UTC"), "churned": 0})
    roles = training.split_users(queries, LabelPolicy(), 0.2, seed=0)
    assert (roles == training.HOLDOUT).sum() == 20
    assert (roles == training.VALIDATION).sum() == 16
    assert (roles == training.FIT).sum() == 64
