"""Any event-log or profile file, CSV or JSON Lines, replayed through a column mapping.

A user's own export works without code: a small JSON or TOML file (``GenericSpec``) names
the user column, the time column (or a fixed ``snapshot_at`` for a table of profiles), and
either an event-type column, a fixed event type, or count columns (each a kind of activity
whose count becomes an event with ``numeric={"count": n}``, as for the KDD data), plus
optional numeric and categorical columns carried as event properties. Labels come from a
column of the same file or from a labels file. For example::

    {"path": "export.csv", "user_column": "customer", "time_column": "at",
     "event_type_column": "action", "numeric_columns": ["amount"],
     "labels": {"path": "churned.csv", "user_column": "customer", "label_column": "left",
                "known_after_days": 30}}

A file is sorted by time in memory (fine for a few million rows); a larger one sorted by
time already can be streamed with ``presorted = true``, and then a row earlier than the
one before it is counted as ``out_of_order`` and skipped.
"""

import json
import logging
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from churn_stream.errors import ConfigurationError
from churn_stream.events import Event
from churn_stream.replay.base import ReplayOutcome, ReplayReport, choose_users
from churn_stream.replay.fields import days, parse_time, snake_case, timezone_named
from churn_stream.replay.rows import NAME_PATTERN, RowReader, read_records

log = logging.getLogger(__name__)

TRUE_VALUES = ["1", "true", "yes", "y", "churned"]
FALSE_VALUES = ["0", "false", "no", "n", "retained"]


class LabelSpec(BaseModel):
    """Where the outcomes are: a labels file with one row per user."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    user_column: str
    label_column: str
    known_at_column: str | None = None
    """When each outcome became known; unset means ``known_after_days`` after the user's
    last replayed event."""
    known_after_days: float = Field(0.0, ge=0)
    churned_values: list[str] = Field(default_factory=lambda: list(TRUE_VALUES))
    retained_values: list[str] = Field(default_factory=lambda: list(FALSE_VALUES))


class GenericSpec(BaseModel):
    """How the columns of one file become events and outcomes."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    name: str | None = None
    """Names the replay in reports and event ids; unset means the file's stem."""
    format: Literal["csv", "jsonl"] | None = None
    """Unset means from the suffix (``.jsonl``/``.ndjson`` are JSON Lines, else CSV)."""
    delimiter: str = ","
    user_column: str
    time_column: str | None = None
    time_format: str = "iso"
    """``iso``, ``epoch_s``, ``epoch_ms`` or a ``strptime`` pattern."""
    timezone: str = "UTC"
    """The zone of times written without an offset."""
    snapshot_at: datetime | None = None
    """Every row's time when the file has no time column (a table of profiles)."""
    event_type_column: str | None = None
    event_type: str | None = None
    count_columns: list[str] = Field(default_factory=list)
    numeric_columns: list[str] = Field(default_factory=list, max_length=31)
    categorical_columns: list[str] = Field(default_factory=list, max_length=32)
    rename: dict[str, str] = Field(default_factory=dict)
    """Column -> property or event-type name; unset columns are snake-cased."""
    label_column: str | None = None
    """A label in the rows themselves; a user's last labelled row wins."""
    known_after_days: float = Field(0.0, ge=0)
    """How long after a user's last row a ``label_column`` outcome becomes known."""
    churned_values: list[str] = Field(default_factory=lambda: list(TRUE_VALUES))
    retained_values: list[str] = Field(default_factory=lambda: list(FALSE_VALUES))
    labels: LabelSpec | None = None
    presorted: bool = False

    @model_validator(mode="after")
    def _one_way_each(self) -> "GenericSpec":
        kinds = [self.event_type_column, self.event_type, self.count_columns or None]
        if sum(k is not None for k in kinds) != 1:
            raise ValueError("give exactly one of event_type_column, event_type, count_columns")
        if (self.time_column is None) == (self.snapshot_at is None):
            raise ValueError("give exactly one of time_column and snapshot_at")
        if self.label_column and self.labels:
            raise ValueError("give label_column or labels, not both")
        names = [self.event_type] if self.event_type else []
        names += [self.property_name(c) for c in self.count_columns + self.numeric_columns]
        names += [self.property_name(c) for c in self.categorical_columns]
        bad = [n for n in names if not NAME_PATTERN.match(n)]
        if bad:
            raise ValueError(f"names {bad} must match {NAME_PATTERN.pattern} (use rename)")
        return self

    def resolved_format(self) -> str:
        """``csv`` or ``jsonl``."""
        if self.format:
            return self.format
        suffixes = [s.lower() for s in self.path.suffixes if s.lower() != ".gz"]
        return "jsonl" if suffixes and suffixes[-1] in (".jsonl", ".ndjson") else "csv"

    def property_name(self, column: str) -> str:
        """The event property (or type) name a column becomes."""
        return self.rename.get(column) or snake_case(column)


def load_spec(path: Path, relative_to: Path | None = None) -> GenericSpec:
    """Read a mapping from a ``.json`` or ``.toml`` file; relative paths are from its folder."""
    import tomllib

    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        spec = GenericSpec.model_validate(raw)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"replay config {path}: {exc}") from None
    base = relative_to or path.parent
    update: dict[str, Any] = {"path": base / spec.path}
    if spec.labels is not None:
        update["labels"] = spec.labels.model_copy(update={"path": base / spec.labels.path})
    return spec.model_copy(update=update)


class GenericSource:
    """A file replayed according to a ``GenericSpec``."""

    def __init__(self, spec: GenericSpec) -> None:
        if not spec.path.is_file():
            raise ConfigurationError(f"replay file {spec.path} does not exist")
        self.spec = spec
        self.name = spec.name or spec.path.name.split(".")[0]
        self.report = ReplayReport(self.name)
        self.only_users: frozenset[str] | None = None
        self._last_seen: dict[str, datetime] | None = None
        self._row_labels: dict[str, tuple[str, str]] = {}

    def user_ids(self) -> list[str]:
        """Every user with at least one good row, sorted."""
        return sorted(self._scan())

    def limit_users(self, n_users: int, seed: int) -> None:
        """Replay a seeded random subset of ``n_users`` users."""
        self.only_users = choose_users(self.user_ids(), n_users, seed)

    def events(self) -> Iterator[Event]:
        """The file's events in time order (sorted in memory unless ``presorted``)."""
        self.report.restart("rows")
        reader = self._reader(self.report)
        rows = reader.events(self.only_users)
        stream = rows if self.spec.presorted else iter(sorted(rows, key=lambda e: e.ts))
        for event in stream:
            self.report.events += 1
            yield event

    def outcomes(self) -> list[ReplayOutcome]:
        """The labelled outcomes of replayed users, ordered by ``known_at``."""
        last_seen = self._scan()
        self.report.restart("labels")
        if self.spec.labels is not None:
            found = self._file_labels(self.spec.labels, last_seen)
        elif self.spec.label_column is not None:
            found = self._row_outcomes(last_seen)
        else:
            log.info("replay %s has no labels configured: no outcomes", self.name)
            return []
        chosen = [o for o in found if self.only_users is None or o.user_id in self.only_users]
        labelled = {o.user_id for o in found}
        for user_id in sorted(set(last_seen) - labelled):
            if self.only_users is None or user_id in self.only_users:
                self.report.record("user_without_label", user_id)
        chosen.sort(key=lambda o: o.known_at)
        self.report.outcomes = len(chosen)
        return chosen

    def _reader(self, report: ReplayReport) -> RowReader:
        return RowReader(self.spec, self.name, report)

    def _scan(self) -> dict[str, datetime]:
        """Each user's last good row time, and the rows' labels (a quiet first pass)."""
        if self._last_seen is None:
            reader = self._reader(ReplayReport(self.name))
            self._last_seen = {}
            for event in reader.events(None, label_column=self.spec.label_column):
                seen = self._last_seen.get(event.user_id)
                if seen is None or event.ts > seen:
                    self._last_seen[event.user_id] = event.ts
            self._row_labels = reader.labels
        return self._last_seen

    def _row_outcomes(self, last_seen: dict[str, datetime]) -> list[ReplayOutcome]:
        spec = self.spec
        outcomes = []
        for user_id, (value, where) in sorted(self._row_labels.items()):
            churned = _label(value, spec.churned_values, spec.retained_values)
            if churned is None:
                self.report.record("bad_label", where, repr(value))
                continue
            known_at = last_seen[user_id] + days(spec.known_after_days)
            outcomes.append(ReplayOutcome(user_id, churned, known_at))
        return outcomes

    def _file_labels(self, spec: LabelSpec, last_seen: dict[str, datetime]) -> list[ReplayOutcome]:
        outcomes: dict[str, ReplayOutcome] = {}
        zone = timezone_named(self.spec.timezone)
        file_format = "jsonl" if spec.path.suffix in (".jsonl", ".ndjson") else "csv"
        for where, row in read_records(spec.path, file_format, self.spec.delimiter, self.report):
            user_id = str(row.get(spec.user_column) or "").strip()
            value = row.get(spec.label_column)
            churned = _label(value, spec.churned_values, spec.retained_values)
            if churned is None:
                self.report.record("bad_label", where, repr(value))
            elif user_id not in last_seen:
                self.report.record("label_unknown_user", where, user_id or "blank")
            elif user_id in outcomes:
                self.report.record("duplicate_label", where, user_id)
            else:
                known_at = last_seen[user_id] + days(spec.known_after_days)
                if spec.known_at_column:
                    try:
                        known_at = parse_time(row.get(spec.known_at_column),
                                              self.spec.time_format, zone)
                    except ValueError as exc:
                        self.report.record("bad_label", where, f"known_at: {exc}")
                        continue
                outcomes[user_id] = ReplayOutcome(user_id, churned, known_at)
        return list(outcomes.values())


def _label(value: Any, churned: list[str], retained: list[str]) -> bool | None:
    text = str(value).strip().lower() if value is not None else ""
    if text in (v.lower() for v in churned):
        return True
    if text in (v.lower() for v in retained):
        return False
    return None
