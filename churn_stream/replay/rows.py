"""Turning the records of a mapped file into events, counting every bad cell it meets."""

import csv
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from churn_stream.events import Event
from churn_stream.replay.base import ReplayReport, event_id
from churn_stream.replay.fields import (
    open_text,
    parse_count,
    parse_number,
    parse_text,
    parse_time,
    snake_case,
    timezone_named,
)

if TYPE_CHECKING:
    from churn_stream.replay.generic import GenericSpec

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_.]{0,47}$")
_HAS_WORD = re.compile(r"[A-Za-z0-9]")


class RowReader:
    """Reads one file by its spec: each record becomes zero or more events.

    The labels met in a ``label_column`` are kept in ``labels`` (user -> value, where),
    the latest row winning, for the source to turn into outcomes.
    """

    def __init__(self, spec: "GenericSpec", name: str, report: ReplayReport) -> None:
        self.spec = spec
        self.name = name
        self.report = report
        self.labels: dict[str, tuple[str, str]] = {}
        self._zone = timezone_named(spec.timezone)
        self._now = datetime.now(UTC)
        self._latest: datetime | None = None
        self._type_names: dict[str, str | None] = {}

    def events(
        self, only_users: frozenset[str] | None, label_column: str | None = None
    ) -> Iterator[Event]:
        """The events of every good row, in file order."""
        spec = self.spec
        for where, record in read_records(spec.path, spec.resolved_format(), spec.delimiter,
                                          self.report):
            self.report.rows_read += 1
            user_id = parse_text_quietly(record.get(spec.user_column))
            if not user_id:
                self.report.record("blank_user", where)
                continue
            ts = self._time(where, record)
            if ts is None:
                continue
            if label_column is not None:
                self._keep_label(user_id, where, record.get(label_column))
            if only_users is None or user_id in only_users:
                yield from self._row_events(where, record, user_id, ts)

    def _time(self, where: str, record: dict[str, Any]) -> datetime | None:
        spec = self.spec
        if spec.time_column is None:
            assert spec.snapshot_at is not None
            snapshot = spec.snapshot_at
            return (snapshot.replace(tzinfo=snapshot.tzinfo or self._zone)).astimezone(UTC)
        value = record.get(spec.time_column)
        try:
            ts = parse_time(value, spec.time_format, self._zone)
        except (ValueError, TypeError, OverflowError, OSError):
            self.report.record("bad_time", where, repr(value))
            return None
        if ts > self._now:
            self.report.record("future_time", where, ts.isoformat())
            return None
        if spec.presorted:
            if self._latest is not None and ts < self._latest:
                self.report.record("out_of_order", where, ts.isoformat())
                return None
            self._latest = ts
        return ts

    def _keep_label(self, user_id: str, where: str, value: Any) -> None:
        if value is not None and str(value).strip():
            self.labels[user_id] = (str(value).strip(), where)

    def _row_events(
        self, where: str, record: dict[str, Any], user_id: str, ts: datetime
    ) -> Iterator[Event]:
        numeric, categorical = self._properties(where, record)
        for kind, count in self._kinds(where, record):
            values = numeric if count is None else {**numeric, "count": float(count)}
            try:
                event = Event(event_id=event_id(self.name, where, kind), user_id=user_id,
                              event_type=kind, ts=ts, numeric=values, categorical=categorical)
            except ValidationError as exc:
                self.report.record("invalid_event", where, str(exc.errors()[0]["msg"]))
                continue
            yield event

    def _kinds(self, where: str, record: dict[str, Any]) -> Iterator[tuple[str, int | None]]:
        """(event type, count or None) for each event this record makes."""
        spec = self.spec
        if spec.event_type is not None:
            yield spec.event_type, None
        elif spec.event_type_column is not None:
            value = record.get(spec.event_type_column)
            kind = self._type_name(value)
            if kind is None:
                self.report.record("bad_event_type", where, repr(value))
            else:
                yield kind, None
        for column in spec.count_columns:
            try:
                count = parse_count(record.get(column))
            except (ValueError, TypeError):
                self.report.record("bad_count", where, f"{column}={record.get(column)!r}")
                continue
            if count is None:
                self.report.record("blank_number", where, column)
            elif count > 0:
                yield spec.property_name(column), count

    def _type_name(self, value: Any) -> str | None:
        text = "" if value is None else str(value)
        if text not in self._type_names:
            name = snake_case(text) if _HAS_WORD.search(text) else ""
            self._type_names[text] = name if NAME_PATTERN.match(name) else None
        return self._type_names[text]

    def _properties(
        self, where: str, record: dict[str, Any]
    ) -> tuple[dict[str, float], dict[str, str]]:
        numeric: dict[str, float] = {}
        for column in self.spec.numeric_columns:
            try:
                number = parse_number(record.get(column))
            except (ValueError, TypeError):
                self.report.record("bad_number", where, f"{column}={record.get(column)!r}")
                continue
            if number is None:
                self.report.record("blank_number", where, column)
            else:
                numeric[self.spec.property_name(column)] = number
        categorical: dict[str, str] = {}
        for column in self.spec.categorical_columns:
            try:
                text = parse_text(record.get(column))
            except ValueError as exc:
                self.report.record("too_long", where, f"{column}: {exc}")
                continue
            if text is not None:
                categorical[self.spec.property_name(column)] = text
        return numeric, categorical


def parse_text_quietly(value: Any) -> str:
    """A cell as stripped text, blank when missing."""
    return "" if value is None else str(value).strip()


def read_records(
    path: Path, file_format: str, delimiter: str, report: ReplayReport
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each record of a CSV or JSON Lines file as (``file:line``, mapping)."""
    with open_text(path) as handle:
        if file_format == "csv":
            reader = csv.DictReader(handle, delimiter=delimiter)
            for row in reader:
                yield f"{path.name}:{reader.line_num}", row
            return
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                report.record("bad_json", f"{path.name}:{number}", line.strip()[:60])
                continue
            yield f"{path.name}:{number}", record
