"""Outcomes released into a replay at the moment they would have become known.

``with_outcomes`` wraps a replay's event stream for ``produce.publish``: before the first
event stamped after an outcome's ``known_at``, it waits (with the same pacer that paces the
events) until replay time reaches ``known_at`` and hands the outcome to ``report``. The
outcomes known after the last event follow, paced the same way. At speed 0 nothing waits
and outcomes are reported as the stream passes their time.
"""

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime

from churn_stream.events import Event
from churn_stream.pacing import Pacer
from churn_stream.replay.base import ReplayOutcome

log = logging.getLogger(__name__)

Report = Callable[[list[ReplayOutcome]], None]


def with_outcomes(
    events: Iterable[Event], outcomes: Sequence[ReplayOutcome], pacer: Pacer, report: Report
) -> Iterator[Event]:
    """Yield ``events``, reporting each outcome once replay time passes its ``known_at``."""
    pending = deque(sorted(outcomes, key=lambda o: o.known_at))
    for event in events:
        if pending and pending[0].known_at <= event.ts and not _release(pending, event.ts,
                                                                       pacer, report):
            return
        yield event
    _release(pending, None, pacer, report)


def _release(
    pending: deque[ReplayOutcome], until: datetime | None, pacer: Pacer, report: Report
) -> bool:
    """Report the pending outcomes known by ``until`` (all if None), one moment at a time.

    Returns False when a stop was asked for while waiting.
    """
    while pending and (until is None or pending[0].known_at <= until):
        moment = pending[0].known_at
        if not pacer.wait_for(moment):
            return False
        batch = []
        while pending and pending[0].known_at == moment:
            batch.append(pending.popleft())
        log.debug("reporting %d outcomes known at %s", len(batch), moment.isoformat())
        report(batch)
    return True
