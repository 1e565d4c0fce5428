"""Plotly figures of the dashboard: pure functions of the DataFrames in ``dashboard.queries``.

Nothing here touches the database or Streamlit, so every figure can be built and inspected
in a test. Times are aware UTC and shown as UTC.
"""

from collections.abc import Sequence
from datetime import datetime

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

HEIGHT_PX = 330
MODEL_NAMES = {"score": "blend", "score_rf": "forest", "score_xgb": "xgboost",
               "score_seq": "LSTM-GRU"}
RISK_COLOR = "#d62728"
FEW_POINTS = 30
"""Fewer points than this in a line chart get markers, so a single point still shows."""
PSI_FLOOR = 1e-3
"""Smallest PSI drawn on a log axis; a window identical to the reference scores 0."""


def _layout(figure: go.Figure, title: str, height_px: int = HEIGHT_PX) -> go.Figure:
    figure.update_layout(
        title={"text": title, "x": 0.0, "font": {"size": 15}},
        height=height_px,
        margin={"l": 10, "r": 10, "t": 50, "b": 10},
        template="plotly_white",
        legend={"orientation": "h", "y": -0.25, "x": 0.0, "title": None},
    )
    return figure


def risk_histogram(scores: pd.DataFrame, threshold: float) -> go.Figure:
    """Distribution of each user's latest score, with the risk threshold marked."""
    figure = px.histogram(scores, x="score", nbins=40, range_x=(0, 1),
                          labels={"score": "churn risk (latest score per user)"})
    figure.update_traces(marker_color="#4c78a8")
    figure.add_vline(x=threshold, line_dash="dash", line_color=RISK_COLOR,
                     annotation_text=f"threshold {threshold:.2f}",
                     annotation_position="top right")
    figure.update_yaxes(title="users")
    return _layout(figure, "Churn-risk distribution")


def activity_by_type(activity: pd.DataFrame) -> go.Figure:
    """Events per time bucket, stacked by event type."""
    figure = px.bar(activity, x="bucket", y="events", color="event_type",
                    labels={"bucket": "", "events": "events per bucket"})
    figure.update_layout(barmode="stack", bargap=0.05)
    return _layout(figure, "Activity by event type (event time, UTC)")


def risk_over_time(risk: pd.DataFrame) -> go.Figure:
    """Mean blended score per bucket, with each model's mean behind it."""
    figure = go.Figure()
    for column, name in MODEL_NAMES.items():
        if column not in risk or risk[column].isna().all():
            continue
        blend = column == "score"
        figure.add_trace(go.Scatter(
            x=risk["bucket"], y=risk[column], name=name,
            mode="lines" if len(risk) > FEW_POINTS else "lines+markers",
            line={"width": 3 if blend else 1.2, "dash": None if blend else "dot"},
        ))
    figure.update_yaxes(title="mean predicted risk", rangemode="tozero")
    return _layout(figure, "Mean predicted risk over time (UTC)")


def psi_by_feature(
    psi: pd.DataFrame, retrains: pd.DataFrame, top_n: int = 8
) -> go.Figure:
    """PSI over time of the ``top_n`` most drifted features, threshold and retrains marked."""
    worst = psi.groupby("feature")["score"].max().nlargest(top_n).index
    shown = psi[psi["feature"].isin(worst)].sort_values("evaluated_at")
    # A PSI far above its threshold (a feature the live window barely shares with the
    # reference) would flatten every other line: switch to a log axis then.
    log_axis = bool(shown["score"].max() > 10 * psi["threshold"].max())
    if log_axis:
        shown = shown.assign(score=shown["score"].clip(lower=PSI_FLOOR))
    figure = px.line(shown, x="evaluated_at", y="score", color="feature", log_y=log_axis,
                     labels={"evaluated_at": "", "score": "PSI (log axis)" if log_axis else "PSI"})
    for threshold in sorted(psi["threshold"].dropna().unique()):
        figure.add_hline(y=float(threshold), line_dash="dash", line_color=RISK_COLOR,
                         annotation_text=f"threshold {threshold:g}",
                         annotation_position="top left")
    _mark_retrains(figure, retrains, shown["evaluated_at"])
    return _layout(figure, "Feature drift (PSI) and retrains (UTC)", height_px=380)


def _mark_retrains(figure: go.Figure, retrains: pd.DataFrame, times: pd.Series) -> None:
    if retrains.empty or times.empty:
        return
    start, end = times.min(), times.max()
    for run in retrains.sort_values("started_at").itertuples():
        if not start <= run.started_at <= end:
            continue
        color = "#2ca02c" if run.promoted else "#7f7f7f"
        # add_vline's annotation cannot place text on a datetime axis; a separate
        # annotation can.
        figure.add_vline(x=run.started_at, line_dash="dot", line_color=color)
        verdict = "promoted" if run.promoted else "kept old"
        figure.add_annotation(x=run.started_at, y=1.0, yref="paper", showarrow=False,
                              text=f"retrain {run.model_version} ({run.reason}, {verdict})",
                              font={"size": 11, "color": color}, xanchor="left", yanchor="top")


def model_metrics(runs: pd.DataFrame, live: pd.DataFrame) -> go.Figure:
    """Validation ROC-AUC of each model per version, beside the latest live ROC-AUC."""
    rows = []
    for record in runs.sort_values("started_at").to_dict("records"):
        for model in ("rf", "xgb", "seq", "blend"):
            value = record.get(f"{model} roc_auc")
            if value is not None and pd.notna(value):
                rows.append({"version": record["model_version"],
                             "series": f"{model} (validation)", "roc_auc": value})
    if not live.empty:
        latest = live.sort_values("computed_at").groupby("model_version").last()
        for version, row in latest.iterrows():
            if pd.notna(row["roc_auc"]):
                rows.append({"version": version, "series": "blend (live)",
                             "roc_auc": row["roc_auc"]})
    frame = pd.DataFrame(rows, columns=["version", "series", "roc_auc"])
    figure = px.bar(frame, x="version", y="roc_auc", color="series", barmode="group",
                    labels={"version": "", "roc_auc": "ROC-AUC"})
    figure.update_yaxes(range=(0.5, 1.0))
    return _layout(figure, "ROC-AUC per model version: validation and live")


def live_metrics(live: pd.DataFrame) -> go.Figure:
    """Live ROC-AUC from feedback over time, one line per model version."""
    ordered = live.sort_values("computed_at")
    figure = px.line(ordered, x="computed_at", y="roc_auc", color="model_version",
                     markers=True, labels={"computed_at": "", "roc_auc": "live ROC-AUC",
                                           "model_version": "version"})
    return _layout(figure, "Live ROC-AUC from reported outcomes (UTC)")


def latency_histogram(latencies: pd.DataFrame) -> go.Figure:
    """Distribution of per-prediction latency with its median and 95th/99th percentiles."""
    figure = px.histogram(latencies, x="latency_ms", nbins=60,
                          labels={"latency_ms": "event sent to score written (ms)"})
    figure.update_traces(marker_color="#72b7b2")
    marks = []
    for quantile, dash in ((0.5, "solid"), (0.95, "dash"), (0.99, "dot")):
        value = float(latencies["latency_ms"].quantile(quantile))
        figure.add_vline(x=value, line_dash=dash, line_color="#444")
        marks.append(f"p{round(quantile * 100)} {duration_text(value)}")
    figure.update_yaxes(title="predictions")
    return _layout(figure, f"Prediction latency: {', '.join(marks)}")


def latency_over_time(latencies: pd.DataFrame, buckets: int = 60) -> go.Figure:
    """Median and 95th percentile of latency per time bucket: a backlog shows as a hump."""
    span = latencies["scored_at"].max() - latencies["scored_at"].min()
    width = max(span / buckets, pd.Timedelta(seconds=1))
    grouped = latencies.set_index("scored_at")["latency_ms"].resample(width)
    frame = pd.DataFrame({"p50": grouped.median(), "p95": grouped.quantile(0.95)}).dropna()
    figure = go.Figure()
    for column, dash in (("p50", None), ("p95", "dot")):
        figure.add_trace(go.Scatter(x=frame.index, y=frame[column], name=column,
                                    mode="lines" if len(frame) > FEW_POINTS else "lines+markers",
                                    line={"dash": dash}))
    figure.update_yaxes(title="latency (ms)", rangemode="tozero")
    return _layout(figure, "Prediction latency over time (UTC)")


def duration_text(ms: float) -> str:
    """``4.2 ms`` below a second, ``12.5 s`` above.

    >>> duration_text(4.21), duration_text(263775.0)
    ('4.2 ms', '263.8 s')
    """
    return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def user_timeline(events: pd.DataFrame) -> go.Figure:
    """One user's events on a time axis, one row per event type."""
    figure = px.scatter(events, x="ts", y="event_type", color="event_type",
                        labels={"ts": "", "event_type": ""})
    figure.update_traces(marker={"size": 11, "symbol": "line-ns-open", "line": {"width": 2}})
    # A lone event would get a millisecond-wide axis; show at least a day around it.
    end = events["ts"].max() + pd.Timedelta(hours=2)
    figure.update_xaxes(range=(min(events["ts"].min(), end - pd.Timedelta(days=1)), end),
                        nticks=4, tickangle=0)
    figure.update_layout(showlegend=False)
    return _layout(figure, "Activity timeline (UTC)", height_px=300)


def user_score_history(scores: pd.DataFrame, threshold: float) -> go.Figure:
    """One user's scores over time, blended and per model, against the threshold."""
    figure = risk_over_time(scores.rename(columns={"scored_at": "bucket"}))
    figure.add_hline(y=threshold, line_dash="dash", line_color=RISK_COLOR)
    figure.update_yaxes(title="predicted risk", range=(0, 1))
    figure.update_xaxes(nticks=4, tickangle=0)
    return _layout(figure, "Score history (UTC)", height_px=300)


def top_features(features: Sequence[tuple[str, float]]) -> go.Figure:
    """The features that push this user's score, largest contribution on top."""
    frame = pd.DataFrame(features, columns=["feature", "contribution"])
    frame = frame.iloc[frame["contribution"].abs().argsort()]
    colors = [RISK_COLOR if value > 0 else "#4c78a8" for value in frame["contribution"]]
    figure = go.Figure(go.Bar(x=frame["contribution"], y=frame["feature"], orientation="h",
                              marker_color=colors))
    figure.update_xaxes(title="contribution to the score")
    return _layout(figure, "What drives this score", height_px=300)


def retrain_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """The columns of ``model_runs`` that mark retrains on a time axis."""
    columns = ["started_at", "model_version", "reason", "promoted"]
    return runs[columns] if not runs.empty else pd.DataFrame(columns=columns)


def age_text(since: datetime, now: datetime) -> str:
    """A short human age such as ``42 s``, ``17 min``, ``5.2 h`` or ``3.1 d``.

    >>> from datetime import timedelta
    >>> t = datetime(2024, 1, 1)
    >>> age_text(t, t + timedelta(minutes=90))
    '1.5 h'
    """
    seconds = max((now - since).total_seconds(), 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86_400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} d"
