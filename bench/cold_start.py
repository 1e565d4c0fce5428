"""Cold start: ``predictor.py`` as a process, from its start to its first persisted prediction.

The topic holds a few events before the process starts, so the first prediction comes as
soon as the process can make one: imports, schema check, the first training run from the
dataset's database in memory (on a sample of ``PREDICTOR_FIRST_RUN_USERS`` users), joining
the group, one micro-batch. The process then runs on until the full-size run that follows
(reason ``warm-up``) has ended, so that the notes also say when the full model served.
"""

import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.common import Context, Figure, fmt, median, prefill, profiled, stream_values
from churn_stream import storage
from churn_stream.predictor.retrain import WARM_UP
from churn_stream.predictor.runs import UNFINISHED
from churn_stream.training import MAX_USERS
from tests.brokers import free_port
from tests.conftest import settings_env

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 30.0
EVENTS_WAITING = 200
TIMEOUT_S = 1_200.0


@dataclass
class ColdStart:
    """One start of the process: when it first predicted, and how its training runs went."""

    first_prediction_s: float
    first_run: dict[str, Any]
    """The first promoted ``model_runs`` row: ``seconds``, ``promoted``, ``metrics``."""
    full_run: dict[str, Any] = field(default_factory=dict)
    """The ``warm-up`` row once it ended, with ``served_s`` from the process start if its
    model was promoted; empty when no full-size run followed."""

    @property
    def details(self) -> dict[str, Any]:
        return (self.first_run.get("metrics") or {}).get("details") or {}


def run(ctx: Context) -> list[Figure]:
    """The cold start figure."""
    starts = []
    for number in range(ctx.sizes.runs):
        start = start_once(ctx, number)
        starts.append(start)
        log.info("cold start run %d: first prediction after %s s (training %s s on %s users); "
                 "full-size model served after %s s", number + 1,
                 fmt(start.first_prediction_s), fmt(start.first_run.get("seconds", float("nan"))),
                 start.details.get("users"), fmt(start.full_run.get("served_s", float("nan"))))
    if ctx.profile:
        from churn_stream.predictor.reference import train_with_reference

        engine = ctx.engine()
        with profiled("cold-start-training", True):
            train_with_reference(engine, "profile", max_users=starts[-1].details["users"])
        engine.dispose()
    return [Figure(
        f"cold start: process start to first prediction, training on "
        f"{ctx.dataset.users:,} users x {ctx.dataset.days} days in memory",
        f"<= {TARGET_S:.0f} s", "s", [s.first_prediction_s for s in starts],
        lambda v: v <= TARGET_S, notes=[notes(ctx, starts)])]


def notes(ctx: Context, starts: list[ColdStart]) -> str:
    """What the training runs of the starts took."""
    last = starts[-1].details
    stages = ", ".join(f"{stage} {fmt(s)} s" for stage, s in last.get("seconds", {}).items())
    trained_s = median([s.first_run["seconds"] for s in starts])
    text = (f"{ctx.dataset.history_events:,} stored events; the first training run "
            f"(model_runs.seconds) took {fmt(trained_s)} s of it, on {last.get('users')} users"
            f"{' (a sample)' if last.get('sampled') else ''}; by stage, last run: {stages}")
    full = [s.full_run for s in starts if s.full_run]
    if full:
        served = [f["served_s"] for f in full if "served_s" in f]
        text += (f". The full-size run (reason {WARM_UP}) that follows took "
                 f"{fmt(median([f['seconds'] for f in full]))} s alongside the consume loop; "
                 f"its model served {fmt(median(served))} s after the process started "
                 f"({len(served)} of {len(full)} promoted)")
    return text


def start_once(ctx: Context, number: int) -> ColdStart:
    """One start of ``predictor.py``, until its first prediction and its full-size model."""
    ctx.clear_predictions()
    first_run = ctx.sizes.first_run_users
    size = {} if first_run is None else {"predictor_first_run_users": first_run}
    settings = ctx.settings(predictor_port=free_port(), **size)
    prefill(ctx.bootstrap_servers, settings.topic_activity,
            stream_values(ctx.dataset, EVENTS_WAITING))
    engine = ctx.engine()
    log_path = ctx.work_dir / f"cold-start-{number}.log"
    with engine.connect() as conn:
        after_id = conn.execute(sa.select(sa.func.max(storage.model_runs.c.id))).scalar() or 0
    with log_path.open("wb") as output:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-u", str(ROOT / "predictor.py")],
                                   cwd=ROOT, env=settings_env(settings), stdout=output,
                                   stderr=subprocess.STDOUT)
        try:
            elapsed = _first_prediction(engine, process, started, log_path)
            first = _run_row(engine, after_id, "start") or {"seconds": float("nan")}
            start = ColdStart(elapsed, first)
            # A full run reads every user up to MAX_USERS; a first run that read fewer is
            # followed by one.
            if start.details.get("users", MAX_USERS) < min(ctx.dataset.users, MAX_USERS):
                start.full_run = _full_run(engine, process, started, after_id, log_path)
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    engine.dispose()
    return start


def _run_row(engine: sa.Engine, after_id: int, reason: str) -> dict[str, Any] | None:
    """The latest run of this start with ``reason`` that has ended."""
    runs = storage.model_runs
    query = (sa.select(runs.c.seconds, runs.c.promoted, runs.c.metrics)
             .where(runs.c.id > after_id, runs.c.reason == reason, runs.c.error.is_distinct_from(
                 UNFINISHED)).order_by(runs.c.id.desc()).limit(1))
    with engine.connect() as conn:
        row = conn.execute(query).mappings().first()
    return dict(row) if row is not None else None


def _full_run(engine: sa.Engine, process: subprocess.Popen, started: float, after_id: int,
              log_path: Path) -> dict[str, Any]:
    while time.perf_counter() - started < TIMEOUT_S:
        row = _run_row(engine, after_id, WARM_UP)
        if row is not None:
            served = {"served_s": time.perf_counter() - started} if row["promoted"] else {}
            return row | served
        if process.poll() is not None:
            raise RuntimeError(f"predictor.py exited with {process.returncode}; see {log_path}")
        time.sleep(0.5)
    raise TimeoutError(f"the full-size run did not end within {TIMEOUT_S:.0f} s; see {log_path}")


def _first_prediction(engine: sa.Engine, process: subprocess.Popen, started: float,
                      log_path: Path) -> float:
    query = sa.select(sa.func.count()).select_from(storage.predictions)
    while time.perf_counter() - started < TIMEOUT_S:
        with engine.connect() as conn:
            if conn.execute(query).scalar_one():
                return time.perf_counter() - started
        if process.poll() is not None:
            raise RuntimeError(f"predictor.py exited with {process.returncode}; see {log_path}")
        time.sleep(0.05)
    raise TimeoutError(f"no prediction within {TIMEOUT_S:.0f} s; see {log_path}")
