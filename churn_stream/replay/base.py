"""What every replay source offers: events in time order, outcomes, and a report of bad rows.

A replay source stands where the simulator stands in ``produce.publish``: an iterator of
``Event`` in event-time order. Its ``outcomes`` are the dataset's labels, each stamped with
the moment it would have become known in real life, for reporting to the feedback API.
Bad input never stops a replay: each bad row or value is counted by reason in the
``ReplayReport``, with a few examples, and the report says what was done with it.
"""

import hashlib
import heapq
import logging
import random
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from churn_stream.events import Event

log = logging.getLogger(__name__)

# Fixed, so that the same row of the same dataset always gets the same event id and a
# replay run twice stores each event once.
REPLAY_NAMESPACE = uuid.UUID("6f1c2a0e-51a4-4b53-9d4e-3a8f0c7d2b91")
_NAMESPACE_BYTES = REPLAY_NAMESPACE.bytes
EXAMPLES_PER_REASON = 3

# What a replay does with each kind of bad input; every reason a reader records is here.
ROW_REASONS = {
    "blank_user": "row skipped: no user id",
    "bad_time": "row skipped: time not parseable",
    "future_time": "row skipped: time is in the future",
    "out_of_order": "row skipped: earlier than the row before it in a file declared sorted",
    "bad_json": "line skipped: not a JSON object",
    "bad_event_type": "row skipped: event type is blank or not a valid name",
    "invalid_event": "row skipped: the event fails validation",
    "blank_number": "value left out of the event: blank",
    "bad_number": "value left out of the event: not a finite number",
    "bad_count": "count left out: not a whole number >= 0",
    "too_long": "value left out of the event: longer than 128 characters",
}
LABEL_REASONS = {
    "bad_label": "outcome not reported: label value not recognised",
    "label_unknown_user": "outcome not reported: the user has no rows in the replay",
    "duplicate_label": "later label ignored: the user was labelled before",
    "user_without_label": "no outcome for the user: no label in the labels file",
}


@dataclass(frozen=True)
class ReplayOutcome:
    """The truth about one user, and when it would have become known."""

    user_id: str
    churned: bool
    known_at: datetime

    def feedback_id(self, source: str) -> str:
        """A stable id for the feedback API, so a repeated report is stored once."""
        return str(uuid.uuid5(REPLAY_NAMESPACE, f"{source}/outcome/{self.user_id}"))


def event_id(source: str, *parts: object) -> uuid.UUID:
    """A stable event id from where the event came from in the dataset (a version-5 UUID).

    >>> event_id("kdd2015", "46", "access") == uuid.uuid5(REPLAY_NAMESPACE, "kdd2015/46/access")
    True
    """
    # The same value as uuid.uuid5, computed directly: uuid5 costs several times more,
    # which shows at a million events.
    name = "/".join([source, *map(str, parts)]).encode()
    digest = hashlib.sha1(_NAMESPACE_BYTES + name, usedforsecurity=False).digest()
    return uuid.UUID(bytes=digest[:16], version=5)


@dataclass
class ReplayReport:
    """Counts of what a replay read, made and had to leave out, by reason.

    Row reasons are counted while events are read, label reasons while outcomes are read;
    each restarts with its own pass, so reading twice never counts a row twice.
    """

    source: str
    rows_read: int = 0
    events: int = 0
    outcomes: int = 0
    bad: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def record(self, reason: str, where: str, detail: str = "") -> None:
        """Count one bad row or value; ``where`` is e.g. ``file.csv:17``."""
        if reason not in ROW_REASONS and reason not in LABEL_REASONS:
            raise ValueError(f"unknown replay reason {reason!r}")
        self.bad[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(f"{where}: {detail}" if detail else where)

    def restart(self, part: str) -> None:
        """Forget the counts of ``part`` (``rows`` or ``labels``) before reading it again."""
        reasons = ROW_REASONS if part == "rows" else LABEL_REASONS
        for reason in reasons:
            self.bad.pop(reason, None)
            self.examples.pop(reason, None)
        if part == "rows":
            self.rows_read = self.events = 0
        else:
            self.outcomes = 0

    def lines(self) -> list[str]:
        """The report as readable lines: totals, then each reason with its action."""
        actions = ROW_REASONS | LABEL_REASONS
        out = [
            f"replay {self.source}: {self.rows_read} rows read, {self.events} events, "
            f"{self.outcomes} outcomes, {sum(self.bad.values())} bad rows or values"
        ]
        for reason, count in sorted(self.bad.items()):
            out.append(f"  {reason}: {count} ({actions[reason]}); e.g. "
                       + "; ".join(self.examples.get(reason, [])))
        return out

    def log(self, logger: logging.Logger = log) -> None:
        """Log the report: the totals at info, each reason at warning."""
        first, *rest = self.lines()
        logger.info("%s", first)
        for line in rest:
            logger.warning("%s", line.strip())


@runtime_checkable
class ReplaySource(Protocol):
    """A dataset replayed as a time-ordered event stream with labelled outcomes."""

    name: str
    report: ReplayReport

    def events(self) -> Iterator[Event]:
        """Every event, in event-time order; calling again starts again."""
        ...

    def outcomes(self) -> list[ReplayOutcome]:
        """The labelled outcomes of the replayed users, ordered by ``known_at``."""
        ...

    def user_ids(self) -> list[str]:
        """Every user the replay has rows for, sorted (ignores any user limit)."""
        ...

    def limit_users(self, n_users: int, seed: int) -> None:
        """Replay only a seeded random subset of ``n_users`` users."""
        ...


def choose_users(user_ids: list[str], n_users: int, seed: int) -> frozenset[str]:
    """A seeded subset of ``n_users`` ids; the same ids and seed give the same subset."""
    if n_users >= len(user_ids):
        return frozenset(user_ids)
    return frozenset(random.Random(seed).sample(sorted(user_ids), n_users))



def merge_lazily(starts: list[tuple[datetime, Callable[[], Iterator[Event]]]]) -> Iterator[Event]:
    """Merge time-ordered streams, opening each only when the merge reaches its start.

    ``starts`` pairs each stream with a time no later than its first event. Unlike
    ``heapq.merge``, which opens every stream at once, this holds in memory only the
    streams whose time has come (for KDD, the courses whose windows overlap).
    """
    heap: list[tuple[datetime, int, Iterator[Event] | None, Event | None]] = []
    openers = {}
    for seq, (start, opener) in enumerate(starts):
        openers[seq] = opener
        heap.append((start, seq, None, None))
    heapq.heapify(heap)
    while heap:
        ts, seq, stream, event = heapq.heappop(heap)
        if stream is None:
            stream = openers.pop(seq)()
        else:
            yield event  # type: ignore[misc]
        following = next(stream, None)
        if following is not None:
            if following.ts < ts:
                raise ValueError(f"stream {seq} went back in time at {following.ts.isoformat()}")
            heapq.heappush(heap, (following.ts, seq, stream, following))
