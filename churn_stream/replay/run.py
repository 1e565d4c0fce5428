"""The producer's replay mode: a dataset into ``user-activity``, outcomes when they are known.

Pacing follows simulated days: ``speed_days_per_s = 2`` plays two days of the dataset per
wall second, 0 plays it as fast as the broker takes it. Outcomes go to ``report`` at their
``known_at`` in replay time (``schedule.with_outcomes``).
"""

import itertools
import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from kafka import KafkaProducer
from prometheus_client import Gauge

from churn_stream.pacing import Pacer
from churn_stream.produce import publish
from churn_stream.replay.base import ReplayOutcome, ReplaySource
from churn_stream.replay.registry import DATA_ROOT, open_replay
from churn_stream.replay.schedule import Report, with_outcomes

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86_400.0
REPLAY_BAD_ROWS = Gauge("replay_bad_rows", "Bad rows or values met by the replay", ["reason"])
REPLAY_OUTCOMES = Gauge("replay_outcomes_released", "Outcomes handed to the feedback reporter")


@dataclass(frozen=True)
class ReplayOptions:
    """What to replay and how fast (the producer's ``--replay*`` options)."""

    name_or_path: str
    config: Path | None = None
    data_root: Path = DATA_ROOT
    speed_days_per_s: float = 0.0
    limit_users: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class ReplayResult:
    """What a replay sent, and how fast."""

    events: int
    outcomes: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        """Events sent per wall second, reading and pacing included."""
        return self.events / self.seconds if self.seconds > 0 else 0.0


def log_outcomes(outcomes: list[ReplayOutcome]) -> None:
    """The reporter when no feedback API is wired: the outcomes are logged, not sent."""
    churned = sum(o.churned for o in outcomes)
    log.info("%d outcomes known at %s (%d churned); no feedback reporter configured",
             len(outcomes), outcomes[0].known_at.isoformat(), churned)


def run_replay(
    options: ReplayOptions,
    producer: KafkaProducer,
    topic: str,
    stopping: threading.Event,
    report: Report = log_outcomes,
) -> ReplayResult:
    """Replay a dataset into ``topic``; returns counts and timing. Logs the bad-row report."""
    source = open_replay(options.name_or_path, options.config, options.data_root,
                         options.limit_users, options.seed)
    released = 0

    def counted(batch: list[ReplayOutcome]) -> None:
        nonlocal released
        report(batch)
        released += len(batch)
        REPLAY_OUTCOMES.set(released)

    started_s = time.monotonic()
    sent = _publish(source, options, producer, topic, stopping, counted)
    result = ReplayResult(sent, released, time.monotonic() - started_s)
    source.report.log()
    for reason, count in source.report.bad.items():
        REPLAY_BAD_ROWS.labels(reason).set(count)
    log.info("replay %s: %d events and %d outcomes in %.1f s (%.0f events/s)", source.name,
             result.events, result.outcomes, result.seconds, result.events_per_s)
    return result


def _publish(
    source: ReplaySource,
    options: ReplayOptions,
    producer: KafkaProducer,
    topic: str,
    stopping: threading.Event,
    report: Report,
) -> int:
    outcomes = source.outcomes()
    events = source.events()
    first = next(events, None)
    if first is None:
        log.warning("replay %s has no events", source.name)
        return 0
    speed = options.speed_days_per_s * SECONDS_PER_DAY or None
    pacer = Pacer(first.ts, speed=speed, stopping=stopping)
    # At full speed everything counts as backfill and the pacer only guards outcomes.
    live_from = first.ts if speed else datetime.max.replace(tzinfo=UTC)
    log.info("replay %s from %s: %d outcomes to report, %s", source.name, first.ts.isoformat(),
             len(outcomes), f"{options.speed_days_per_s:g} days/s" if speed else "full speed")
    stream = with_outcomes(itertools.chain([first], events), outcomes, pacer, report)
    return publish(stream, producer, topic, live_from, pacer, stopping)
