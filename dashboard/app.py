"""The live churn dashboard: ``streamlit run dashboard/app.py``.

It reads the same database as the services (``DATABASE_URL``, the ``MSSQL_*`` parts, or the
local SQLite file) through one cached engine. Each section is a fragment that reruns by
itself every few seconds, so the page never reloads; query results are cached for a few
seconds, so several open browsers cost the database one query per refresh.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import sqlalchemy as sa
import streamlit as st

from churn_stream import storage
from churn_stream.settings import Settings, get_settings, mask_url
from dashboard import charts, queries
from dashboard.predictor_client import fetch_top_features

log = logging.getLogger(__name__)

CACHE_TTL_S = 4.0
# Whole-table counts and the bucketed trends: each reads up to queries.MAX_ROWS rows, and
# their buckets are a minute or wider, so half a minute of staleness costs nothing.
SLOW_CACHE_TTL_S = 30.0
WINDOW_CHOICES_H = (1, 6, 24, 72, 168, 720)
AT_RISK_ROWS = 200
# Plotly's toolbar covers chart titles; dragging still zooms and a double click resets.
# (A comment, not a docstring: Streamlit would print a bare string on the page.)
PLOT_CONFIG = {"displayModeBar": False}
SCORE_LABELS = {"score": "risk", "score_rf": "forest", "score_xgb": "xgboost",
                "score_seq": "LSTM-GRU"}


@dataclass(frozen=True)
class Controls:
    """What the sidebar sets: the time window, the refresh period and the risk threshold."""

    window_h: float
    refresh_s: float
    threshold: float
    only_at_risk: bool


@st.cache_resource(show_spinner=False)
def engine_for(url: str) -> sa.Engine:
    """One engine (and connection pool) per database URL for the whole server."""
    return storage.make_engine(url)


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False)
def load(url: str, query: str, *args: Any) -> Any:
    """The result of ``dashboard.queries.<query>(conn, *args)``, cached for a few seconds."""
    with engine_for(url).connect() as conn:
        return getattr(queries, query)(conn, *args)


@st.cache_data(ttl=SLOW_CACHE_TTL_S, show_spinner=False)
def load_slowly(url: str, query: str, *args: Any) -> Any:
    """Like ``load``, for queries whose answer may be half a minute old."""
    with engine_for(url).connect() as conn:
        return getattr(queries, query)(conn, *args)


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False)
def load_missing_tables(url: str) -> list[str]:
    """The dashboard's tables the database lacks, cached like the queries."""
    return queries.missing_tables(engine_for(url))


def sidebar(settings: Settings) -> Controls:
    """The controls, and where the data comes from."""
    st.sidebar.header("View")
    window_h = st.sidebar.select_slider("Time window (hours)", WINDOW_CHOICES_H, value=24,
                                        key="window_h")
    threshold = st.sidebar.slider("Risk threshold", 0.05, 0.95, settings.risk_threshold, 0.05,
                                  key="threshold")
    only_at_risk = st.sidebar.checkbox("At-risk table: only users above the threshold", True,
                                       key="only_at_risk")
    refresh_s = st.sidebar.slider("Refresh every (s)", 2, 60, 5, key="refresh_s")
    st.sidebar.caption(f"Database: `{mask_url(settings.resolved_database_url())}`")
    st.sidebar.caption(f"Predictor: `{settings.predictor_url}`")
    return Controls(float(window_h), float(refresh_s), float(threshold), only_at_risk)


def main() -> None:
    """Lay out the page; the live sections refresh on their own."""
    st.set_page_config(page_title="Churn risk, live", page_icon=":material/monitoring:",
                       layout="wide")
    settings = get_settings()
    url = settings.resolved_database_url()
    controls = sidebar(settings)
    st.title("Churn risk, live")
    try:
        missing = load_missing_tables(url)
    except (sa.exc.SQLAlchemyError, OSError) as error:
        st.error(f"Cannot read the database at `{mask_url(url)}`: {_reason(error)}")
        return
    if missing:
        st.fragment(run_every=controls.refresh_s)(waiting_for_tables)(url, missing)
        return
    every = controls.refresh_s
    st.fragment(run_every=every)(headline_section)(url, controls)
    st.fragment(run_every=every)(risk_section)(url, controls)
    st.fragment(run_every=every)(drilldown_section)(url, controls, settings.predictor_url)
    st.fragment(run_every=every)(trends_section)(url, controls)
    st.fragment(run_every=every)(drift_section)(url, controls)
    st.fragment(run_every=every)(models_section)(url)


def _reason(error: Exception) -> str:
    original = getattr(error, "orig", None)
    return str(original or error).splitlines()[0]


def waiting_for_tables(url: str, missing: list[str]) -> None:
    """The empty state: what to start, then a full rerun as soon as the tables exist."""
    load_missing_tables.clear()
    with guarded("Database"):
        if not queries.missing_tables(engine_for(url)):
            st.rerun(scope="app")
    st.info(
        f"No churn-stream data in `{mask_url(url)}` yet (missing tables: "
        f"{', '.join(missing)}).\n\nStart the stack with `make run` (or `docker compose up "
        "--build`). The consumer creates the tables, the predictor scores users once it has "
        "trained, and this page fills in by itself."
    )


@contextmanager
def guarded(section: str) -> Iterator[None]:
    """Show a database error in a section as a warning instead of a stack trace."""
    try:
        yield
    except sa.exc.SQLAlchemyError as error:
        log.warning("dashboard section %s failed: %s", section, error)
        st.warning(f"{section}: the database did not answer ({_reason(error)}); "
                   "retrying at the next refresh.")


def headline_section(url: str, controls: Controls) -> None:
    """Users tracked, events per minute, share and count above threshold, model, live AUC."""
    now = datetime.now(UTC)
    with guarded("Headline"):
        activity = load(url, "activity_summary")
        users = load_slowly(url, "users_tracked")
        scores = load(url, "latest_scores", controls.window_h)
        model = load(url, "promoted_model")
        live = load(url, "live_performance", 200)
        columns = st.columns(6)
        _activity_metrics(columns[:2], users, activity, now)
        _risk_metrics(columns[2:4], scores, controls.threshold)
        _model_metrics(columns[4:], model, live, now)
        st.caption(f"Updated {now:%H:%M:%S} UTC, every {controls.refresh_s:.0f} s; scores "
                   f"from the last {controls.window_h:g} h of predictions. Charts read at most "
                   f"the newest {queries.MAX_ROWS:,} rows of a table; users tracked and "
                   "the trends below are recomputed every 30 s.")


def _activity_metrics(columns: list, users: int, activity: dict[str, Any], now: datetime) -> None:
    columns[0].metric("Users tracked", f"{users:,}",
                      help="Distinct users with at least one event stored.")
    last = activity["last_ingested_at"]
    idle = f"last event {charts.age_text(storage.from_db_time(last), now)} ago" if last else None
    columns[1].metric("Events / min", f"{activity['events_per_min']:,.0f}", delta=idle,
                      delta_color="off", delta_arrow="off",
                      help="Events stored in the last 5 minutes (wall clock), per minute.")


def _risk_metrics(columns: list, scores: pd.DataFrame, threshold: float) -> None:
    high = int((scores["score"] >= threshold).sum())
    share = f"{high / len(scores):.1%}" if len(scores) else "n/a"
    columns[0].metric("Above risk threshold", share, delta=f"of {len(scores):,} scored users",
                      delta_color="off", delta_arrow="off",
                      help=f"Share of users whose latest score is at least {threshold:.2f}.")
    columns[1].metric("High-risk users", f"{high:,}",
                      help=f"Users whose latest score is at least {threshold:.2f}.")


def _model_metrics(columns: list, model: dict | None, live: pd.DataFrame, now: datetime) -> None:
    if model is None:
        columns[0].metric("Model", "none yet", help="No promoted training run yet.")
    else:
        trained = storage.from_db_time(model["started_at"]) + pd.Timedelta(
            seconds=model["seconds"])
        columns[0].metric("Model", model["model_version"],
                          delta=f"{charts.age_text(trained, now)} old, {model['reason']}",
                          delta_color="off", delta_arrow="off",
                          help="The newest promoted run in model_runs.")
    version = model["model_version"] if model else None
    served = live[live["model_version"] == version] if version else live
    measured = served.dropna(subset=["roc_auc"]) if not served.empty else served
    if measured.empty:
        columns[1].metric("Live ROC-AUC", "n/a", help="No reported outcomes for this model yet.")
        return
    latest = measured.iloc[0]
    columns[1].metric("Live ROC-AUC", f"{latest['roc_auc']:.3f}",
                      delta=f"{int(latest['n_labelled']):,} outcomes", delta_color="off",
                      delta_arrow="off", help="From model_performance, the feedback loop.")


def risk_section(url: str, controls: Controls) -> None:
    """The score distribution and the at-risk users table."""
    with guarded("Churn risk"):
        scores = load(url, "latest_scores", controls.window_h)
        if scores.empty:
            st.info("No predictions yet. The predictor writes them once it has trained on "
                    "enough labelled history; watch its log for the first model version.")
            return
        left, right = st.columns([2, 3])
        show(left, charts.risk_histogram(scores, controls.threshold), "risk_hist")
        shown = scores[scores["score"] >= controls.threshold] if controls.only_at_risk else scores
        right.subheader(f"At-risk users ({len(shown):,})")
        rows = load(url, "prediction_rows", tuple(int(i) for i in shown["id"].head(AT_RISK_ROWS)))
        right.dataframe(at_risk_table(rows), hide_index=True, height=300,
                        column_config=_score_columns(), key="at_risk_table")


def at_risk_table(scores: pd.DataFrame) -> pd.DataFrame:
    """The at-risk table's columns, in reading order."""
    columns = ["user_id", *SCORE_LABELS, "model_version", "scored_at"]
    return scores[columns].rename(columns=SCORE_LABELS)


def _score_columns() -> dict[str, Any]:
    config: dict[str, Any] = {
        name: st.column_config.NumberColumn(name, format="%.3f") for name in SCORE_LABELS.values()
    }
    config["risk"] = st.column_config.ProgressColumn("risk", min_value=0.0, max_value=1.0,
                                                     format="%.3f")
    config["scored_at"] = st.column_config.DatetimeColumn("scored at (UTC)",
                                                          format="YYYY-MM-DD HH:mm:ss")
    return config


def drilldown_section(url: str, controls: Controls, predictor_url: str) -> None:
    """One user: activity timeline, score history, and what drives the score."""
    with guarded("User drill-down"):
        scores = load(url, "latest_scores", controls.window_h)
        if scores.empty:
            return
        st.subheader("User drill-down")
        pick, lookup = st.columns([3, 2])
        chosen = pick.selectbox("User, riskiest first", scores["user_id"].head(AT_RISK_ROWS),
                                key="drilldown_user")
        typed = lookup.text_input("or look up any user id", key="drilldown_lookup").strip()
        user_id = typed or chosen
        timeline, history, drivers = st.columns(3)
        events = load(url, "user_events", user_id)
        history_frame = load(url, "user_scores", user_id)
        _show_or_note(timeline, events, lambda: charts.user_timeline(events),
                      f"No events stored for user {user_id}.", "user_timeline")
        _show_or_note(history, history_frame,
                      lambda: charts.user_score_history(history_frame, controls.threshold),
                      f"No predictions stored for user {user_id}.", "user_scores")
        _top_features(drivers, predictor_url, user_id)


def _show_or_note(column: Any, frame: pd.DataFrame, figure: Any, note: str, key: str) -> None:
    if frame.empty:
        column.info(note)
    else:
        show(column, figure(), key)


def show(container: Any, figure: Any, key: str) -> None:
    """A Plotly figure at the container's width."""
    container.plotly_chart(figure, key=key, config=PLOT_CONFIG)


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False)
def _cached_top_features(predictor_url: str, user_id: str) -> Any:
    return fetch_top_features(predictor_url, user_id)


def _top_features(column: Any, predictor_url: str, user_id: str) -> None:
    answer = _cached_top_features(predictor_url, user_id)
    if answer.features:
        show(column, charts.top_features(answer.features), "top_features")
    else:
        column.info(f"Features driving the score are unavailable: {answer.unavailable_reason}.")


def trends_section(url: str, controls: Controls) -> None:
    """Activity by event type and mean predicted risk over the window."""
    with guarded("Trends"):
        activity = load_slowly(url, "activity_by_type", controls.window_h)
        risk = load_slowly(url, "risk_over_time", controls.window_h)
        left, right = st.columns(2)
        _show_or_note(left, activity, lambda: charts.activity_by_type(activity),
                      "No activity stored yet: is the producer running?", "activity")
        _show_or_note(right, risk, lambda: charts.risk_over_time(risk),
                      "No predictions yet.", "risk_over_time")


def drift_section(url: str, controls: Controls) -> None:
    """PSI per feature against its threshold, with retrains on the same time axis."""
    with guarded("Drift"):
        psi = load_slowly(url, "psi_history", controls.window_h)
        if psi.empty:
            st.info("No drift reports in this window yet: the predictor writes one per "
                    "window of live traffic.")
            return
        runs = charts.retrain_frame(load(url, "model_runs_frame"))
        show(st, charts.psi_by_feature(psi, runs), "psi")
        latest = psi.sort_values("evaluated_at").groupby("feature").last()
        drifted = latest[latest["score"] > latest["threshold"]]
        if drifted.empty:
            st.caption("No feature is above its PSI threshold in the latest evaluation.")
        else:
            st.caption("Above threshold now: " + ", ".join(
                f"{name} ({row.score:.2f})" for name, row in drifted.iterrows()))


def models_section(url: str) -> None:
    """Each model version's validation metrics beside its live metrics; scoring latency."""
    with guarded("Models"):
        runs = load(url, "model_runs_frame")
        live = load(url, "live_performance")
        latencies = load_slowly(url, "recent_latencies")
        if runs.empty:
            st.info("No training runs yet: the predictor records each one in model_runs.")
            return
        left, right = st.columns(2)
        show(left, charts.model_metrics(runs, live), "model_metrics")
        _show_or_note(right, live, lambda: charts.live_metrics(live),
                      "No live metrics yet: they need reported outcomes (feedback).",
                      "live_metrics")
        left, right = st.columns(2)
        _show_or_note(left, latencies, lambda: charts.latency_histogram(latencies),
                      "No prediction latencies yet.", "latency")
        _show_or_note(right, latencies, lambda: charts.latency_over_time(latencies),
                      "No prediction latencies yet.", "latency_over_time")
        st.markdown("**Training runs**")
        st.dataframe(runs_table(runs), hide_index=True, key="runs_table")


def runs_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Training runs with the metrics a reader compares first."""
    wanted = ["model_version", "reason", "started_at", "rows", "seconds", "promoted",
              "blend roc_auc", "blend pr_auc", "blend brier", "blend log_loss", "error"]
    return runs[[c for c in wanted if c in runs.columns]]


main()
