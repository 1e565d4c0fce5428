"""The KDD Cup 2015 dropout data in its daily form, replayed as learner activity.

Each ``trainCourse<N>.csv[.gz]`` holds one row per enrollment and day of the course's 30-day
window, with the day's count of each kind of activity. The enrollment is the user. The
replay emits, per enrollment:

- one ``enrollment`` event at midnight UTC of the window's first day, so that every learner
  exists for the predictor from the start, active or not;
- per day and activity type with a count above zero, one event named after the type
  (``access``, ``video``, ...) stamped at midday with ``numeric={"count": n}``.

One event per (day, type) rather than ``n`` events keeps the volume at 334,101 events for
the 1,047,390 day rows (the counts add up to far more), and suits the features layer:
its per-type event counts become active days, its sums of ``count`` the activity totals.
A zero count emits nothing; absence is what the features already read as inactivity.
Every event carries ``categorical={"course": N}``, where ``N`` is the file's own name
(the data has no other course id; it is the number of enrollments, ``1187A`` and ``1187``
being two courses of equal size).

``truth_train.csv`` labels dropouts (``1``): no activity in the 10 days after the window. An
outcome is known 10 days after the window ends, at the midnight that follows its last day.
"""

import csv
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from pathlib import Path

from churn_stream.errors import ConfigurationError
from churn_stream.events import Event
from churn_stream.replay.base import (
    ReplayOutcome,
    ReplayReport,
    choose_users,
    event_id,
    merge_lazily,
)
from churn_stream.replay.fields import DAY_STAMP, open_text, parse_count

log = logging.getLogger(__name__)

NAME = "kdd2015"
ACTIVITY_TYPES = ("access", "discussion", "navigate", "page_close", "problem", "video", "wiki")
ENROLLMENT_TYPE = "enrollment"
LABEL_DELAY = timedelta(days=10)
LABELS_FILE = "truth_train.csv"
_ZERO_DAY = ["0"] * len(ACTIVITY_TYPES)
_COURSE_FILE = re.compile(r"^trainCourse(?P<course>[A-Za-z0-9]+)\.csv(\.gz)?$")

# (midday of the day, enrollment id, activity type, count): a course's rows, compactly.
DayCount = tuple[datetime, str, str, int]


@dataclass
class Course:
    """One course file and what a first pass learned about it."""

    name: str
    path: Path
    first_day: date | None = None
    last_day: date | None = None
    enrollments: list[str] = field(default_factory=list)

    @property
    def window_start(self) -> datetime:
        """Midnight UTC that opens the course's window."""
        assert self.first_day is not None
        return datetime.combine(self.first_day, time(0), UTC)

    @property
    def outcome_known_at(self) -> datetime:
        """When its enrollments' outcomes become known: 10 days after the window closes."""
        assert self.last_day is not None
        return datetime.combine(self.last_day + timedelta(days=1), time(0), UTC) + LABEL_DELAY


class Kdd2015Source:
    """KDD Cup 2015 course files (optionally some courses only) as one replay."""

    def __init__(self, data_dir: Path, courses: Sequence[str] | None = None) -> None:
        self.name = NAME
        self.data_dir = data_dir
        self.report = ReplayReport(NAME)
        self.only_users: frozenset[str] | None = None
        self.courses = _find_courses(data_dir, courses)
        self._scanned = False

    def user_ids(self) -> list[str]:
        """Every enrollment in the chosen course files, sorted."""
        self._scan()
        return sorted(e for course in self.courses for e in course.enrollments)

    def limit_users(self, n_users: int, seed: int) -> None:
        """Replay a seeded random subset of ``n_users`` enrollments."""
        self.only_users = choose_users(self.user_ids(), n_users, seed)

    def events(self) -> Iterator[Event]:
        """Every course's events, merged in time order; each course is read when it starts."""
        self._scan()
        self.report.restart("rows")
        starts: list[tuple[datetime, Callable[[], Iterator[Event]]]] = [
            (course.window_start, lambda course=course: self._course_events(course))
            for course in self.courses
            if course.first_day is not None
        ]
        for event in merge_lazily(starts):
            self.report.events += 1
            yield event

    def outcomes(self) -> list[ReplayOutcome]:
        """Labels of the replayed enrollments, each known 10 days after its window."""
        self._scan()
        self.report.restart("labels")
        known_at = {
            user_id: course.outcome_known_at
            for course in self.courses
            if course.last_day is not None
            for user_id in course.enrollments
        }
        labels = self._read_labels(known_at)
        outcomes = []
        for user_id in sorted(known_at):
            if self.only_users is not None and user_id not in self.only_users:
                continue
            if user_id not in labels:
                self.report.record("user_without_label", user_id)
                continue
            outcomes.append(ReplayOutcome(user_id, labels[user_id], known_at[user_id]))
        outcomes.sort(key=lambda o: o.known_at)
        self.report.outcomes = len(outcomes)
        return outcomes

    def _read_labels(self, known: dict[str, datetime]) -> dict[str, bool]:
        path = self.data_dir / LABELS_FILE
        if not path.exists():
            raise ConfigurationError(f"KDD labels file {path} is missing")
        labels: dict[str, bool] = {}
        with open_text(path) as handle:
            for line, row in enumerate(csv.DictReader(handle), start=2):
                where = f"{LABELS_FILE}:{line}"
                user_id = (row.get("enrollment_id") or "").strip()
                value = (row.get("label") or "").strip()
                if value not in ("0", "1"):
                    self.report.record("bad_label", where, repr(value))
                elif user_id not in known:
                    self.report.record("label_unknown_user", where, user_id or "blank")
                elif user_id in labels:
                    self.report.record("duplicate_label", where, user_id)
                else:
                    labels[user_id] = value == "1"
        return labels

    def _scan(self) -> None:
        """First pass: each course's window and enrollments (a quiet read of every file)."""
        if self._scanned:
            return
        quiet = ReplayReport(NAME)
        for course in self.courses:
            days: set[date] = set()
            seen: dict[str, None] = {}
            for day, user_id, _ in _read_rows(course, quiet, with_counts=False):
                days.add(day)
                seen.setdefault(user_id)
            course.first_day, course.last_day = (min(days), max(days)) if days else (None, None)
            course.enrollments = list(seen)
        self._scanned = True
        log.info("kdd2015: %d courses, %d enrollments in %s",
                 len(self.courses), sum(len(c.enrollments) for c in self.courses), self.data_dir)

    def _course_events(self, course: Course) -> Iterator[Event]:
        """One course's events in time order (the file is ordered by enrollment, not day)."""
        counts: list[DayCount] = []
        midday_of: dict[date, datetime] = {}
        for day, user_id, row in _read_rows(course, self.report):
            if self.only_users is not None and user_id not in self.only_users:
                continue
            midday = midday_of.setdefault(day, datetime.combine(day, DAY_STAMP, UTC))
            counts.extend((midday, user_id, kind, n) for kind, n in row.items())
        counts.sort(key=lambda c: c[0])  # stable: enrollments keep their file order
        for user_id in course.enrollments:
            if self.only_users is None or user_id in self.only_users:
                yield self._event(course, user_id, ENROLLMENT_TYPE, course.window_start)
        for midday, user_id, kind, n in counts:
            yield self._event(course, user_id, kind, midday, n)

    def _event(self, course: Course, user_id: str, kind: str, ts: datetime, n: int = 0) -> Event:
        return Event(
            event_id=event_id(NAME, user_id, kind, _stamp(ts)),
            user_id=user_id,
            event_type=kind,
            ts=ts,
            numeric={"count": float(n)} if kind != ENROLLMENT_TYPE else {},
            categorical={"course": course.name},
        )


@lru_cache(maxsize=4096)
def _stamp(ts: datetime) -> str:
    return ts.isoformat()


def _find_courses(data_dir: Path, names: Sequence[str] | None) -> list[Course]:
    if not data_dir.is_dir():
        raise ConfigurationError(f"KDD Cup 2015 directory {data_dir} does not exist")
    found = {}
    for path in sorted(data_dir.iterdir()):
        match = _COURSE_FILE.match(path.name)
        if match:
            found[match["course"]] = Course(match["course"], path)
    if not found:
        raise ConfigurationError(f"no trainCourse<N>.csv[.gz] files in {data_dir}")
    if names is None:
        return list(found.values())
    missing = sorted(set(names) - set(found))
    if missing:
        raise ConfigurationError(f"courses {missing} not in {data_dir}; there are {sorted(found)}")
    return [found[name] for name in names]


def _read_rows(
    course: Course, report: ReplayReport, with_counts: bool = True
) -> Iterator[tuple[date, str, dict[str, int]]]:
    """Each good row as (day, enrollment, counts by type); bad cells go to ``report``."""
    day_of: dict[str, date] = {}  # a course spans 30 dates: parse each once
    file_name = course.path.name
    with open_text(course.path) as handle:
        reader = csv.reader(handle)
        user_at, time_at, count_at = _columns(course, next(reader, []))
        for line, row in enumerate(reader, start=2):
            report.rows_read += 1
            if len(row) <= max(user_at, time_at):
                row = row + [""] * (max(user_at, time_at) + 1 - len(row))
            user_id = row[user_at].strip()
            if not user_id:
                report.record("blank_user", f"{file_name}:{line}")
                continue
            day = day_of.get(row[time_at]) or _parse_day(row[time_at])
            if day is None:
                report.record("bad_time", f"{file_name}:{line}", repr(row[time_at]))
                continue
            day_of[row[time_at]] = day
            if not with_counts or row[2:] == _ZERO_DAY:  # most days of most learners
                yield day, user_id, {}
                continue
            yield day, user_id, _counts(row, count_at, f"{file_name}:{line}", report)


def _columns(course: Course, header: list[str]) -> tuple[int, int, list[tuple[str, int]]]:
    """Positions of the enrollment, the time and each activity count in a course file."""
    names = [name.strip() for name in header]
    expected = ["enrollment_id", "time", *(f"event_{kind}" for kind in ACTIVITY_TYPES)]
    missing = [name for name in expected if name not in names]
    if missing:
        raise ConfigurationError(f"{course.path} lacks the KDD columns {missing}")
    count_at = [(kind, names.index(f"event_{kind}")) for kind in ACTIVITY_TYPES]
    return names.index("enrollment_id"), names.index("time"), count_at


def _parse_day(text: str) -> date | None:
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        return None


def _counts(
    row: list[str], count_at: list[tuple[str, int]], where: str, report: ReplayReport
) -> dict[str, int]:
    counts = {}
    for kind, at in count_at:
        cell = row[at] if at < len(row) else ""
        if cell == "0":  # most cells; the fast path matters at seven million of them
            continue
        if cell.isdigit():
            counts[kind] = int(cell)
            continue
        try:
            n = parse_count(cell)
        except ValueError:
            report.record("bad_count", where, f"event_{kind}={cell!r}")
            continue
        if n is None:
            report.record("blank_number", where, f"event_{kind}")
        elif n > 0:
            counts[kind] = n
    return counts
