"""Features: online and offline give the same values, nothing after a cutoff leaks into it."""

import math
import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from churn_stream import storage
from churn_stream.events import Event
from churn_stream.features import (
    RING_DAYS,
    FeatureSpace,
    FeatureStore,
    events_from_rows,
    features_at,
    offline_features,
)
from churn_stream.training import load_history
from tests.simulated import history_frame, simulated_events

T0 = datetime(2024, 3, 1, tzinfo=UTC)
SPACE = FeatureSpace(
    event_types=("login", "purchase", "session_end"),
    numeric_pairs=(("purchase", "amount"), ("session_end", "duration_s")),
    categories=(("plan", ("basic", "premium")),),
)


def event(user: str, kind: str, at: datetime, numeric=None, categorical=None) -> Event:
    return Event(user_id=user, event_type=kind, ts=at, numeric=numeric or {},
                 categorical=categorical or {})


def feed_in_batches(store: FeatureStore, events: list[Event], seed: int) -> None:
    """Feed events in random micro-batches, as the consume loop would."""
    rng = random.Random(seed)
    start = 0
    while start < len(events):
        size = rng.randint(1, 300)
        store.update(events[start:start + size])
        start += size


def values(X: np.ndarray, space: FeatureSpace, row: int = 0) -> dict[str, float]:
    return dict(zip(space.feature_names, X[row].tolist(), strict=True))


@pytest.mark.timeout(120)
def test_online_equals_offline_through_the_database(engine) -> None:
    events = [e for e in simulated_events(60, 30, 11)]
    storage.write_events(engine, events, T0)
    history = load_history(engine)
    space = FeatureSpace.learn(history)
    for cutoff in (datetime(2024, 1, 12, 6, tzinfo=UTC), datetime(2024, 1, 29, 23, tzinfo=UTC)):
        user_ids, X_offline, S_offline = offline_features(history, cutoff, space)
        store = FeatureStore()
        feed_in_batches(store, [e for e in events if e.ts <= cutoff], seed=3)
        X_online, S_online = store.matrix(user_ids, cutoff, space)
        assert len(user_ids) == 60
        np.testing.assert_array_equal(X_online, X_offline)
        np.testing.assert_array_equal(S_online, S_offline)


@pytest.mark.timeout(60)
def test_events_after_the_cutoff_change_nothing_at_the_cutoff() -> None:
    events = list(simulated_events(60, 30, 11))
    cutoff = datetime(2024, 1, 20, 12, tzinfo=UTC)
    history = history_frame(events)
    space = FeatureSpace.learn(history)
    before = history[history["ts"] <= cutoff]
    queries = pd.DataFrame({"user_id": sorted(before["user_id"].unique()), "cutoff": cutoff})
    X_full, S_full = features_at(history, queries, space)
    X_before, S_before = features_at(before, queries, space)
    np.testing.assert_array_equal(X_full, X_before)
    np.testing.assert_array_equal(S_full, S_before)
    # The same users asked again later do see the later events.
    later = queries.assign(cutoff=cutoff + timedelta(days=5))
    assert not np.array_equal(features_at(history, later, space)[0], X_full)


@st.composite
def event_logs(draw) -> list[Event]:
    """Time-ordered events of a few users, with open-ended types, properties and values."""
    kinds = st.sampled_from(["login", "purchase", "session_end", "novel_type", "x.y"])
    names = st.sampled_from(["amount", "duration_s", "price"])
    events = []
    for user in draw(st.lists(st.sampled_from("abcde"), min_size=1, max_size=5, unique=True)):
        at = T0 + timedelta(seconds=draw(st.integers(0, 86_400 * 40)))
        for _ in range(draw(st.integers(1, 25))):
            at += timedelta(seconds=draw(st.integers(0, 86_400 * 9)))
            numeric = draw(st.dictionaries(names, st.floats(-1e6, 1e6, allow_nan=False),
                                           max_size=2))
            categorical = draw(st.dictionaries(st.sampled_from(["plan", "region"]),
                                               st.sampled_from(["basic", "premium", "new!"]),
                                               max_size=2))
            events.append(event(f"user-{user}", draw(kinds), at, numeric, categorical))
    return sorted(events, key=lambda e: e.ts)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(log=event_logs(), seed=st.integers(0, 1000), cut_days=st.floats(0, 120))
def test_parity_and_no_leakage_for_any_event_log(log, seed, cut_days) -> None:
    cutoff = T0 + timedelta(days=cut_days)
    history = history_frame(log)
    space = FeatureSpace.learn(history, min_value_count=1)
    store = FeatureStore()
    feed_in_batches(store, [e for e in log if e.ts <= cutoff], seed)
    user_ids = sorted({e.user_id for e in log})
    queries = pd.DataFrame({"user_id": user_ids, "cutoff": cutoff})
    X_offline, S_offline = features_at(history, queries, space)
    X_online, S_online = store.matrix(user_ids, cutoff, space)
    np.testing.assert_array_equal(X_online, X_offline)
    np.testing.assert_array_equal(S_online, S_offline)
    assert np.isfinite(X_online).all()


@settings(max_examples=30, deadline=None)
@given(log=event_logs(), seed=st.integers(0, 1000))
def test_order_of_properties_never_changes_a_feature(log, seed) -> None:
    rng = random.Random(seed)

    def shuffled(values: dict) -> dict:
        items = list(values.items())
        rng.shuffle(items)
        return dict(items)

    reordered = [e.model_copy(update={"numeric": shuffled(e.numeric),
                                      "categorical": shuffled(e.categorical)}) for e in log]
    space = FeatureSpace.learn(history_frame(log), min_value_count=1)
    first, second = FeatureStore(), FeatureStore()
    first.update(log)
    second.update(reordered)
    user_ids = sorted({e.user_id for e in log})
    as_of = log[-1].ts
    np.testing.assert_array_equal(first.matrix(user_ids, as_of, space)[0],
                                  second.matrix(user_ids, as_of, space)[0])


def test_hand_computed_values() -> None:
    store = FeatureStore()
    store.update([
        event("u1", "login", T0, categorical={"plan": "basic"}),
        event("u1", "login", T0 + timedelta(hours=1)),
        event("u1", "session_end", T0 + timedelta(hours=2), numeric={"duration_s": 100.0}),
        event("u1", "purchase", T0 + timedelta(days=3), numeric={"amount": 10.0}),
        event("u1", "login", T0 + timedelta(days=10), categorical={"plan": "premium"}),
    ])
    as_of = T0 + timedelta(days=10, hours=12)
    X, S = store.matrix(["u1"], as_of, SPACE)
    got = values(X, SPACE)
    assert got["tenure_days"] == pytest.approx(10.5)
    assert got["all:count_7d"] == 1 and got["all:count_28d"] == 5
    assert got["all:active_days_7d"] == 1 and got["all:active_days_28d"] == 3
    assert got["all:days_since_last"] == pytest.approx(0.5)
    assert got["login:count_28d"] == 3 and got["login:count_7d"] == 1
    assert got["login:trend"] == pytest.approx(1 / 7 - 3 / 28)
    assert got["purchase:days_since_last"] == pytest.approx(7.5)
    assert got["purchase.amount:sum_7d"] == pytest.approx(10 * math.exp(-7.5 / 7), rel=1e-6)
    assert got["purchase.amount:sum_28d"] == pytest.approx(10 * math.exp(-7.5 / 28), rel=1e-6)
    assert got["purchase.amount:mean_7d"] == pytest.approx(10.0)
    assert got["session_end.duration_s:last"] == 100.0
    assert got["plan=premium"] == 1 and got["plan=basic"] == 0 and got["plan=<other>"] == 0
    assert S.shape == (1, RING_DAYS, 4)
    # Channels: login, purchase, session_end, all; days oldest first, the as-of day last.
    np.testing.assert_allclose(S[0, -11], np.log1p([2, 0, 1, 3]))
    np.testing.assert_allclose(S[0, -1], np.log1p([1, 0, 0, 1]))


def test_old_days_roll_out_of_the_window() -> None:
    store = FeatureStore()
    store.update([event("u1", "login", T0 + timedelta(minutes=i)) for i in range(300)])
    store.update([event("u1", "login", T0 + timedelta(days=30))])
    got = values(store.matrix(["u1"], T0 + timedelta(days=30), SPACE)[0], SPACE)
    assert got["login:count_28d"] == 1
    # Before the roll-over a day's count saturates at 255 instead of wrapping round.
    early = FeatureStore()
    early.update([event("u1", "login", T0 + timedelta(minutes=i)) for i in range(300)])
    assert values(early.matrix(["u1"], T0, SPACE)[0], SPACE)["login:count_7d"] == 255


def test_values_never_seen_in_training_do_not_raise() -> None:
    store = FeatureStore(SPACE)
    store.update([event("u1", "brand_new_type", T0, numeric={"weird": 1.0},
                        categorical={"plan": "enterprise", "colour": "red"})])
    got = values(store.matrix(["u1"], T0, SPACE)[0], SPACE)
    assert got["plan=<other>"] == 1 and got["plan=basic"] == 0
    assert got["all:count_7d"] == 1 and got["login:count_7d"] == 0


def test_unknown_users_get_the_row_of_no_history() -> None:
    store = FeatureStore()
    store.update([event("u1", "login", T0)])
    X, S = store.matrix(["nobody", "u1"], T0, SPACE)
    got = values(X, SPACE, row=0)
    assert got["all:count_28d"] == 0 and got["all:days_since_last"] == 60.0
    assert got["login:days_since_last"] == 60.0 and not S[0].any()
    assert values(X, SPACE, row=1)["login:count_7d"] == 1


def test_rebuild_and_forget() -> None:
    log = [event("u1", "login", T0 + timedelta(hours=h)) for h in range(5)]
    direct = FeatureStore()
    direct.update(log)
    rebuilt = FeatureStore()
    rebuilt.update([event("u1", "purchase", T0, numeric={"amount": 3.0})])
    rebuilt.rebuild("u1", list(reversed(log)))
    as_of = T0 + timedelta(days=1)
    np.testing.assert_array_equal(rebuilt.matrix(["u1"], as_of, SPACE)[0],
                                  direct.matrix(["u1"], as_of, SPACE)[0])
    rebuilt.forget(["u1"])
    assert "u1" not in rebuilt and len(rebuilt) == 0
    rebuilt.update([event("u2", "login", T0)])  # reuses the freed slot, from a clean state
    assert values(rebuilt.matrix(["u2"], as_of, SPACE)[0], SPACE)["login:count_28d"] == 1


def test_events_from_rows_round_trip(engine) -> None:
    log = [event("u1", "purchase", T0, numeric={"amount": 2.5}, categorical={"plan": "basic"})]
    storage.write_events(engine, log, T0)
    with engine.connect() as conn:
        rows = conn.execute(storage.user_activity.select()).mappings().all()
    assert events_from_rows(rows) == log


@pytest.mark.timeout(120)
def test_memory_per_user_at_100k_users() -> None:
    users = 100_000
    kinds = {"login": ({}, {"plan": "basic"}), "page_view": ({}, {}),
             "session_end": ({"duration_s": 300.0}, {}), "purchase": ({"amount": 12.0}, {}),
             "support_ticket": ({}, {}), "plan_change": ({"price": 13.0}, {"plan": "standard"}),
             "payment_failed": ({"amount": 8.0}, {}), "subscription_cancelled": ({}, {})}
    store = FeatureStore()
    for offset, (kind, (numeric, categorical)) in enumerate(kinds.items()):
        store.update_frame(pd.DataFrame({
            "user_id": [f"u{i:07d}" for i in range(users)], "event_type": kind,
            "ts": pd.Timestamp(T0) + pd.Timedelta(hours=offset),
            "numeric_values": [numeric] * users, "categorical_values": [categorical] * users,
        }))
    assert len(store) == users
    assert store.nbytes() / users <= 1024


def test_learning_from_nothing_is_refused() -> None:
    empty = pd.DataFrame(columns=["user_id", "event_type", "ts", "numeric_values",
                                  "categorical_values"])
    with pytest.raises(ValueError, match="empty history"):
        FeatureSpace.learn(empty)


def test_one_as_of_time_per_row_equals_one_call_per_row() -> None:
    events = list(simulated_events(60, 30, 11))
    store = FeatureStore()
    store.update(events)
    space = FeatureSpace.learn(history_frame(events))
    users = sorted({e.user_id for e in events})[:10]
    moments = [events[-1].ts + timedelta(hours=7 * i) for i in range(10)]
    X, S = store.matrix(users, moments, space)
    for i, (user, moment) in enumerate(zip(users, moments, strict=True)):
        X_one, S_one = store.matrix([user], moment, space)
        np.testing.assert_array_equal(X[i], X_one[0])
        np.testing.assert_array_equal(S[i], S_one[0])
    with pytest.raises(ValueError, match="as-of times"):
        store.matrix(users, moments[:3], space)


def test_nbytes_counts_users_coming_and_going() -> None:
    store = FeatureStore()
    empty = store.nbytes()
    store.update([event(f"user-{i}", "login", T0) for i in range(100)])
    grown = store.nbytes()
    assert grown > empty
    store.forget([f"user-{i}" for i in range(100)])
    assert store.nbytes() < grown
    assert store._key_bytes == 0
