"""The dashboard: its queries and figures on a seeded SQLite database, the app through
Streamlit's AppTest (seeded, schema only, no database at all), and a real headless Chromium.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
import streamlit as st
from sqlalchemy.dialects import mssql
from streamlit.testing.v1 import AppTest

from churn_stream import storage
from churn_stream.settings import get_settings
from dashboard import charts, queries
from dashboard.predictor_client import fetch_top_features, parse_top_features
from dashboard.sample_data import SampleSummary, seed_sample_data
from tests.brokers import free_port

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "dashboard" / "app.py")
TOP_FEATURES = [{"feature": "login.count_7d", "contribution": -0.21},
                {"feature": "support_ticket.count_30d", "contribution": 0.34}]


def seed(directory: Path) -> tuple[str, SampleSummary]:
    """A database in ``directory`` with rows in every table the dashboard reads, ending now."""
    url = f"sqlite:///{directory / 'seeded.db'}"
    engine = storage.make_engine(url)
    summary = seed_sample_data(engine, datetime.now(UTC).replace(microsecond=0),
                               n_users=120, seed=11)
    engine.dispose()
    return url, summary


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, SampleSummary]:
    """One seeding shared by the module; its ``now`` recedes as the module runs."""
    return seed(tmp_path_factory.mktemp("dash"))


@pytest.fixture
def conn(seeded: tuple[str, SampleSummary]) -> Iterator[sa.Connection]:
    engine = storage.make_engine(seeded[0])
    with engine.connect() as connection:
        yield connection
    engine.dispose()


def run_app(monkeypatch: pytest.MonkeyPatch, url: str, predictor_url: str | None = None) -> AppTest:
    """The dashboard script run once by AppTest against ``url``."""
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("PREDICTOR_URL", predictor_url or f"http://127.0.0.1:{free_port()}")
    get_settings.cache_clear()
    st.cache_data.clear()
    # Generous: one run renders ten figures, and a loaded 2-core machine is slow at it.
    app = AppTest.from_file(APP, default_timeout=120)
    app.run()
    get_settings.cache_clear()
    return app


def metrics_of(app: AppTest) -> dict[str, str]:
    return {metric.label: metric.value for metric in app.metric}


def chart_titles(app: AppTest) -> list[str]:
    return [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in app.get("plotly_chart")]


def high_risk(summary: SampleSummary, threshold: float) -> int:
    return sum(score >= threshold for score in summary.latest_scores.values())


# --- queries -----------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_latest_scores_hold_one_row_per_user_riskiest_first(conn, seeded) -> None:
    _, summary = seeded
    latest = queries.latest_scores(conn, hours=24)
    assert dict(zip(latest["user_id"], latest["score"], strict=True)) == summary.latest_scores
    assert latest["score"].is_monotonic_decreasing


@pytest.mark.timeout(60)
def test_prediction_rows_come_back_in_the_order_asked(conn) -> None:
    latest = queries.latest_scores(conn, hours=24)
    ids = tuple(int(i) for i in latest["id"].head(5))[::-1]
    rows = queries.prediction_rows(conn, ids)
    assert tuple(rows["id"]) == ids
    assert list(rows["score"]) == list(latest["score"].head(5))[::-1]
    assert queries.prediction_rows(conn, ()).empty


@pytest.mark.timeout(60)
def test_activity_buckets_count_every_event_of_the_window(conn, seeded) -> None:
    _, summary = seeded
    activity = queries.activity_by_type(conn, hours=72)
    # The seeded history is three days ending now, so a 72 h window holds all of it.
    assert activity["events"].sum() == summary.events
    widths = activity["bucket"].drop_duplicates().diff().dropna()
    assert (widths % pd.Timedelta(seconds=queries.bucket_width_s(72)) == pd.Timedelta(0)).all()


@pytest.mark.timeout(60)
def test_activity_summary_rate_is_the_newest_five_minutes(conn, seeded) -> None:
    _, summary = seeded
    activity = queries.activity_summary(conn, now=summary.now)
    assert queries.users_tracked(conn) == summary.users
    assert activity["events_per_min"] == summary.ingested_recently / 5
    # The newest event was stored 5 s before the seeding's ``now``.
    assert activity["last_ingested_at"] == storage.to_db_time(summary.now - timedelta(seconds=5))
    assert queries.activity_summary(conn, now=summary.now + timedelta(minutes=30)) == {
        "events_per_min": 0.0, "last_ingested_at": activity["last_ingested_at"]}


@pytest.mark.timeout(60)
def test_risk_over_time_averages_every_prediction(conn, seeded) -> None:
    _, summary = seeded
    risk = queries.risk_over_time(conn, hours=24)
    assert risk["predictions"].sum() == summary.predictions
    assert risk["score"].between(0, 1).all()


@pytest.mark.timeout(60)
def test_psi_history_keeps_psi_rows_of_the_window_only(conn) -> None:
    psi = queries.psi_history(conn, hours=6)
    newest = psi["evaluated_at"].max()
    assert (psi["evaluated_at"] >= newest - pd.Timedelta(hours=6)).all()
    # Every half hour, five features: 13 evaluations in six hours counting both ends.
    assert len(psi) == 13 * 5


@pytest.mark.timeout(60)
def test_model_runs_spread_the_predictors_metrics(conn) -> None:
    runs = queries.model_runs_frame(conn)
    assert list(runs["model_version"]) == ["v3", "v2", "v1"]
    assert {"rf roc_auc", "xgb roc_auc", "seq roc_auc", "blend roc_auc", "rf weight"} <= set(runs)
    assert queries.promoted_model(conn)["model_version"] == "v2"


def test_flatten_metrics_reads_nested_and_flat_shapes() -> None:
    runs = pd.DataFrame({"metrics": [
        {"models": {"blend": {"roc_auc": 0.8}}, "weights": {"rf": 0.5},
         "promotion": {"candidate_roc_auc": 0.7}},
        {"blend": {"roc_auc": 0.9, "note": "text"}},
        None,
    ]})
    flat = queries.flatten_metrics(runs)
    assert flat["blend roc_auc"].tolist()[:2] == [0.8, 0.9]
    assert flat["rf weight"].tolist()[0] == 0.5
    assert "metrics" not in flat and "blend note" not in flat


@pytest.mark.timeout(60)
def test_user_queries_are_bounded_and_per_user(conn, seeded) -> None:
    _, summary = seeded
    user_id = next(iter(summary.latest_scores))
    events = queries.user_events(conn, user_id, max_rows=3)
    scores = queries.user_scores(conn, user_id)
    assert len(events) == 3 and events["ts"].is_monotonic_decreasing
    assert scores["score"].iloc[0] == summary.latest_scores[user_id]
    assert queries.user_events(conn, "nobody").empty


@pytest.mark.timeout(60)
def test_epoch_seconds_matches_python_on_sqlite(conn) -> None:
    moments = [datetime(1970, 1, 1, 0, 0, 1), datetime(2024, 2, 29, 23, 59, 59, 999_999)]
    for moment in moments:
        value = conn.execute(sa.select(queries.epoch_seconds(sa.literal(moment)))).scalar_one()
        assert value == int(moment.replace(tzinfo=UTC).timestamp())


class RecordingConnection:
    """Compiles what a query sends for SQL Server and answers like an empty table.

    No SQL Server runs here; this shows the windowed queries compile in its dialect.
    """

    dialect = mssql.dialect()

    def __init__(self) -> None:
        self.sql: list[str] = []

    def execute(self, statement: sa.Executable) -> "RecordingConnection":
        self.sql.append(str(statement.compile(dialect=self.dialect)))
        self.columns = list(statement.selected_columns.keys())
        return self

    def scalar(self) -> datetime:
        return datetime(2026, 1, 1)

    def fetchall(self) -> list:
        return []

    def keys(self) -> list[str]:
        return self.columns


def test_windowed_queries_compile_for_sql_server() -> None:
    recorder = RecordingConnection()
    last_sent = []
    for query in (queries.activity_by_type, queries.risk_over_time, queries.latest_scores):
        query(recorder, hours=24)
        last_sent.append(recorder.sql[-1])
    activity, risk, latest = last_sent
    assert "DATEDIFF_BIG(second, '19700101', anon_2.ts)" in activity
    assert "DATEDIFF_BIG(second, '19700101', anon_2.scored_at)" in risk
    for sql in (activity, risk, latest):
        assert re.search(r"TOP __\[POSTCOMPILE_param_\d\]", sql) and "LIMIT" not in sql
        assert "2026" not in sql  # times travel as bound parameters
    assert "GROUP BY anon_1.bucket, anon_1.event_type" in activity
    assert "max(anon_2.id)" in latest and "GROUP BY anon_2.user_id" in latest


def test_bucket_width_is_round_and_bounded() -> None:
    assert [queries.bucket_width_s(h) for h in (0.1, 1, 24, 168, 10_000)] == [
        10, 30, 900, 10_800, 86_400]


@pytest.mark.timeout(60)
def test_missing_tables_on_an_empty_database(tmp_path: Path) -> None:
    engine = storage.make_engine(f"sqlite:///{tmp_path / 'none.db'}")
    assert queries.missing_tables(engine) == [t.name for t in queries.DASHBOARD_TABLES]
    storage.create_schema(engine)
    assert queries.missing_tables(engine) == []
    engine.dispose()


# --- figures -----------------------------------------------------------------------------------

def test_risk_histogram_marks_the_threshold() -> None:
    figure = charts.risk_histogram(pd.DataFrame({"score": [0.1, 0.7, 0.9]}), threshold=0.6)
    (line,) = figure.layout.shapes
    assert (line.x0, line.x1) == (0.6, 0.6)


@pytest.mark.timeout(60)
def test_psi_figure_shows_top_features_threshold_and_retrains(conn) -> None:
    psi = queries.psi_history(conn, hours=24)
    runs = charts.retrain_frame(queries.model_runs_frame(conn))
    figure = charts.psi_by_feature(psi, runs, top_n=3)
    assert len(figure.data) == 3
    assert {t.name for t in figure.data} >= {"session_end.duration_s.mean_7d",
                                             "purchase.amount.mean_30d"}
    horizontal = [s for s in figure.layout.shapes if s.y0 == s.y1]
    vertical = [s for s in figure.layout.shapes if s.x0 == s.x1]
    assert [s.y0 for s in horizontal] == [0.2]
    # v2 (drift, 12 h ago) and v3 (feedback, 5 h ago) fall in the window; v1 does not.
    assert len(vertical) == 2
    texts = [a.text for a in figure.layout.annotations if a.text.startswith("retrain")]
    assert texts == ["retrain v2 (drift, promoted)", "retrain v3 (feedback, kept old)"]


@pytest.mark.timeout(60)
def test_model_metrics_pairs_validation_with_live(conn) -> None:
    figure = charts.model_metrics(queries.model_runs_frame(conn), queries.live_performance(conn))
    series = {trace.name for trace in figure.data}
    assert series == {"rf (validation)", "xgb (validation)", "seq (validation)",
                      "blend (validation)", "blend (live)"}


def test_latency_figures_give_the_percentiles() -> None:
    start = pd.Timestamp("2026-01-01", tz="UTC")
    latencies = pd.DataFrame({
        "latency_ms": [float(v) for v in range(1, 101)] + [5000.0],
        "scored_at": [start + pd.Timedelta(seconds=i) for i in range(101)],
    })
    figure = charts.latency_histogram(latencies)
    assert figure.layout.title.text == "Prediction latency: p50 51.0 ms, p95 96.0 ms, p99 100.0 ms"
    over_time = charts.latency_over_time(latencies, buckets=4)
    p50, p95 = over_time.data
    assert list(p50.y) == [13.0, 38.0, 63.0, 88.0, 5000.0]
    assert p95.y[-1] == 5000.0


def test_top_features_put_the_largest_contribution_on_top() -> None:
    figure = charts.top_features([("a", 0.1), ("b", -0.5), ("c", 0.3)])
    assert list(figure.data[0].y) == ["a", "c", "b"]


def test_parse_top_features_shapes() -> None:
    assert parse_top_features(TOP_FEATURES) == [("login.count_7d", -0.21),
                                                 ("support_ticket.count_30d", 0.34)]
    assert parse_top_features([["x", 1]]) == [("x", 1.0)]
    with pytest.raises(ValueError, match="needs one of"):
        parse_top_features([{"feature": "x"}])


@pytest.mark.timeout(30)
def test_unreachable_predictor_is_a_reason_not_an_error() -> None:
    answer = fetch_top_features(f"http://127.0.0.1:{free_port()}", "u1", timeout_s=1)
    assert answer.features == [] and "did not answer" in answer.unavailable_reason


# --- the app through AppTest ---------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_app_shows_the_seeded_headline_and_every_chart(monkeypatch, tmp_path: Path) -> None:
    # Seeded just before the run: events per minute counts the last five minutes of wall clock.
    url, summary = seed(tmp_path)
    app = run_app(monkeypatch, url)
    assert not app.exception
    high = high_risk(summary, 0.5)
    assert metrics_of(app) == {
        "Users tracked": f"{summary.users:,}",
        "Events / min": f"{summary.ingested_recently / 5:,.0f}",
        "Above risk threshold": f"{high / len(summary.latest_scores):.1%}",
        "High-risk users": f"{high:,}",
        "Model": "v2",
        "Live ROC-AUC": f"{summary.live_roc_auc:.3f}",
    }
    assert chart_titles(app) == [
        "Churn-risk distribution", "Activity timeline (UTC)", "Score history (UTC)",
        "Activity by event type (event time, UTC)", "Mean predicted risk over time (UTC)",
        "Feature drift (PSI) and retrains (UTC)",
        "ROC-AUC per model version: validation and live",
        "Live ROC-AUC from reported outcomes (UTC)", app_latency_title(app),
        "Prediction latency over time (UTC)",
    ]
    assert any("unavailable: the predictor at" in info.value for info in app.info)
    riskiest = max(summary.latest_scores, key=summary.latest_scores.get)
    assert app.selectbox(key="drilldown_user").value == riskiest


def app_latency_title(app: AppTest) -> str:
    titles = chart_titles(app)
    (latency,) = [t for t in titles if t.startswith("Prediction latency: p50 ")]
    return latency


@pytest.mark.timeout(300)
def test_threshold_slider_recounts_the_high_risk_users(monkeypatch, seeded) -> None:
    url, summary = seeded
    app = run_app(monkeypatch, url)
    app.slider(key="threshold").set_value(0.8).run()
    assert not app.exception
    assert metrics_of(app)["High-risk users"] == f"{high_risk(summary, 0.8):,}"
    (table,) = [df for df in app.dataframe if "risk" in df.value.columns]
    assert len(table.value) == high_risk(summary, 0.8)


@pytest.mark.timeout(300)
def test_drilldown_of_an_unknown_user_says_so(monkeypatch, seeded) -> None:
    url, _ = seeded
    app = run_app(monkeypatch, url)
    app.text_input(key="drilldown_lookup").input("nobody").run()
    assert not app.exception
    notes = [info.value for info in app.info]
    assert "No events stored for user nobody." in notes
    assert "No predictions stored for user nobody." in notes


@pytest.fixture
def predictor_stub() -> Iterator[str]:
    """An HTTP server answering ``/predict/{user_id}`` in the predictor's response shape."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            user_id = self.path.rsplit("/", 1)[-1]
            body = json.dumps({"user_id": user_id, "top_features": TOP_FEATURES}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.timeout(300)
def test_drilldown_shows_the_predictors_top_features(monkeypatch, seeded, predictor_stub) -> None:
    url, _ = seeded
    app = run_app(monkeypatch, url, predictor_url=predictor_stub)
    assert not app.exception
    (figure,) = [json.loads(c.proto.spec) for c in app.get("plotly_chart")
                 if "top_features" in c.proto.id]
    assert figure["layout"]["title"]["text"] == "What drives this score"
    assert figure["data"][0]["y"] == ["login.count_7d", "support_ticket.count_30d"]


@pytest.mark.timeout(300)
def test_no_database_yet_shows_how_to_start(monkeypatch, tmp_path: Path) -> None:
    app = run_app(monkeypatch, f"sqlite:///{tmp_path / 'nothing.db'}")
    assert not app.exception and not app.error
    (info,) = app.info
    assert info.value.startswith("No churn-stream data in")
    assert "make run" in info.value and not app.metric


@pytest.mark.timeout(300)
def test_empty_tables_show_empty_states(monkeypatch, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'schema_only.db'}"
    engine = storage.make_engine(url)
    storage.create_schema(engine)
    engine.dispose()
    app = run_app(monkeypatch, url)
    assert not app.exception and not app.error and not app.get("plotly_chart")
    assert metrics_of(app) == {
        "Users tracked": "0", "Events / min": "0", "Above risk threshold": "n/a",
        "High-risk users": "0", "Model": "none yet", "Live ROC-AUC": "n/a",
    }
    notes = " ".join(info.value for info in app.info)
    assert "No predictions yet" in notes and "No training runs yet" in notes


@pytest.mark.timeout(300)
def test_unreachable_database_is_an_error_message(monkeypatch) -> None:
    app = run_app(monkeypatch, "sqlite:////proc/no-such-dir/churn.db")
    assert not app.exception
    (error,) = app.error
    assert error.value.startswith("Cannot read the database at")


# --- a real browser ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_headless_chromium_renders_the_charts(tmp_path: Path) -> None:
    missing = [b for b in ("chromium", "chromedriver") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"needs Debian's chromium and chromium-driver; missing: {', '.join(missing)}")
    png, dom = tmp_path / "dashboard.png", tmp_path / "dom.html"
    # A session of its own, so that a timeout ends the script with its streamlit, chromedriver
    # and browser, not the script alone.
    script = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "screenshot_dashboard.py"), "--out", str(png),
         "--dom", str(dom), "--users", "150", "--min-charts", "10"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        output, _ = script.communicate(timeout=500)
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()
    assert script.returncode == 0, output.decode(errors="replace")[-3000:]
    page = dom.read_text()
    assert page.count('class="js-plotly-plot"') >= 10
    for label in ("Churn risk, live", "Users tracked", "Live ROC-AUC", "At-risk users"):
        assert label in page
    from PIL import Image

    with Image.open(png) as image:
        assert image.width == 1400 and image.height > 2000
        # A page of charts has thousands of colours; a blank or skeleton page a handful.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 1000
