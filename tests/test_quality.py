"""Model quality on small seeded subsets of the real datasets, and the fold machinery.

Thresholds sit well below what the models reach on these subsets (see bench/quality.md) and
well above what a model without signal gets: the shuffled-label run proves the gap.
"""

import numpy as np
import pytest

from churn_stream import quality
from churn_stream.replay.frames import training_frames
from churn_stream.replay.kdd2015 import Kdd2015Source
from churn_stream.replay.registry import DATA_ROOT, open_replay
from churn_stream.splits import FIT, HOLDOUT, VALIDATION

KDD_DIR = DATA_ROOT / "kddcup2015"
TELCO_FILE = DATA_ROOT / "ibm-telco" / "Telco-Customer-Churn.csv"
KDD_COURSES = ("761", "769", "973")
"""The three smallest courses (2,503 enrollments); a seeded 600 of them are used."""
KDD_USERS, TELCO_USERS, SEED = 600, 1500, 0
MIN_AUC = 0.78
"""Blend ROC-AUC the subsets must clear; chance is 0.5, the full-data figures ~0.87."""
MAX_SHUFFLED_AUC = 0.65

needs_kdd = pytest.mark.skipif(not KDD_DIR.is_dir(),
                               reason=f"KDD Cup 2015 data not found in {KDD_DIR}")
needs_telco = pytest.mark.skipif(not TELCO_FILE.is_file(),
                                 reason=f"Telco data not found at {TELCO_FILE}")


@pytest.fixture(scope="module")
def kdd_frames():
    source = Kdd2015Source(KDD_DIR, courses=KDD_COURSES)
    source.limit_users(KDD_USERS, SEED)
    return training_frames(source)


@pytest.fixture(scope="module")
def telco_frames():
    return training_frames(open_replay("telco", limit_users=TELCO_USERS, seed=SEED))


def _check_sane(report: quality.QualityReport) -> None:
    base_brier = report.churn_share * (1 - report.churn_share)
    for fold in report.folds:
        assert set(fold.metrics) == set(quality.SCORED)
        assert sum(fold.weights.values()) == pytest.approx(1.0)
        assert fold.metrics["blend"]["brier"] < base_brier
        assert fold.metrics["blend"]["pr_auc"] > report.churn_share


@needs_kdd
@pytest.mark.timeout(600)  # ~40 s of CPU; the margin is for a loaded box
def test_kdd_blend_clears_the_threshold_on_both_splits(kdd_frames) -> None:
    history, feedback = kdd_frames
    report = quality.evaluate_dataset("kdd2015", history, feedback, n_folds=3, max_folds=1,
                                      seed=SEED)
    assert report.users == KDD_USERS
    assert [f.split for f in report.folds] == ["enrollments", "courses"]
    _check_sane(report)
    assert report.blend_auc("enrollments") >= MIN_AUC
    assert report.blend_auc("courses") >= MIN_AUC


@needs_telco
@pytest.mark.timeout(400)
def test_telco_blend_clears_the_threshold(telco_frames) -> None:
    history, feedback = telco_frames
    report = quality.evaluate_dataset("telco", history, feedback, n_folds=3, max_folds=1,
                                      seed=SEED)
    assert report.users == TELCO_USERS
    _check_sane(report)
    assert report.blend_auc("stratified") >= MIN_AUC
    table = report.table()
    assert list(table["model"]) == list(quality.SCORED)


@needs_telco
@pytest.mark.timeout(400)
def test_shuffled_labels_fail_the_threshold(telco_frames) -> None:
    history, feedback = telco_frames
    examples = quality.dataset_examples(history, feedback, quality.PLANS["telco"].policy)
    folds = quality.stratified_folds(examples.y, 3, SEED)[:1]
    shuffled = np.random.default_rng(SEED).permutation(examples.y)
    [fold] = quality.evaluate_folds(examples, "shuffled", folds, SEED, labels=shuffled)
    assert fold.metrics["blend"]["roc_auc"] < MAX_SHUFFLED_AUC
    assert fold.metrics["blend"]["roc_auc"] < MIN_AUC


def test_stratified_folds_partition_and_keep_the_churn_share() -> None:
    y = np.array([1] * 80 + [0] * 20)
    folds = quality.stratified_folds(y, 5, seed=3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(100))
    assert [int(y[f].sum()) for f in folds] == [16] * 5
    assert [len(f) for f in folds] == [20] * 5
    again = quality.stratified_folds(y, 5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again, strict=True))


def test_group_folds_never_split_a_group() -> None:
    groups = np.repeat(["a", "b", "c", "d", "e", "f"], [50, 40, 30, 20, 10, 5])
    folds = quality.group_folds(groups, 3, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(groups)))
    seen = [set(groups[f]) for f in folds]
    assert all(a.isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1:])
    with pytest.raises(ValueError, match="6 groups cannot fill 7 folds"):
        quality.group_folds(groups, 7, seed=1)


def test_fold_roles_hold_out_exactly_the_fold() -> None:
    y = np.array([1, 0] * 50)
    holdout = np.arange(0, 100, 5)
    roles = quality.fold_roles(100, holdout, y, seed=0)
    assert np.flatnonzero(roles == HOLDOUT).tolist() == holdout.tolist()
    validation = np.flatnonzero(roles == VALIDATION)
    assert len(validation) == 16 and int(y[validation].sum()) == 8
    assert (roles == FIT).sum() == 64
