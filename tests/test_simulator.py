"""The simulator: the same seed gives the same stream, and churners really behave differently."""

from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import numpy as np

from churn_stream.events import CANCELLATION_TYPE
from churn_stream.simulator import Simulator

START = datetime(2026, 1, 1, tzinfo=UTC)


def test_the_same_seed_gives_the_same_events_and_another_seed_does_not() -> None:
    def stream(seed: int) -> list[tuple]:
        sim = Simulator(60, START, 10, seed=seed)
        return [(e.event_id, e.user_id, e.event_type, e.ts, e.numeric) for e in sim.events()]

    first = stream(3)
    assert first == stream(3)
    assert first != stream(4)
    assert len(first) > 1000


def test_a_later_run_with_the_same_seed_shares_no_event_id() -> None:
    # A re-run of `churn up` against the same database: reused ids would be dropped as
    # already stored, and the new run would store nothing.
    earlier = {e.event_id for e in Simulator(40, START, 5, seed=3).events()}
    later = {e.event_id for e in Simulator(40, START + timedelta(hours=20), 5, seed=3).events()}
    assert len(earlier) > 500 and len(later) > 500
    assert not earlier & later


def test_events_come_in_time_order_and_stop_when_a_user_churns() -> None:
    sim = Simulator(200, START, 20, seed=1)
    events = list(sim.events())
    assert all(a.ts <= b.ts for a, b in zip(events, events[1:], strict=False))
    churn_at = {u.user_id: u.churn_at for u in sim.users if u.churn_at}
    for event in events:
        if event.user_id in churn_at and event.event_type != CANCELLATION_TYPE:
            assert event.ts < churn_at[event.user_id]


def test_churners_decline_before_they_leave() -> None:
    """In the two weeks before churning, users are far less active than those who stay."""
    sim = Simulator(400, START, 56, seed=5)
    churners = {
        u.user_id: u.churn_at
        for u in sim.users
        if u.churn_at and u.churn_at - START > timedelta(days=30) and u.churn_at < sim.end
    }
    stayers = {u.user_id for u in sim.users if u.churn_at is None}
    window = timedelta(days=14)
    sessions: dict[str, int] = defaultdict(int)
    durations: dict[str, list[float]] = defaultdict(list)
    kinds: Counter[tuple[str, str]] = Counter()
    for event in sim.events():
        if event.user_id in churners:
            if not churners[event.user_id] - window <= event.ts <= churners[event.user_id]:
                continue
            group = "churner"
        elif event.user_id in stayers and START + timedelta(
            days=40
        ) <= event.ts < START + timedelta(days=54):
            group = "stayer"
        else:
            continue
        if event.event_type == "login":
            sessions[event.user_id] += 1
        if event.event_type == "session_end":
            durations[group].append(event.numeric["duration_s"])
        kinds[(group, event.event_type)] += 1

    churner_rate = sum(sessions[u] for u in churners) / len(churners)
    stayer_rate = sum(sessions[u] for u in stayers) / len(stayers)
    assert len(churners) > 40 and len(stayers) > 150
    assert churner_rate < 0.6 * stayer_rate
    assert np.median(durations["churner"]) < 0.8 * np.median(durations["stayer"])
    per_user = {
        g: kinds[(g, "support_ticket")] / n
        for g, n in (("churner", len(churners)), ("stayer", len(stayers)))
    }
    assert per_user["churner"] > 3 * per_user["stayer"]
    cancels = kinds[("churner", CANCELLATION_TYPE)]
    assert 0.4 * len(churners) < cancels < 0.8 * len(churners), "some cancel, some go silent"


def test_drift_shortens_sessions_after_the_shift() -> None:
    def median_duration(drift_at: datetime | None) -> float:
        sim = Simulator(300, START, 20, seed=2, drift_at=drift_at)
        return float(
            np.median(
                [
                    e.numeric["duration_s"]
                    for e in sim.events()
                    if e.event_type == "session_end" and e.ts >= START + timedelta(days=10)
                ]
            )
        )

    assert median_duration(START + timedelta(days=10)) < 0.75 * median_duration(None)


def test_outcomes_are_the_ground_truth() -> None:
    sim = Simulator(100, START, 30, seed=9)
    outcomes = {o.user_id: o for o in sim.outcomes(START + timedelta(days=30))}
    for user in sim.users:
        churned = user.churn_at is not None and user.churn_at <= START + timedelta(days=30)
        assert outcomes[user.user_id].churned == churned
