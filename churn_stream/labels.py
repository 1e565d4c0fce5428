"""Training examples: (user, cutoff) pairs labelled with whether the user churned soon after.

A user churns when they cancel (an event of a cancellation type), when an outcome reported
to the feedback table says so, or when they go silent for longer than a set gap; a silent
churner churned when the silence began, but that is only known once the gap has passed.
At a cutoff a user is an example if they had been seen by then and their churn was not yet
known; the label says whether they churned within the horizon after it (a silence that had
already begun counts). Only cutoffs whose labels the data can settle are made.

Datasets whose outcomes come at fixed times (KDD Cup: dropout over the 10 days after each
enrollment's window) use ``feedback_cutoffs``: one example per reported outcome, at the
outcome time minus the horizon.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pandas as pd

from churn_stream.events import CANCELLATION_TYPE


@dataclass(frozen=True)
class LabelPolicy:
    """What churn means and which cutoffs make examples; defaults suit the simulator."""

    horizon_days: float = 7.0
    """An example is positive when the user churns within this many days of its cutoff."""
    inactivity_days: float | None = 10.0
    """Silence longer than this is churn; None when silence is not churn (fixed windows)."""
    cutoff_every_days: float = 1.0
    """Spacing of cutoffs, counted back from the last one whose labels are settled."""
    min_history_days: float = 7.0
    """No cutoff earlier than this after the first event in the data."""
    cancellation_types: tuple[str, ...] = (CANCELLATION_TYPE,)
    feedback_cutoffs: bool = False
    """One example per feedback row instead of a grid of cutoffs."""
    anchor_to_events: bool = True
    """Read a grid example right after the user's last event before its cutoff (within one
    spacing), as the stream scores users; silent users are read at the cutoff itself."""

    @property
    def horizon(self) -> pd.Timedelta:
        return pd.Timedelta(days=self.horizon_days)

    @property
    def settle(self) -> pd.Timedelta:
        """How long after a cutoff its labels are all known."""
        return pd.Timedelta(days=self.horizon_days + (self.inactivity_days or 0.0))


def churn_times(
    history: pd.DataFrame, feedback: pd.DataFrame | None, policy: LabelPolicy,
    until: datetime | None = None,
) -> pd.DataFrame:
    """Per user who churned: ``churned_at`` and ``known_at`` (when the data showed it)."""
    ts = utc_naive(history["ts"])
    end = _naive(until) if until is not None else ts.max()
    cancelled = ts[history["event_type"].isin(policy.cancellation_types)]
    cancel = cancelled.groupby(history.loc[cancelled.index, "user_id"]).min()
    found = [pd.DataFrame({"churned_at": cancel, "known_at": cancel})]
    alive = pd.Series(dtype="datetime64[ns]")
    if feedback is not None and not feedback.empty:
        observed = utc_naive(feedback["observed_at"])
        churned = feedback["churned"].astype(bool)
        reported = observed[churned].groupby(feedback.loc[churned, "user_id"]).min()
        found.append(pd.DataFrame({"churned_at": reported, "known_at": reported}))
        alive = observed[~churned].groupby(feedback.loc[~churned, "user_id"]).max()
    if policy.inactivity_days is not None:
        found.append(_silences(history["user_id"], ts, end, alive, policy.inactivity_days))
    found = [f for f in found if not f.empty]
    if not found:
        never = pd.Series(dtype="datetime64[ns]")
        return pd.DataFrame({"churned_at": never, "known_at": never},
                            index=pd.Index([], name="user_id", dtype=object))
    first = pd.concat(found).groupby(level=0).min()
    first.index.name = "user_id"
    return first


def _silences(users: pd.Series, ts: pd.Series, end: pd.Timestamp, alive: pd.Series,
              gap_days: float) -> pd.DataFrame:
    """The first silence longer than the gap per user, unless an outcome said they were alive."""
    frame = pd.DataFrame({"user_id": users.to_numpy(), "ts": ts.to_numpy()})
    frame = frame.sort_values(["user_id", "ts"], kind="stable")
    following = frame.groupby("user_id")["ts"].shift(-1).fillna(end)
    gap = pd.Timedelta(days=gap_days)
    confirmed = alive.reindex(frame["user_id"]).to_numpy()
    silent = (following - frame["ts"] > gap).to_numpy()
    before_alive = ~pd.isna(confirmed) & (frame["ts"].to_numpy() < confirmed)
    starts = frame.loc[silent & ~before_alive].groupby("user_id")["ts"].min()
    return pd.DataFrame({"churned_at": starts, "known_at": starts + gap})


def cutoff_grid(history: pd.DataFrame, policy: LabelPolicy,
                until: datetime | None = None) -> list[pd.Timestamp]:
    """Cutoffs every ``cutoff_every_days``, latest first, whose labels ``history`` settles."""
    ts = utc_naive(history["ts"])
    end = _naive(until) if until is not None else ts.max()
    last = end - policy.settle
    first = ts.min() + pd.Timedelta(days=policy.min_history_days)
    step = pd.Timedelta(days=policy.cutoff_every_days)
    count = int(np.floor((last - first) / step)) + 1 if last >= first else 0
    return [(last - k * step).tz_localize("UTC") for k in range(count)]


def label_examples(
    history: pd.DataFrame, feedback: pd.DataFrame | None, policy: LabelPolicy,
    until: datetime | None = None,
) -> pd.DataFrame:
    """Labelled examples sorted by cutoff: ``user_id``, ``cutoff`` (the moment the features
    are read), ``batch_at`` (the grid cutoff, at or after it) and ``churned`` (0/1)."""
    if history.empty:
        return _empty_examples()
    if policy.feedback_cutoffs:
        return _feedback_examples(history, feedback, policy)
    cutoffs = cutoff_grid(history, policy, until)
    if not cutoffs:
        return _empty_examples()
    first_seen = utc_naive(history["ts"]).groupby(history["user_id"]).min()
    churn = churn_times(history, feedback, policy, until).reindex(first_seen.index)
    n_users, n_cutoffs = len(first_seen), len(cutoffs)
    cutoff = np.tile(pd.DatetimeIndex(cutoffs).tz_localize(None).to_numpy(), n_users)
    seen = np.repeat(first_seen.to_numpy(), n_cutoffs)
    churned_at = np.repeat(churn["churned_at"].to_numpy(), n_cutoffs)
    known_at = np.repeat(churn["known_at"].to_numpy(), n_cutoffs)
    undecided = pd.isna(known_at) | (known_at > cutoff)
    keep = (seen <= cutoff) & undecided
    users = np.repeat(first_seen.index.to_numpy(), n_cutoffs)[keep]
    as_of = cutoff[keep]
    if policy.anchor_to_events:
        as_of = _last_event_before(history, users, as_of, policy.cutoff_every_days)
    churned_at = churned_at[keep]
    label = ~pd.isna(churned_at) & (churned_at <= as_of + policy.horizon.to_timedelta64())
    frame = pd.DataFrame({
        "user_id": users,
        "cutoff": pd.to_datetime(as_of, utc=True),
        "batch_at": pd.to_datetime(cutoff[keep], utc=True),
        "churned": label.astype(np.int8),
    })
    return frame.sort_values(["cutoff", "user_id"], kind="stable").reset_index(drop=True)


def _last_event_before(history: pd.DataFrame, users: np.ndarray, cutoff: np.ndarray,
                       within_days: float) -> np.ndarray:
    """Each user's last event time at or before ``cutoff`` if within the window, else cutoff.

    The predictor scores a user right after one of their events; examples read at those
    moments look like the rows it serves. Users silent over the window keep the cutoff.
    """
    events = pd.DataFrame({"user_id": history["user_id"].to_numpy(),
                           "ts": utc_naive(history["ts"]).to_numpy()}).sort_values("ts")
    queries = pd.DataFrame({"user_id": users, "cutoff": cutoff, "row": np.arange(len(users))})
    matched = pd.merge_asof(queries.sort_values("cutoff"), events, left_on="cutoff",
                            right_on="ts", by="user_id", direction="backward")
    recent = (matched["ts"] > matched["cutoff"] - pd.Timedelta(days=within_days)).to_numpy()
    moment = np.where(recent, matched["ts"].to_numpy(), matched["cutoff"].to_numpy())
    anchored = np.empty_like(cutoff)
    anchored[matched["row"].to_numpy()] = moment
    return anchored


def _feedback_examples(history: pd.DataFrame, feedback: pd.DataFrame | None,
                       policy: LabelPolicy) -> pd.DataFrame:
    if feedback is None or feedback.empty:
        return _empty_examples()
    first_seen = utc_naive(history["ts"]).groupby(history["user_id"]).min()
    cutoff = utc_naive(feedback["observed_at"]) - policy.horizon
    seen = first_seen.reindex(feedback["user_id"]).to_numpy()
    keep = ~pd.isna(seen) & (seen <= cutoff.to_numpy())
    frame = pd.DataFrame({
        "user_id": feedback["user_id"].to_numpy()[keep],
        "cutoff": cutoff.to_numpy()[keep],
        "churned": feedback["churned"].astype(np.int8).to_numpy()[keep],
    })
    frame["cutoff"] = pd.to_datetime(frame["cutoff"], utc=True)
    return frame.sort_values(["cutoff", "user_id"], kind="stable").reset_index(drop=True)


def utc_naive(values: pd.Series) -> pd.Series:
    """Times as naive UTC ``datetime64[ns]`` (naive input is already UTC, as in the database)."""
    return pd.to_datetime(values, utc=True).dt.tz_localize(None).astype("datetime64[ns]")


def _naive(moment: datetime) -> pd.Timestamp:
    stamp = pd.Timestamp(moment)
    return stamp.tz_convert("UTC").tz_localize(None) if stamp.tzinfo else stamp


def _empty_examples() -> pd.DataFrame:
    return pd.DataFrame({"user_id": pd.Series(dtype=object),
                         "cutoff": pd.Series(dtype="datetime64[ns, UTC]"),
                         "churned": pd.Series(dtype=np.int8)})


def describe(examples: pd.DataFrame) -> str:
    """One line for logs: how many examples, churners and cutoffs."""
    if examples.empty:
        return "no labelled examples"
    span = examples["cutoff"].max() - examples["cutoff"].min()
    return (f"{len(examples)} examples, {int(examples['churned'].sum())} churned, "
            f"{examples['cutoff'].nunique()} cutoffs over {span / timedelta(days=1):.1f} days")
