"""A seeded simulator of subscription users whose churners show it before they leave.

Each user has a plan, a tenure and a latent engagement. A user who will churn declines
first, over one to three weeks: fewer and shorter sessions, failed payments, support
tickets, downgrades; then cancels or simply goes silent. ``drift_at`` shifts everyone's
behaviour at that moment, as a price change would: shorter sessions, fewer and larger
purchases. The simulator knows the truth (``outcomes``) for the feedback loop to report.
"""

import hashlib
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np

from churn_stream.events import CANCELLATION_TYPE, Event

PLANS = ("basic", "standard", "premium")
PLAN_PRICES = {"basic": 8.0, "standard": 13.0, "premium": 20.0}
DAY = timedelta(days=1)


@dataclass
class SimUser:
    """One simulated subscriber and, if they will churn, when and how."""

    user_id: str
    initial_plan: str
    tenure_days: int
    engagement: float
    churn_at: datetime | None
    decline_days: float
    goes_silent: bool
    plan: str = ""
    id_salt: int = 0
    """Mixed into event ids, so that runs starting at different times never share an id."""

    def __post_init__(self) -> None:
        self.plan = self.initial_plan

    def decline(self, now: datetime) -> float:
        """1.0 while healthy, falling towards 0.1 as the churn date approaches."""
        if self.churn_at is None:
            return 1.0
        days_left = (self.churn_at - now) / DAY
        if days_left >= self.decline_days:
            return 1.0
        return 0.05 + 0.95 * (max(days_left, 0.0) / self.decline_days) ** 1.5

    def active(self, now: datetime) -> bool:
        return self.churn_at is None or now < self.churn_at


@dataclass(frozen=True)
class Outcome:
    """The ground truth for one user: churned or not, and when it happened."""

    user_id: str
    churned: bool
    churned_at: datetime | None


class Simulator:
    """Users and their events over simulated days, the same for the same seed."""

    def __init__(
        self,
        n_users: int,
        start: datetime,
        days: float,
        seed: int = 0,
        churn_share: float = 0.3,
        drift_at: datetime | None = None,
        churn_window_days: float = 60.0,
    ) -> None:
        self.start = start.astimezone(UTC)
        self.end = self.start + timedelta(days=days)
        # Churn dates spread over the first ``churn_window_days`` (or the whole run, if
        # shorter), so that a backfill of a few weeks already holds churners to learn from.
        self._churn_span = timedelta(days=min(days, churn_window_days))
        self.seed = seed
        self.drift_at = drift_at
        self._rng = np.random.default_rng(seed)
        self._id_salt = int.from_bytes(
            hashlib.blake2b(self.start.isoformat().encode(), digest_size=16).digest())
        self.users = [self._make_user(i, churn_share) for i in range(n_users)]

    def _make_user(self, index: int, churn_share: float) -> SimUser:
        rng = self._rng
        engagement = float(rng.beta(2.5, 2.0))
        plan = PLANS[int(rng.choice(3, p=[0.5, 0.35, 0.15]))]
        # Less engaged users and cheap plans churn more; the mean share stays near churn_share.
        churn_odds = churn_share * (1.6 - engagement) * (1.2 if plan == "basic" else 0.8)
        churn_at = None
        if rng.random() < min(churn_odds, 0.95):
            churn_at = self.start + float(rng.uniform(0.15, 1.1)) * self._churn_span
        return SimUser(
            user_id=f"u{index:06d}",
            initial_plan=plan,
            tenure_days=int(rng.integers(0, 900)),
            engagement=engagement,
            churn_at=churn_at,
            decline_days=float(rng.uniform(7, 21)),
            goes_silent=bool(rng.random() < 0.4),
            id_salt=self._id_salt,
        )

    def outcomes(self, until: datetime) -> list[Outcome]:
        """Who had churned by ``until``; everyone else is a known non-churner so far."""
        return [
            Outcome(u.user_id, True, u.churn_at)
            if u.churn_at is not None and u.churn_at <= until
            else Outcome(u.user_id, False, None)
            for u in self.users
        ]

    def events(self) -> Iterator[Event]:
        """Every event from ``start`` to ``end`` in time order, one simulated day at a time."""
        for user in self.users:
            user.plan = user.initial_plan
        day = self.start
        while day < self.end:
            # A per-day generator keeps the stream identical however far a consumer reads.
            rng = np.random.default_rng([self.seed, int((day - self.start) / DAY)])
            batch: list[Event] = []
            for user in self.users:
                batch.extend(self._user_day(user, day, rng))
            batch.sort(key=lambda e: e.ts)
            yield from batch
            day += DAY

    def _user_day(self, user: SimUser, day: datetime, rng: np.random.Generator) -> list[Event]:
        noon = day + DAY / 2
        if not user.active(day):
            return []
        drifted = self.drift_at is not None and day >= self.drift_at
        level = user.engagement * user.decline(noon)
        declining = user.decline(noon) < 1.0
        events: list[Event] = []
        for _ in range(int(rng.poisson(0.3 + 2.5 * level))):
            events.extend(self._session(user, day, level, drifted, rng))
        if rng.random() < (0.01 + (0.12 if declining else 0.0)):
            events.append(_day_event(user, "support_ticket", day, rng))
        if (user.tenure_days + (day - self.start).days) % 30 == 0 and rng.random() < (
            0.25 if declining else 0.02
        ):
            events.append(
                _day_event(
                    user, "payment_failed", day, rng, numeric={"amount": PLAN_PRICES[user.plan]}
                )
            )
        events.extend(self._plan_change(user, day, declining, drifted, rng))
        if user.churn_at is not None and day <= user.churn_at < day + DAY:
            if not user.goes_silent:
                events.append(
                    _event(
                        user, CANCELLATION_TYPE, user.churn_at, rng, categorical={"plan": user.plan}
                    )
                )
        return [e for e in events if user.active(e.ts) or e.event_type == CANCELLATION_TYPE]

    def _session(
        self, user: SimUser, day: datetime, level: float, drifted: bool, rng: np.random.Generator
    ) -> list[Event]:
        mean_s = 120 + 900 * level
        if drifted:
            mean_s *= 0.6
        duration_s = min(float(rng.lognormal(math.log(mean_s), 0.5)), 6 * 3600.0)
        # The whole session falls inside its day, so that days can be emitted in order.
        start = day + timedelta(seconds=float(rng.uniform(0, 86_399 - duration_s)))
        events = [_event(user, "login", start, rng, categorical={"plan": user.plan})]
        views = int(rng.poisson(0.5 + 2.5 * level))
        for i in range(views):
            at = start + timedelta(seconds=duration_s * (i + 1) / (views + 2))
            events.append(_event(user, "page_view", at, rng))
        buy_p = (0.03 if drifted else 0.08) * (0.5 + level)
        if rng.random() < buy_p:
            amount = float(rng.lognormal(math.log(30.0 if drifted else 18.0), 0.6))
            at = start + timedelta(seconds=duration_s * 0.9)
            events.append(_event(user, "purchase", at, rng, numeric={"amount": round(amount, 2)}))
        end = start + timedelta(seconds=duration_s)
        events.append(
            _event(user, "session_end", end, rng, numeric={"duration_s": round(duration_s, 1)})
        )
        return events

    def _plan_change(
        self, user: SimUser, day: datetime, declining: bool, drifted: bool, rng: np.random.Generator
    ) -> list[Event]:
        index = PLANS.index(user.plan)
        down_p = (0.04 if declining else 0.002) + (0.004 if drifted else 0.0)
        if index > 0 and rng.random() < down_p:
            user.plan = PLANS[index - 1]
        elif index < 2 and not declining and rng.random() < 0.002:
            user.plan = PLANS[index + 1]
        else:
            return []
        return [
            _day_event(
                user,
                "plan_change",
                day,
                rng,
                categorical={"plan": user.plan},
                numeric={"price": PLAN_PRICES[user.plan]},
            )
        ]


def _day_event(
    user: SimUser,
    event_type: str,
    day: datetime,
    rng: np.random.Generator,
    numeric: dict[str, float] | None = None,
    categorical: dict[str, str] | None = None,
) -> Event:
    """An event at a random moment of ``day``."""
    ts = day + timedelta(seconds=float(rng.uniform(0, 86_000)))
    return _event(user, event_type, ts, rng, numeric, categorical)


def _event(
    user: SimUser,
    event_type: str,
    ts: datetime,
    rng: np.random.Generator,
    numeric: dict[str, float] | None = None,
    categorical: dict[str, str] | None = None,
) -> Event:
    # Ids drawn from the seeded generator make a re-run with the same seed and start
    # idempotent; the start's salt keeps a later run (same seed, new start) from reusing
    # ids, which the idempotent insert would drop as already stored.
    event_id = uuid.UUID(int=int.from_bytes(rng.bytes(16)) ^ user.id_salt, version=4)
    return Event(
        event_id=event_id,
        user_id=user.user_id,
        event_type=event_type,
        ts=ts,
        numeric=numeric or {},
        categorical=categorical or {},
    )
