"""The feedback API under concurrent writers from a second process on loopback.

``feedback_api.py`` runs as a process with an API key; ``tests.faults.load_writer`` runs as
another with 8 threads of 250 requests each, stopping after 60 s at most. No request may
answer 5xx; every ``feedback_id`` must be created once, its repeats answered 200 and the
requests that carried another outcome under it 409; each is stored once, with the outcome
of its 201, and published to ``churn-feedback`` once.
"""

import json
import subprocess
import sys
from collections import Counter

import httpx
import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from churn_stream import storage
from churn_stream.settings import Settings
from tests.brokers import free_port
from tests.conftest import ROOT, wait_until
from tests.faults.conftest import Figures, read_topic

THREADS = 8
REQUESTS_PER_THREAD = 250
DEADLINE_S = 60.0
API_KEY = "load-key-41c7"


def run_writers(url: str) -> dict:
    """Run the writers' process to its end and return its summary."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.faults.load_writer", url, "--threads", str(THREADS),
         "--requests", str(REQUESTS_PER_THREAD), "--deadline-s", str(DEADLINE_S),
         "--api-key", API_KEY],
        cwd=ROOT, capture_output=True, timeout=DEADLINE_S + 60, check=True,
    )
    return json.loads(done.stdout)


@pytest.mark.faults
@pytest.mark.timeout(180)
def test_concurrent_writers_get_no_5xx_and_each_feedback_is_stored_once(
    topics: Settings, engine: sa.Engine, services, report
) -> None:
    settings = topics.model_copy(update={"feedback_api_port": free_port(),
                                         "churn_api_key": SecretStr(API_KEY)})
    url = f"http://127.0.0.1:{settings.feedback_api_port}"
    api = services("feedback_api.py", settings)
    assert wait_until(lambda: _answers(f"{url}/health"), 60), api.tail()

    summary = run_writers(url)
    answers: dict[str, list[list]] = summary["answers"]
    status = Counter({int(k) if k.isdigit() else k: v for k, v in summary["status"].items()})
    assert wait_until(lambda: _pending(url) == 0, 30), "the outbox did not catch up"
    rows = stored_rows(engine)
    stored = dict(rows)
    published = read_topic(settings, settings.topic_feedback, len(stored), timeout_s=30)
    published_ids = Counter(json.loads(r.value)["feedback_id"] for r in published)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: -15 is a clean stop.
    assert api.stop() in (0, -15), api.tail()

    figures = Figures.count("feedback API load", answers, [fid for fid, _ in rows])
    wrong = {fid: codes for fid, codes in answers.items()
             if not answered_right(codes, stored.get(fid))}
    report(figures, requests=summary["requests"], seconds=summary["seconds"],
           requests_per_s=round(summary["requests"] / summary["seconds"]),
           status=dict(status), wrong_answers=len(wrong), published=sum(published_ids.values()))
    assert not [k for k in status if not isinstance(k, int) or k >= 500], status
    assert set(status) <= {200, 201, 409}, status
    # The deadline bounds the load on a slow machine; the checks below hold for whatever ran,
    # and a few hundred concurrent requests are enough to exercise the races.
    assert summary["requests"] >= min(300, THREADS * REQUESTS_PER_THREAD), "too little load ran"
    assert not wrong, f"answers that do not match what was stored: {dict(list(wrong.items())[:5])}"
    assert (figures.stored, figures.duplicated, figures.lost) == (len(answers), 0, 0)
    assert set(published_ids) == set(stored) and max(published_ids.values()) == 1


def stored_rows(engine: sa.Engine) -> list[tuple[str, bool]]:
    """(``feedback_id``, ``churned``) of every stored row."""
    table = storage.feedback
    with engine.connect() as conn:
        return [(fid, bool(churned)) for fid, churned in
                conn.execute(sa.select(table.c.feedback_id, table.c.churned))]


def answered_right(codes: list[list], stored: bool | None) -> bool:
    """One 201 for the stored outcome, 200 for its repeats, 409 for the other outcome."""
    if stored is None:
        return False
    created = [churned for code, churned in codes if code == 201]
    return created == [stored] and all(
        (code == 200 and churned == stored) or (code == 409 and churned != stored)
        for code, churned in codes if code != 201)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _pending(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/health", timeout=5).json().get("pending_feedback")
    except httpx.HTTPError:
        return None
