"""End to end: the simulator's outcomes go through the API into a feedback retrain.

Every service runs as a real process against the test broker and one SQLite file: consumer,
predictor, feedback API, feedback loop and the producer with its CRM reporter. The loop must
ask for a retrain, the predictor must record a run with reason ``feedback`` and promote it,
and the loop must then compute live metrics for that new version.
"""

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from churn_stream import storage
from churn_stream.settings import Settings
from tests.brokers import free_port
from tests.conftest import ROOT, settings_env, wait_until

PRODUCER_ARGS = [
    "--users=300", "--seed=11", "--churn-share=0.6",
    # Churns start 15% into the simulated span: a short horizon puts them in the history.
    "--backfill-days=40", "--horizon-days=10",
    # A live phase of 6 simulated days at 1200x lasts about 7 minutes, so the retrained
    # model scores activity that comes before outcomes already reported.
    "--live-days=6", "--speed=1200", "--rate=0",
    "--report-outcomes", "--report-share=1", "--report-delay-s=2",
]


@pytest.fixture
def stack(topics: Settings, engine: sa.Engine, tmp_path: Path) -> Iterator[Path]:
    """The five services, logs in ``tmp_path``; stopped with SIGTERM afterwards."""
    api_port = free_port()
    settings = topics.model_copy(update={
        "feedback_api_port": api_port, "predictor_port": free_port(),
        "feedback_loop_interval_s": 3.0, "retrain_min_new_outcomes": 50,
        "retrain_min_per_class": 5, "retrain_cooldown_s": 3600.0,
        "live_metrics_min_per_class": 3, "live_metrics_min_lead_s": 0.0,
        "promotion_tolerance": 1.0,
    })
    env = settings_env(settings)
    scripts = [("consumer.py", []), ("predictor.py", []), ("feedback_api.py", []),
               ("feedback_loop.py", []),
               ("producer.py", [*PRODUCER_ARGS, f"--feedback-url=http://127.0.0.1:{api_port}"])]
    processes = []
    for script, args in scripts:
        log = open(tmp_path / f"{script}.log", "w")  # noqa: SIM115 - closed with the process
        processes.append((subprocess.Popen([sys.executable, "-u", str(ROOT / script), *args],
                                           cwd=ROOT, env=env, stdout=log,
                                           stderr=subprocess.STDOUT), log))
    try:
        yield tmp_path
    finally:
        for process, _ in reversed(processes):
            process.terminate()
        for process, log in reversed(processes):
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def promoted_feedback_run(engine: sa.Engine) -> str | None:
    runs = storage.model_runs
    query = sa.select(runs.c.model_version).where(runs.c.reason == "feedback",
                                                  runs.c.promoted.is_(True))
    with engine.connect() as conn:
        return conn.execute(query.limit(1)).scalar()


def live_roc_auc(engine: sa.Engine, version: str) -> float | None:
    perf = storage.model_performance
    query = (sa.select(perf.c.roc_auc)
             .where(perf.c.model_version == version, perf.c.roc_auc.is_not(None))
             .order_by(perf.c.id.desc()).limit(1))
    with engine.connect() as conn:
        return conn.execute(query).scalar()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_reported_outcomes_lead_to_a_feedback_retrain_measured_live(
    stack: Path, engine: sa.Engine
) -> None:
    logs = lambda: "\n".join(p.read_text()[-3000:] for p in sorted(stack.glob("*.log")))  # noqa: E731
    assert wait_until(lambda: promoted_feedback_run(engine) is not None, timeout_s=600,
                      every_s=2), f"no promoted feedback retrain; logs:\n{logs()}"
    version = promoted_feedback_run(engine)
    with engine.connect() as conn:
        reported = conn.execute(sa.select(sa.func.count()).select_from(storage.feedback))
        assert reported.scalar_one() > 50
    assert wait_until(lambda: live_roc_auc(engine, version) is not None, timeout_s=240,
                      every_s=2), f"no live metrics for {version}; logs:\n{logs()}"
    assert 0.0 <= live_roc_auc(engine, version) <= 1.0
    assert "retrain requested" in (stack / "feedback_loop.py.log").read_text()
