"""Reading the cells of a dataset: files, names, times, numbers and counts.

Each parser raises ``ValueError`` with a short reason for a bad cell and returns ``None``
for a blank one; the readers turn both into counted entries of the replay report.
"""

import gzip
import math
import re
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from pathlib import Path
from typing import IO, Any
from zoneinfo import ZoneInfo

# A date without a time of day stands for the whole day; midday keeps its events inside
# that date whatever a reader later does with dates, and before the midnight that ends it.
DAY_STAMP = time(12, 0)
MAX_TEXT_CHARS = 128
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_NOT_NAME = re.compile(r"[^a-z0-9_.]+")


def open_text(path: Path) -> IO[str]:
    """Open a text file for reading, gunzipping ``.gz`` and dropping a byte-order mark."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return path.open(encoding="utf-8-sig", newline="")


def snake_case(name: str) -> str:
    """A column name as an event property or type name: ``MonthlyCharges`` -> ``monthly_charges``.

    >>> snake_case("customerID"), snake_case("Payment Method"), snake_case("2nd")
    ('customer_id', 'payment_method', 'x_2nd')
    """
    text = _NOT_NAME.sub("_", _CAMEL_BOUNDARY.sub("_", name.strip()).lower()).strip("_")
    if not text[:1].isalpha():
        text = f"x_{text}"
    return text[:48]


def timezone_named(name: str) -> tzinfo:
    """``UTC`` or an IANA zone name such as ``Europe/Paris``."""
    return UTC if name.upper() == "UTC" else ZoneInfo(name)


def parse_time(value: Any, time_format: str = "iso", zone: tzinfo = UTC) -> datetime:
    """An aware UTC datetime from a cell.

    ``time_format`` is ``iso`` (ISO 8601 date or date-time), ``epoch_s``, ``epoch_ms``, or
    a ``strptime`` pattern. A time without offset is read in ``zone``; a bare date is
    stamped at midday (``DAY_STAMP``).
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError("blank time")
    if time_format in ("epoch_s", "epoch_ms"):
        seconds = parse_number(value)
        if seconds is None:
            raise ValueError("blank time")
        scale = 1000.0 if time_format == "epoch_ms" else 1.0
        return datetime.fromtimestamp(seconds / scale, UTC)
    text = str(value).strip()
    if time_format == "iso":
        parsed = _parse_iso(text)
    else:
        parsed = datetime.strptime(text, time_format)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=zone)
    return parsed.astimezone(UTC)


def _parse_iso(text: str) -> datetime:
    if len(text) == 10:
        return datetime.combine(date.fromisoformat(text), DAY_STAMP)
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def parse_number(value: Any) -> float | None:
    """A finite float from a cell, ``None`` when blank."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        return float(value)
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not finite")
    return number


def parse_count(value: Any) -> int | None:
    """A whole number >= 0 from a cell, ``None`` when blank."""
    number = parse_number(value)
    if number is None:
        return None
    if number < 0 or number != int(number):
        raise ValueError(f"{value!r} is not a count")
    return int(number)


def parse_text(value: Any) -> str | None:
    """A categorical value from a cell, ``None`` when blank; too long raises."""
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"{len(text)} characters")
    return text


def days(n_days: float) -> timedelta:
    """``n_days`` as a timedelta (a readable unit at call sites)."""
    return timedelta(days=n_days)
