"""Benchmark data: simulated history in SQLite and the stream that follows it, cached on disk.

The history is what ``churn up`` would have stored: the simulator's users and events of
``days`` days in ``user_activity``, rows exactly as the consumer writes them. The stream is
the simulator's next day, as the JSON the producer sends, one event a line. Users are
simulated in shards of ``SHARD_USERS`` (seeds ``seed * 1000 + shard``, ids prefixed by the
shard), two shards at a time in child processes, because the simulator makes about 6,000
events a second and 10,000 users over 60 days are about 4.8 million events. Everything is
written once per (users, days, seed) under ``data/bench/`` (ignored by git) and reused; a
half-written set is never used, because the files get their final names only when complete.
"""

import json
import logging
import multiprocessing
import os
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from churn_stream import storage
from churn_stream.events import Event
from churn_stream.simulator import Simulator

log = logging.getLogger(__name__)

CACHE_DIR = Path(__file__).resolve().parents[1] / "data" / "bench"
START = datetime(2024, 1, 1, tzinfo=UTC)
STREAM_DAYS = 1
SHARD_USERS = 5_000
WORKERS = 2
WRITE_CHUNK = 50_000
DATA_VERSION = 2
"""Part of the cache file names; raise it when the generated data changes shape."""
DB_TIME = "%Y-%m-%d %H:%M:%S.%f"
"""How SQLAlchemy stores a ``DateTime`` in SQLite."""


@dataclass(frozen=True)
class Dataset:
    """A history database and the stream after it."""

    db_path: Path
    stream_path: Path
    users: int
    days: int
    history_events: int

    @property
    def url(self) -> str:
        return f"sqlite:///{self.db_path}"

    def stream(self) -> list[bytes]:
        """The stream's events as wire bytes, in time order."""
        return self.stream_path.read_bytes().splitlines()

    def stream_events(self) -> list[Event]:
        """The stream's events, parsed."""
        return [Event.model_validate_json(line) for line in self.stream()]


def simulated(users: int, days: int, seed: int = 0, folder: Path = CACHE_DIR) -> Dataset:
    """The cached dataset for these parameters, generated first if missing."""
    stem = f"sim-v{DATA_VERSION}-{users}u-{days}d-s{seed}"
    db_path, stream_path = folder / f"{stem}.db", folder / f"{stem}.stream.jsonl"
    meta_path = folder / f"{stem}.json"
    if not meta_path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        history_events = generate(users, days, seed, db_path, stream_path)
        meta_path.write_text(json.dumps({"history_events": history_events}))
    meta = json.loads(meta_path.read_text())
    return Dataset(db_path, stream_path, users, days, meta["history_events"])


def generate(users: int, days: int, seed: int, db_path: Path, stream_path: Path) -> int:
    """Simulate ``days`` of history into a fresh database and the next day into the stream."""
    log.info("generating %d users x %d days (seed %d) into %s; this happens once",
             users, days, seed, db_path)
    shards = [(i, min(SHARD_USERS, users - start), start)
              for i, start in enumerate(range(0, users, SHARD_USERS))]
    jobs = [(users, days, seed, shard, size, str(db_path), len(shards) > 1)
            for shard, size, _ in shards]
    if len(jobs) == 1:
        parts = [_simulate_shard(*jobs[0])]
    else:
        with multiprocessing.get_context("spawn").Pool(min(WORKERS, len(jobs))) as pool:
            parts = pool.starmap(_simulate_shard, jobs)
    partial = db_path.with_name(db_path.name + ".partial")
    written = _merge([Path(p) for p, _ in parts], partial)
    stream = sorted((line for _, lines in parts for line in lines),
                    key=lambda line: json.loads(line)["ts"])
    partial_stream = stream_path.with_name(stream_path.name + ".partial")
    partial_stream.write_bytes(b"".join(line + b"\n" for line in stream))
    os.replace(partial_stream, stream_path)
    os.replace(partial, db_path)
    log.info("generated %d history events and %d stream events", written, len(stream))
    return written


def _simulate_shard(users: int, days: int, seed: int, shard: int, size: int, db_path: str,
                    prefixed: bool) -> tuple[str, list[bytes]]:
    """One shard's history into a scratch database; returns its path and stream lines."""
    path = Path(f"{db_path}.shard{shard}")
    path.unlink(missing_ok=True)
    split = START + timedelta(days=days)
    prefix = f"s{shard}-" if prefixed else ""
    simulator = Simulator(size, START, days + STREAM_DAYS, seed=seed * 1000 + shard)
    stream: list[bytes] = []
    rows: list[tuple] = []
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE rows (event_id, user_id, event_type, ts, numeric_values, "
                     "categorical_values, ingested_at)")
        for event in simulator.events():
            if event.ts >= split:
                stream.append(event.model_copy(update={"user_id": prefix + event.user_id})
                              .to_bytes())
                continue
            rows.append(_row(event, prefix))
            if len(rows) == WRITE_CHUNK:
                conn.executemany("INSERT INTO rows VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                rows = []
        conn.executemany("INSERT INTO rows VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        conn.commit()
    return str(path), stream


def _row(event: Event, prefix: str) -> tuple:
    """The ``user_activity`` row the consumer would write, ingested at event time."""
    ts = event.ts.astimezone(UTC).strftime(DB_TIME)
    return (str(event.event_id), prefix + event.user_id, event.event_type, ts,
            json.dumps(dict(event.numeric)), json.dumps(dict(event.categorical)), ts)


def _merge(shards: list[Path], path: Path) -> int:
    """The shards' rows in time order into a fresh database with the project's schema."""
    for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        leftover.unlink(missing_ok=True)
    engine = storage.make_engine(f"sqlite:///{path}")
    storage.create_schema(engine)
    engine.dispose()
    indexes = list(storage.user_activity.indexes)
    with closing(sqlite3.connect(path)) as conn:
        # Secondary indexes are built once at the end: faster than growing them row by row.
        for index in indexes:
            conn.execute(f"DROP INDEX {index.name}")
        for number, shard in enumerate(shards):
            conn.execute(f"ATTACH DATABASE ? AS shard{number}", (str(shard),))
        # Only shard numbers go into the SQL text, never data.
        union = " UNION ALL ".join(f"SELECT * FROM shard{n}.rows"  # noqa: S608
                                   for n in range(len(shards)))
        conn.execute(f"INSERT INTO user_activity SELECT * FROM ({union}) ORDER BY ts")  # noqa: S608
        conn.commit()
        for number in range(len(shards)):
            conn.execute(f"DETACH DATABASE shard{number}")
        written = conn.execute("SELECT count(*) FROM user_activity").fetchone()[0]
    engine = storage.make_engine(f"sqlite:///{path}")
    for index in indexes:
        index.create(engine)
    engine.dispose()
    with closing(sqlite3.connect(path)) as conn:
        # The file alone must be the whole database.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("ANALYZE")
    for shard in shards:
        shard.unlink()
    return written
