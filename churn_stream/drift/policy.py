"""When drift is confirmed: threshold, persistence over windows, sample size, cooldown.

A window counts as drifted when at least ``min_features`` features drifted (exempt ones left
out: see ``WindowReport``), or when the score distribution drifted. A count, not a share:
a shift that moves one family of features (session lengths, say) is diluted to nothing
among dozens of columns, while two features far beyond their threshold together are
rarely noise on windows of hundreds of rows. Drift is
confirmed after ``persistence`` drifted windows in a row, each of at least ``min_rows``
rows, and only once ``cooldown_s`` has passed since the last retrain. A window with too few
rows neither counts nor breaks a streak; a stable window breaks it.
"""

from dataclasses import dataclass, field
from enum import StrEnum

from churn_stream.drift.monitor import WindowReport


class Verdict(StrEnum):
    """What one window meant."""

    INSUFFICIENT = "insufficient"
    """Fewer rows than the minimum sample size: not evaluated."""
    STABLE = "stable"
    DRIFTING = "drifting"
    """Drifted, but not for ``persistence`` windows in a row yet."""
    COOLING_DOWN = "cooling_down"
    """Drift persisted, but the last retrain is more recent than the cooldown."""
    CONFIRMED = "confirmed"
    """Drift persisted and the cooldown has passed: time to retrain."""


@dataclass
class DriftPolicy:
    """Turns a stream of window reports into retrain decisions."""

    min_features: int = 2
    persistence: int = 3
    min_rows: int = 500
    cooldown_s: float = 600.0
    streak: int = 0
    last_retrain_s: float | None = field(default=None)

    def window_drifted(self, report: WindowReport) -> bool:
        """Whether one window, taken alone, is drifted."""
        return len(report.drifted_features) >= self.min_features or report.score.drifted

    def observe(self, report: WindowReport, now_s: float) -> Verdict:
        """Account for one window evaluated at ``now_s`` (seconds on any monotonic clock)."""
        if report.n_current < self.min_rows:
            return Verdict.INSUFFICIENT
        if not self.window_drifted(report):
            self.streak = 0
            return Verdict.STABLE
        self.streak += 1
        if self.streak < self.persistence:
            return Verdict.DRIFTING
        if self.cooling_down(now_s):
            return Verdict.COOLING_DOWN
        self.streak = 0
        self.last_retrain_s = now_s
        return Verdict.CONFIRMED

    def cooling_down(self, now_s: float) -> bool:
        """Whether a retrain happened less than ``cooldown_s`` ago."""
        return self.last_retrain_s is not None and now_s - self.last_retrain_s < self.cooldown_s

    def note_retrain(self, now_s: float) -> None:
        """A retrain started for any reason: the cooldown runs from now."""
        self.last_retrain_s = now_s
