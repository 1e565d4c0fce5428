"""Splitting labelled examples into fit, validation and holdout roles.

The default split is by time and by user: the holdout is later than every outcome the models
learn from, and its users are never seen in training. ``split_users`` is for a snapshot of
every user at one moment, where time cannot split.
"""

from collections.abc import Callable

import numpy as np
import pandas as pd

from churn_stream.errors import NotEnoughData
from churn_stream.labels import LabelPolicy

FIT, VALIDATION, HOLDOUT, UNUSED = 0, 1, 2, -1
Split = Callable[[pd.DataFrame, LabelPolicy, float, int], np.ndarray]
"""``(queries, policy, holdout_share, seed) -> role per example``."""
VALIDATION_SHARE = 0.2
MIN_PER_CLASS = 10


def split_roles(queries: pd.DataFrame, policy: LabelPolicy, holdout_share: float,
                seed: int) -> np.ndarray:
    """Role of each example: fit, validation, holdout, or unused (its label overlaps the holdout).

    Holdout: the examples of the latest ``holdout_share`` (by count) of held-out users,
    who are every user seen only then and a random ``holdout_share`` of those seen both
    before and then. Fit and validation: the other users' examples whose labels were
    settled by the time the holdout starts; validation is a random share of those users.
    """
    if not 0 < holdout_share < 1:
        raise ValueError("holdout_share must be between 0 and 1")
    roles = np.full(len(queries), UNUSED)
    if queries.empty:
        return roles
    cutoff = queries["cutoff"]
    ordered = cutoff.sort_values(kind="stable")
    start = ordered.iloc[min(len(ordered) - 1, int(np.floor((1 - holdout_share) * len(ordered))))]
    late = (cutoff >= start).to_numpy()
    early = (cutoff + policy.horizon <= start).to_numpy()
    user = queries["user_id"].to_numpy()
    seen_early, seen_late = set(user[early]), set(user[late])
    rng = np.random.default_rng(seed)
    churners = set(user[queries["churned"].to_numpy() == 1])
    spanning = sorted(seen_early & seen_late)
    held = set(_some(rng, spanning, holdout_share, churners)) | (seen_late - seen_early)
    learning = sorted(seen_early - held)
    validating = _some(rng, learning, VALIDATION_SHARE, churners)
    # pandas' hashed isin: numpy's sorts the object arrays, 5 s for 166,000 examples.
    users = queries["user_id"]
    in_held = users.isin(held).to_numpy()
    roles[in_held & late] = HOLDOUT
    roles[~in_held & early] = FIT
    roles[~in_held & early & users.isin(validating).to_numpy()] = VALIDATION
    return roles


def split_users(queries: pd.DataFrame, policy: LabelPolicy, holdout_share: float,
                seed: int) -> np.ndarray:
    """Roles by user alone: a random ``holdout_share`` of users is the holdout, a share of
    the rest validates. For one snapshot of every user, where time cannot split."""
    del policy  # every example is settled by construction in a snapshot
    rng = np.random.default_rng(seed)
    user = queries["user_id"].to_numpy()
    churners = set(user[queries["churned"].to_numpy() == 1])
    users = sorted(set(user))
    held = _some(rng, users, holdout_share, churners)
    validating = _some(rng, sorted(set(users) - set(held)), VALIDATION_SHARE, churners)
    return np.select([np.isin(user, held), np.isin(user, validating)], [HOLDOUT, VALIDATION],
                     FIT)


def _some(rng: np.random.Generator, users: list[str], share: float,
          churners: set[str]) -> list[str]:
    """A seeded ``share`` of ``users``, taken alike from churners and the others so that
    small samples still hold both outcomes."""
    chosen: list[str] = []
    for group in ([u for u in users if u in churners], [u for u in users if u not in churners]):
        if group:
            chosen.extend(rng.permutation(group)[:max(1, round(share * len(group)))])
    return chosen


def cap(queries: pd.DataFrame, max_examples: int, seed: int) -> pd.DataFrame:
    """At most ``max_examples`` fit and a quarter of that validation examples, seeded samples;
    the order by cutoff stays."""
    rng = np.random.default_rng(seed)
    dropped = []
    for role, limit in ((FIT, max_examples), (VALIDATION, max(max_examples // 4, 1))):
        rows = np.flatnonzero(queries["role"].to_numpy() == role)
        if len(rows) > limit:
            dropped.append(rng.choice(rows, len(rows) - limit, replace=False))
    if dropped:
        queries = queries.drop(queries.index[np.concatenate(dropped)])
    return queries.reset_index(drop=True)


def check_classes(queries: pd.DataFrame, policy: LabelPolicy) -> None:
    """Refuse to train on too few churners or non-churners in any part of the split."""
    for role, name in ((FIT, "training"), (VALIDATION, "validation"), (HOLDOUT, "holdout")):
        labels = queries.loc[queries["role"] == role, "churned"]
        churned = int(labels.sum())
        if min(churned, len(labels) - churned) < MIN_PER_CLASS:
            raise NotEnoughData(
                f"{name} examples have {churned} churned and {len(labels) - churned} not; "
                f"each needs at least {MIN_PER_CLASS}. Labels are settled "
                f"{policy.settle.days} days after a cutoff, so more history (or more "
                f"reported outcomes) is needed")


