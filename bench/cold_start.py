"""Cold start: ``predictor.py`` as a process, from its start to its first persisted prediction.

The topic holds a few events before the process starts, so the first prediction comes as
soon as the process can make one: imports, schema check, training from the dataset's
database in memory (the whole history, all three models), joining the group, one micro-batch.
"""

import logging
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from bench.common import Context, Figure, fmt, median, prefill, profiled, stream_values
from churn_stream import storage
from tests.brokers import free_port
from tests.conftest import settings_env

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 30.0
EVENTS_WAITING = 200
TIMEOUT_S = 1_200.0


def run(ctx: Context) -> list[Figure]:
    """The cold start figure."""
    seconds, training = [], []
    for number in range(ctx.sizes.runs):
        total, trained = start_once(ctx, number)
        seconds.append(total)
        training.append(trained)
        log.info("cold start run %d: first prediction after %s s (training %s s)", number + 1,
                 fmt(total), fmt(trained))
    if ctx.profile:
        from churn_stream.training import train

        engine = ctx.engine()
        with profiled("cold-start-training", True):
            train(engine, "profile")
        engine.dispose()
    stages = getattr(ctx.model(), "details", {}).get("seconds", {})
    stage_text = ", ".join(f"{stage} {fmt(s)} s" for stage, s in stages.items())
    return [Figure(
        f"cold start: process start to first prediction, training on "
        f"{ctx.dataset.users:,} users x {ctx.dataset.days} days in memory",
        f"<= {TARGET_S:.0f} s", "s", seconds, lambda v: v <= TARGET_S,
        notes=[f"{ctx.dataset.history_events:,} stored events; the training run itself "
               f"(model_runs.seconds) took {fmt(median(training))} s of it; the same training "
               f"in the bench process, by stage: {stage_text}"])]


def start_once(ctx: Context, number: int) -> tuple[float, float]:
    """Seconds to the first prediction, and the training run's own seconds."""
    ctx.clear_predictions()
    settings = ctx.settings(predictor_port=free_port())
    prefill(ctx.bootstrap_servers, settings.topic_activity,
            stream_values(ctx.dataset, EVENTS_WAITING))
    engine = ctx.engine()
    log_path = ctx.work_dir / f"cold-start-{number}.log"
    with log_path.open("wb") as output:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-u", str(ROOT / "predictor.py")],
                                   cwd=ROOT, env=settings_env(settings), stdout=output,
                                   stderr=subprocess.STDOUT)
        try:
            elapsed = _first_prediction(engine, process, started, log_path)
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    runs = storage.model_runs
    with engine.connect() as conn:
        trained = conn.execute(sa.select(runs.c.seconds).where(runs.c.promoted)
                               .order_by(runs.c.id.desc()).limit(1)).scalar()
    engine.dispose()
    return elapsed, float(trained or float("nan"))


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
