"""The simulator's CRM: it reports true outcomes to the feedback API over HTTP.

A chosen share of the users is reported on. For each of them the CRM reports a renewal
("not churned") every 30 days of tenure while they stay, and the churn once it happens,
each after a delay, as a CRM sync would. Times follow the wall clock: the simulator's
clock never runs ahead of it, so nothing is reported before it has happened. Each report
has a ``feedback_id`` derived from the user and the outcome, so a re-sent report (a
retry, or the producer restarted with the same seed) is stored once.
"""

import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import numpy as np
from prometheus_client import Counter
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_when_event_set,
    wait_exponential,
)

from churn_stream.errors import ChurnStreamError
from churn_stream.simulator import Simulator

log = logging.getLogger(__name__)

REPORT_SOURCE = "simulator-crm"
RENEWAL_DAYS = 30
BATCH_MAX = 500
# Fixed namespace for the name-based ids: the same report gets the same id on every run.
FEEDBACK_NAMESPACE = uuid.UUID("d2aee6ea-0f63-4d38-ae7c-2d878db9369c")

OUTCOMES_REPORTED = Counter(
    "outcomes_reported_total", "Outcomes the simulated CRM reported", ["status"]
)


class ReportRejected(ChurnStreamError):
    """The feedback API refused a batch as a whole (not a transient failure)."""


@dataclass(frozen=True, order=True)
class Report:
    """One outcome the CRM will send once ``due_at`` has passed."""

    due_at: datetime
    feedback_id: str
    user_id: str
    churned: bool
    observed_at: datetime

    def body(self) -> dict[str, Any]:
        """The ``FeedbackIn`` JSON of this report."""
        return {
            "feedback_id": self.feedback_id,
            "user_id": self.user_id,
            "churned": self.churned,
            "observed_at": self.observed_at.isoformat(),
            "source": REPORT_SOURCE,
        }


def feedback_id_for(user_id: str, churned: bool, observed_at: datetime) -> str:
    """The id of one outcome: a user churns once, and renews once on a given day.

    >>> feedback_id_for("u1", True, datetime(2025, 1, 1, tzinfo=UTC)) == feedback_id_for(
    ...     "u1", True, datetime(2025, 2, 1, tzinfo=UTC))
    True
    """
    name = f"{user_id}|churned" if churned else f"{user_id}|renewed|{observed_at.date()}"
    return str(uuid.uuid5(FEEDBACK_NAMESPACE, name))


def plan_reports(simulator: Simulator, share: float, delay_s: float, seed: int = 0) -> list[Report]:
    """Every report the CRM will make, in due order.

    ``share`` of the users (chosen by ``seed``) are reported on; each report comes
    ``delay_s`` after its outcome, give or take half of it.
    """
    rng = np.random.default_rng([seed, 7])
    chosen = rng.random(len(simulator.users)) < share
    reports = []
    for user, reported in zip(simulator.users, chosen, strict=True):
        if not reported:
            continue
        outcomes = _renewals(user.tenure_days, simulator.start, user.churn_at or simulator.end)
        if user.churn_at is not None and user.churn_at <= simulator.end:
            outcomes.append((True, user.churn_at))
        for churned, observed_at in outcomes:
            delay = timedelta(seconds=delay_s * float(rng.uniform(0.5, 1.5)))
            reports.append(Report(observed_at + delay, feedback_id_for(user.user_id, churned,
                                  observed_at), user.user_id, churned, observed_at))
    return sorted(reports)


def _renewals(tenure_days: int, start: datetime, until: datetime) -> list[tuple[bool, datetime]]:
    # The same 30-day cycle on which the simulator's payments fall due.
    day = (-tenure_days) % RENEWAL_DAYS
    found = []
    while (at := start + timedelta(days=day, hours=12)) < until:
        found.append((False, at))
        day += RENEWAL_DAYS
    return found


class FeedbackClient:
    """Posts outcomes to ``POST /feedback/batch``, retrying while the API is unreachable."""

    def __init__(self, base_url: str, stopping: threading.Event, api_key: str | None = None,
                 timeout_s: float = 30.0) -> None:
        # httpx logs every request at INFO; the batch summaries below say what matters.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s)
        self.stopping = stopping

    def post_batch(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Send up to ``BATCH_MAX`` items; returns the API's answer.

        Connection failures, 5xx and 429 are retried with backoff until they pass or a stop
        is asked for (then the last error is raised); any other refusal raises
        ``ReportRejected`` at once, since sending it again would change nothing.
        """
        retrying = Retrying(
            retry=retry_if_exception(_transient),
            wait=wait_exponential(multiplier=0.5, max=30),
            stop=stop_when_event_set(self.stopping),
            before_sleep=lambda state: log.warning(
                "feedback API not reachable (attempt %d), retrying: %s",
                state.attempt_number, state.outcome.exception() if state.outcome else "",
            ),
            reraise=True,
        )
        return retrying(self._post, {"items": items}).json()

    def _post(self, body: dict[str, Any]) -> httpx.Response:
        response = self.http.post("/feedback/batch", json=body)
        if response.status_code >= 500 or response.status_code == 429:
            response.raise_for_status()
        if response.status_code != 200:
            raise ReportRejected(f"HTTP {response.status_code}: {response.text[:500]}")
        return response

    def send(self, items: list[dict[str, Any]]) -> None:
        """Post items in batches and log what the API did not store."""
        for start in range(0, len(items), BATCH_MAX):
            chunk = items[start : start + BATCH_MAX]
            answer = self.post_batch(chunk)
            for result in answer["results"]:
                OUTCOMES_REPORTED.labels(result["status"]).inc()
                if result["status"] in ("invalid", "conflict"):
                    item = chunk[result["index"]]
                    log.error("outcome %s for user %s was %s: %s", item.get("feedback_id"),
                              item.get("user_id"), result["status"], result.get("errors"))
            log.info("reported %d outcomes (%d new, %d already stored)",
                     len(chunk), answer["created"], answer["duplicates"])

    def close(self) -> None:
        """Close the connections."""
        self.http.close()


class OutcomeReporter:
    """Sends each planned report once it is due, in batches."""

    def __init__(
        self,
        reports: Iterable[Report],
        client: FeedbackClient,
        stopping: threading.Event,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.pending = deque(sorted(reports))
        self.client = client
        self.stopping = stopping
        self.clock = clock
        self.sent = 0

    def run(self) -> int:
        """Report until everything is sent or a stop is asked for; returns how many were sent."""
        while self.pending and not self.stopping.is_set():
            now = self.clock()
            due = []
            while self.pending and self.pending[0].due_at <= now and len(due) < BATCH_MAX:
                due.append(self.pending.popleft())
            if not due:
                wait_s = (self.pending[0].due_at - now).total_seconds()
                self.stopping.wait(min(max(wait_s, 0.0), 1.0))
                continue
            try:
                self.client.send([r.body() for r in due])
                self.sent += len(due)
            except ReportRejected as exc:
                OUTCOMES_REPORTED.labels("rejected").inc(len(due))
                log.error("feedback API refused %d reports; they are dropped: %s", len(due), exc)
            except httpx.HTTPError:
                self.pending.extendleft(reversed(due))  # stopped while retrying: keep them
                break
        return self.sent


def replay_reporter(client: FeedbackClient, source: str) -> Callable[[list[Any]], None]:
    """A ``report`` callback for the replay: its outcomes posted to the feedback API."""

    def report(outcomes: list[Any]) -> None:
        client.send([
            {
                "feedback_id": o.feedback_id(source),
                "user_id": o.user_id,
                "churned": o.churned,
                "observed_at": o.known_at.isoformat(),
                "source": f"replay-{source}"[:64],
            }
            for o in outcomes
        ])

    return report


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    return isinstance(exc, httpx.TransportError)


def start_reporting(
    simulator: Simulator,
    client: FeedbackClient,
    share: float,
    delay_s: float,
    stopping: threading.Event,
    seed: int = 0,
) -> threading.Thread:
    """Report the simulator's outcomes in a daemon thread; returns the started thread."""
    reports = plan_reports(simulator, share, delay_s, seed)
    reporter = OutcomeReporter(reports, client, stopping)

    def run() -> None:
        sent = reporter.run()
        log.info("outcome reporter stopped after %d reports", sent)

    log.info("reporting %d outcomes of %.0f%% of users to %s, about %.0f s after each",
             len(reports), share * 100, client.http.base_url, delay_s)
    thread = threading.Thread(target=run, name="outcome-reporter", daemon=True)
    thread.start()
    return thread
