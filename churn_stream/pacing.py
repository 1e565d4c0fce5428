"""Pacing a time-ordered event stream: by rate, by simulated-time speed, never ahead of now."""

import threading
import time
from datetime import UTC, datetime


class Pacer:
    """Holds each event back until it is due.

    An event is due when all three hold: sending it keeps the rate at most ``rate_per_s``;
    its event time is no more than ``speed`` simulated seconds per wall second past
    ``sim_start``; and its event time is not in the future. ``None`` lifts the first two,
    which is how a backfill runs at full speed.
    """

    def __init__(
        self,
        sim_start: datetime,
        rate_per_s: float | None = None,
        speed: float | None = None,
        stopping: threading.Event | None = None,
    ) -> None:
        self.sim_start = sim_start
        self.rate_per_s = rate_per_s
        self.speed = speed
        self.stopping = stopping or threading.Event()
        self._wall_start: float | None = None
        self._sent = 0

    def wait_for(self, ts: datetime) -> bool:
        """Sleep until an event stamped ``ts`` is due; False if a stop was asked for meanwhile.

        The pacing clock starts with the first call, so a backfill before it costs nothing.
        """
        if self._wall_start is None:
            self._wall_start = time.monotonic()
        delay_s = self._delay_s(ts)
        while delay_s > 0:
            if self.stopping.wait(min(delay_s, 0.5)):
                return False
            delay_s = self._delay_s(ts)
        self._sent += 1
        return not self.stopping.is_set()

    def _delay_s(self, ts: datetime) -> float:
        elapsed_s = time.monotonic() - (self._wall_start or time.monotonic())
        delays = [(ts - datetime.now(UTC)).total_seconds()]
        if self.rate_per_s:
            delays.append(self._sent / self.rate_per_s - elapsed_s)
        if self.speed:
            delays.append((ts - self.sim_start).total_seconds() / self.speed - elapsed_s)
        return max(delays)
