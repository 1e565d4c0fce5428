"""Replaying datasets: exact events, outcomes and bad-row counts; order, pacing, the broker.

Small fixture files with deliberately bad rows are written per test; the real datasets are
read from the shared data folder when it is present and skipped with the reason otherwise.
"""

import gzip
import json
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from churn_stream import storage
from churn_stream.errors import ConfigurationError
from churn_stream.events import Event, parse_event
from churn_stream.kafka_io import make_consumer, make_producer
from churn_stream.pacing import Pacer
from churn_stream.replay import DATA_ROOT, ReplayOutcome, ReplaySource, open_replay
from churn_stream.replay.frames import training_frames
from churn_stream.replay.generic import GenericSource, GenericSpec
from churn_stream.replay.kdd2015 import Kdd2015Source
from churn_stream.replay.run import ReplayOptions, run_replay
from churn_stream.replay.schedule import with_outcomes
from churn_stream.replay.telco import SNAPSHOT_AT, telco_source
from churn_stream.settings import Settings
from tests.conftest import start_service

KDD_DIR = DATA_ROOT / "kddcup2015"
TELCO_FILE = DATA_ROOT / "ibm-telco" / "Telco-Customer-Churn.csv"
needs_kdd = pytest.mark.skipif(
    not (KDD_DIR / "truth_train.csv").exists(),
    reason=f"KDD Cup 2015 data not found in {KDD_DIR} (shared data folder absent)",
)
needs_telco = pytest.mark.skipif(
    not TELCO_FILE.exists(), reason=f"Telco data not found at {TELCO_FILE}"
)

KDD_HEADER = ("enrollment_id,time,event_access,event_discussion,event_navigate,"
              "event_page_close,event_problem,event_video,event_wiki")
COURSE_10 = """\
1,2014-01-01,2,0,0,0,0,1,0
1,2014-01-02,0,0,0,0,0,0,0
1,2014-01-03,0,0,3,0,,0,0
2,2014-01-01,0,0,0,0,0,0,0
2,2014-01-02,1,abc,0,0,0,0,0
2,2014-13-03,5,0,0,0,0,0,0
,2014-01-03,1,0,0,0,0,0,0
2,2014-01-03,0,0,0,0,-1,0,4
"""
COURSE_20 = """\
3,2014-01-02,0,1,0,0,0,0,0
3,2014-01-03,0,0,0,0,0,0,0
3,2014-01-04,0,0,0,2,0,0,0
4,2014-01-02,0,0,0,0,0,0,0
4,2014-01-03,0,0,0,0,0,0,0
4,2014-01-04,0,0,0,0,0,0,0
"""
TRUTH = "enrollment_id,label\n1,1\n2,0\n3,1\n99,0\n1,0\n3,maybe\n"


def at(day: int, hour: int = 0, minute: int = 0, month: int = 1, year: int = 2014) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


@pytest.fixture
def kdd_dir(tmp_path: Path) -> Path:
    """Two overlapping courses (one gzipped) and a labels file, with bad rows in each."""
    folder = tmp_path / "kdd"
    folder.mkdir()
    (folder / "trainCourse10.csv").write_text(f"{KDD_HEADER}\n{COURSE_10}")
    with gzip.open(folder / "trainCourse20.csv.gz", "wt") as handle:
        handle.write(f"{KDD_HEADER}\n{COURSE_20}")
    (folder / "truth_train.csv").write_text(TRUTH)
    return folder


def brief(events: list[Event]) -> list[tuple]:
    return [(e.user_id, e.event_type, e.ts, e.numeric.get("count")) for e in events]


KDD_EXPECTED = [
    ("1", "enrollment", at(1), None),
    ("2", "enrollment", at(1), None),
    ("1", "access", at(1, 12), 2.0),
    ("1", "video", at(1, 12), 1.0),
    ("3", "enrollment", at(2), None),
    ("4", "enrollment", at(2), None),
    ("2", "access", at(2, 12), 1.0),
    ("3", "discussion", at(2, 12), 1.0),
    ("1", "navigate", at(3, 12), 3.0),
    ("2", "wiki", at(3, 12), 4.0),
    ("3", "page_close", at(4, 12), 2.0),
]
KDD_OUTCOMES = [
    ReplayOutcome("1", True, at(14)),
    ReplayOutcome("2", False, at(14)),
    ReplayOutcome("3", True, at(15)),
]


@pytest.mark.timeout(30)
def test_kdd_events_exact_in_time_order_across_courses(kdd_dir: Path) -> None:
    source = Kdd2015Source(kdd_dir)
    assert isinstance(source, ReplaySource)
    events = list(source.events())
    assert brief(events) == KDD_EXPECTED
    assert {e.categorical["course"] for e in events if e.user_id in "12"} == {"10"}
    assert {e.categorical["course"] for e in events if e.user_id in "34"} == {"20"}
    assert source.report.rows_read == 14
    assert source.report.events == 11
    assert dict(source.report.bad) == {
        "blank_number": 1, "bad_count": 2, "bad_time": 1, "blank_user": 1,
    }
    assert source.report.examples["bad_time"] == ["trainCourse10.csv:7: '2014-13-03'"]


@pytest.mark.timeout(30)
def test_kdd_outcomes_known_ten_days_after_the_window(kdd_dir: Path) -> None:
    source = Kdd2015Source(kdd_dir)
    assert source.outcomes() == KDD_OUTCOMES
    assert dict(source.report.bad) == {
        "label_unknown_user": 1, "duplicate_label": 1, "bad_label": 1, "user_without_label": 1,
    }
    assert source.report.examples["label_unknown_user"] == ["truth_train.csv:5: 99"]
    assert source.report.examples["user_without_label"] == ["4"]


@pytest.mark.timeout(30)
def test_every_event_passes_the_consumers_validation(kdd_dir: Path) -> None:
    for event in Kdd2015Source(kdd_dir).events():
        assert parse_event(event.to_bytes(), max_ahead_s=0) == event


@pytest.mark.timeout(30)
def test_reading_twice_gives_the_same_ids_and_counts(kdd_dir: Path) -> None:
    source = Kdd2015Source(kdd_dir)
    first = [e.event_id for e in source.events()]
    source.outcomes()
    report = (dict(source.report.bad), source.report.rows_read)
    second = [e.event_id for e in source.events()]
    source.outcomes()
    assert first == second and len(set(first)) == 11
    assert (dict(source.report.bad), source.report.rows_read) == report


@pytest.mark.timeout(30)
def test_limit_users_is_a_seeded_subset(kdd_dir: Path) -> None:
    chosen = []
    for seed in (1, 1, 2):
        source = open_replay(f"kdd2015:{kdd_dir}", limit_users=2, seed=seed)
        users = {e.user_id for e in source.events()}
        assert {o.user_id for o in source.outcomes()} <= users
        chosen.append(users)
    assert chosen[0] == chosen[1] and len(chosen[0]) == 2
    assert chosen[2] != chosen[0]
    assert len({e.user_id for e in open_replay(f"kdd2015:{kdd_dir}", limit_users=9).events()}) == 4


EVENTS_CSV = """\
customer,at,action,amount,plan
a,2024-03-01T10:00:00Z,login,,basic
a,2024-03-01T10:05:00+01:00,purchase,12.5,basic
b,2024-03-02,Page View,abc,premium
c,not a date,login,1,basic
,2024-03-02T08:00:00Z,login,1,basic
b,2024-03-03T00:00:00Z,???,1,basic
b,2999-01-01T00:00:00Z,login,1,basic
b,2024-03-04 09:30:00,logout,inf,premium
"""
LABELS_CSV = """\
customer,left,decided_at
a,yes,2024-03-10T00:00:00Z
b,NO,2024-03-12T00:00:00Z
zz,yes,2024-03-10T00:00:00Z
a,no,2024-03-11T00:00:00Z
c,maybe,2024-03-11T00:00:00Z
"""


def csv_spec(tmp_path: Path) -> GenericSpec:
    (tmp_path / "events.csv").write_text(EVENTS_CSV)
    (tmp_path / "labels.csv").write_text(LABELS_CSV)
    return GenericSpec.model_validate({
        "path": tmp_path / "events.csv", "user_column": "customer", "time_column": "at",
        "timezone": "Europe/Paris", "event_type_column": "action",
        "numeric_columns": ["amount"], "categorical_columns": ["plan"],
        "labels": {"path": tmp_path / "labels.csv", "user_column": "customer",
                   "label_column": "left", "known_at_column": "decided_at"},
    })


@pytest.mark.timeout(30)
def test_generic_csv_maps_columns_and_counts_bad_rows(tmp_path: Path) -> None:
    source = GenericSource(csv_spec(tmp_path))
    events = list(source.events())
    assert [(e.user_id, e.event_type, e.ts, e.numeric, e.categorical) for e in events] == [
        ("a", "purchase", at(1, 9, 5, month=3, year=2024), {"amount": 12.5}, {"plan": "basic"}),
        ("a", "login", at(1, 10, month=3, year=2024), {}, {"plan": "basic"}),
        ("b", "page_view", at(2, 11, month=3, year=2024), {}, {"plan": "premium"}),
        ("b", "logout", at(4, 8, 30, month=3, year=2024), {}, {"plan": "premium"}),
    ]
    assert source.report.rows_read == 8
    assert dict(source.report.bad) == {
        "blank_number": 1, "bad_number": 2, "bad_time": 1, "blank_user": 1,
        "bad_event_type": 1, "future_time": 1,
    }
    assert source.outcomes() == [
        ReplayOutcome("a", True, at(10, month=3, year=2024)),
        ReplayOutcome("b", False, at(12, month=3, year=2024)),
    ]
    assert source.report.bad["label_unknown_user"] == 1
    assert source.report.bad["duplicate_label"] == 1
    assert source.report.examples["bad_label"] == ["labels.csv:6: 'maybe'"]


JSONL = [
    '{"uid": "u1", "t": 1709280000, "clicks": 3, "views": 0, "country": "FR", "left": false}',
    "not json",
    '{"uid": "u2", "t": 1709283600, "clicks": 0, "views": 2.5, "country": "DE"}',
    '{"uid": "u1", "t": 1709200000, "clicks": 1, "views": 1, "left": true}',
    "[1, 2]",
    '{"uid": "u2", "t": 1709290000, "clicks": 1, "views": null, "country": "DE", "left": true}',
]


@pytest.mark.timeout(30)
def test_generic_jsonl_with_count_columns_streams_a_presorted_file(tmp_path: Path) -> None:
    (tmp_path / "log.jsonl").write_text("\n".join(JSONL) + "\n")
    (tmp_path / "mapping.toml").write_text(
        'path = "log.jsonl"\nuser_column = "uid"\ntime_column = "t"\ntime_format = "epoch_s"\n'
        'count_columns = ["clicks", "views"]\ncategorical_columns = ["country"]\n'
        'rename = {clicks = "click"}\nlabel_column = "left"\nknown_after_days = 2\n'
        "presorted = true\n"
    )
    source = open_replay(str(tmp_path / "mapping.toml"))
    t1, t2 = datetime.fromtimestamp(1709280000, UTC), datetime.fromtimestamp(1709290000, UTC)
    assert brief(list(source.events())) == [("u1", "click", t1, 3.0), ("u2", "click", t2, 1.0)]
    assert dict(source.report.bad) == {
        "bad_json": 2, "bad_count": 1, "out_of_order": 1, "blank_number": 1,
    }
    assert source.outcomes() == [
        ReplayOutcome("u1", False, t1 + timedelta(days=2)),
        ReplayOutcome("u2", True, t2 + timedelta(days=2)),
    ]


@pytest.mark.timeout(30)
def test_bad_names_and_mappings_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("u,t\n1,2024-01-01\n")
    with pytest.raises(ConfigurationError, match="needs a column mapping"):
        open_replay(str(tmp_path / "data.csv"))
    with pytest.raises(ConfigurationError, match="no replay named"):
        open_replay("nonesuch")
    (tmp_path / "bad.json").write_text(json.dumps({"path": "data.csv", "user_column": "u"}))
    with pytest.raises(ConfigurationError, match="exactly one of event_type_column"):
        open_replay(str(tmp_path / "data.csv"), config=tmp_path / "bad.json")
    (tmp_path / "typo.json").write_text(json.dumps({"path": "data.csv", "user_colum": "u"}))
    with pytest.raises(ConfigurationError, match="user_colum"):
        open_replay(str(tmp_path / "typo.json"))


TELCO_CSV = """\
customerID,gender,SeniorCitizen,Partner,Dependents,tenure,PhoneService,MultipleLines,\
InternetService,OnlineSecurity,OnlineBackup,DeviceProtection,TechSupport,StreamingTV,\
StreamingMovies,Contract,PaperlessBilling,PaymentMethod,MonthlyCharges,TotalCharges,Churn
0001-A,Female,0,Yes,No,1,No,No phone service,DSL,No,Yes,No,No,No,No,Month-to-month,Yes,\
Electronic check,29.85,29.85,No
0002-B,Male,1,No,No,0,Yes,No,DSL,Yes,No,Yes,No,No,No,Two year,No,Mailed check,56.95, ,Yes
0003-C,Male,0,No,No,2,Yes,No,DSL,Yes,Yes,No,No,No,No,Month-to-month,Yes,Mailed check,\
53.85,108.15,Perhaps
"""


@pytest.mark.timeout(30)
def test_telco_rows_become_profiles_and_a_blank_total_is_counted(tmp_path: Path) -> None:
    (tmp_path / "telco.csv").write_text(TELCO_CSV)
    source = open_replay(f"telco:{tmp_path / 'telco.csv'}")
    events = list(source.events())
    assert [e.event_type for e in events] == ["profile"] * 3
    assert {e.ts for e in events} == {SNAPSHOT_AT}
    assert events[1].numeric == {"senior_citizen": 1.0, "tenure_months": 0.0,
                                 "monthly_charges": 56.95}
    assert events[0].categorical["payment_method"] == "Electronic check"
    assert all("churn" not in e.categorical for e in events)
    assert dict(source.report.bad) == {"blank_number": 1}
    assert source.outcomes() == [
        ReplayOutcome("0001-A", False, SNAPSHOT_AT + timedelta(days=30)),
        ReplayOutcome("0002-B", True, SNAPSHOT_AT + timedelta(days=30)),
    ]
    assert source.report.examples["bad_label"] == ["telco.csv:4: 'Perhaps'"]


@pytest.mark.timeout(30)
def test_training_frames_have_the_table_columns(kdd_dir: Path) -> None:
    history, feedback = training_frames(Kdd2015Source(kdd_dir), until=at(14))
    assert list(history.columns) == [c.name for c in storage.user_activity.columns]
    assert set(feedback.columns) <= {c.name for c in storage.feedback.columns}
    assert len(history) == 11 and history.ts.dt.tz is None
    assert list(feedback.user_id) == ["1", "2"]  # user 3's outcome is known on the 15th


@pytest.mark.timeout(30)
def test_outcomes_are_released_in_replay_time_and_paced() -> None:
    start = at(1)
    events = [Event(user_id="u", event_type="login", ts=start + timedelta(days=d))
              for d in (0, 1, 2)]
    outcome = ReplayOutcome("u", True, start + timedelta(days=1.5))
    pacer = Pacer(start, speed=20 * 86_400)  # 20 days per second
    seen: list[tuple[str, float]] = []
    began = time.monotonic()
    for event in with_outcomes(events, [outcome], pacer, lambda b: seen.append(("o", 0.0))):
        assert pacer.wait_for(event.ts)
        seen.append((event.ts.strftime("%d"), time.monotonic() - began))
    assert [label for label, _ in seen] == ["01", "02", "o", "03"]
    assert seen[-1][1] >= 2 / 20 and seen[1][1] >= 1 / 20


@pytest.mark.timeout(30)
def test_a_stop_ends_the_replay_while_waiting() -> None:
    stopping = threading.Event()
    pacer = Pacer(at(1), speed=1.0, stopping=stopping)  # one second a second: a long wait
    events = [Event(user_id="u", event_type="login", ts=at(1) + timedelta(days=d)) for d in (0, 1)]
    threading.Timer(0.2, stopping.set).start()
    outcome = ReplayOutcome("u", True, at(1) + timedelta(hours=1))
    got = [e.ts for e in with_outcomes(events, [outcome], pacer, lambda b: None)]
    assert got == [at(1)]


def consume_all(settings: Settings, expected: int, timeout_s: float = 60) -> list:
    consumer = make_consumer(settings.bootstrap_servers, settings.consumer_group,
                             settings.topic_activity)
    records: list = []
    deadline = time.monotonic() + timeout_s
    while len(records) < expected and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    consumer.close()
    return records


def check_stream(records: list, expected: list[tuple]) -> None:
    events = [parse_event(r.value, max_ahead_s=0) for r in records]
    assert all(r.key == e.user_id.encode() for r, e in zip(records, events, strict=True))
    assert sorted(brief(events), key=str) == sorted(expected, key=str)
    for partition in {r.partition for r in records}:
        stamps = [e.ts for r, e in zip(records, events, strict=True) if r.partition == partition]
        assert stamps == sorted(stamps)


@pytest.mark.timeout(120)
def test_replay_into_the_broker_paced_with_outcomes(topics: Settings, kdd_dir: Path) -> None:
    reported: list[ReplayOutcome] = []
    producer = make_producer(topics.bootstrap_servers)
    options = ReplayOptions(f"kdd2015:{kdd_dir}", speed_days_per_s=20.0)
    result = run_replay(options, producer, topics.topic_activity, threading.Event(),
                        reported.extend)
    producer.close()
    # The last outcome is known 14 days after the first event: 0.7 s at 20 days/s.
    assert result.events == 11 and result.outcomes == 3 and 0.7 <= result.seconds < 10
    assert reported == KDD_OUTCOMES
    check_stream(consume_all(topics, 11), KDD_EXPECTED)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_producer_replays_from_the_command_line(topics: Settings, kdd_dir: Path) -> None:
    process = start_service("producer.py", topics, "--replay", f"kdd2015:{kdd_dir}")
    output, _ = process.communicate(timeout=90)
    assert process.returncode == 0, output.decode()
    assert b"replay kdd2015: 11 events and 3 outcomes" in output
    check_stream(consume_all(topics, 11), KDD_EXPECTED)
    process = start_service("producer.py", topics, "--replay", "nonesuch")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2 and b"no replay named 'nonesuch'" in output


@needs_kdd
@pytest.mark.timeout(120)
def test_real_kdd_course_exact_counts() -> None:
    source: ReplaySource = Kdd2015Source(KDD_DIR, courses=["761"])
    events = list(source.events())
    outcomes = source.outcomes()
    assert (len(events), source.report.rows_read, len(outcomes)) == (5360, 22830, 761)
    assert sum(o.churned for o in outcomes) == 655
    assert {o.known_at for o in outcomes} == {datetime(2014, 7, 25, tzinfo=UTC)}
    assert (events[0].ts, events[-1].ts) == (datetime(2014, 6, 15, tzinfo=UTC),
                                             datetime(2014, 7, 14, 12, tzinfo=UTC))
    # Every other label in truth_train.csv is for an enrollment outside this course.
    assert dict(source.report.bad) == {"label_unknown_user": 120542 - 761}


@needs_kdd
@pytest.mark.timeout(120)
def test_real_kdd_subset_matches_the_file_counted_independently() -> None:
    source = Kdd2015Source(KDD_DIR, courses=["761"])
    source.limit_users(50, seed=3)
    events = list(source.events())
    outcomes = source.outcomes()
    assert (len(events), len(outcomes), sum(o.churned for o in outcomes)) == (424, 50, 41)
    frame = pd.read_csv(KDD_DIR / "trainCourse761.csv.gz", dtype={"enrollment_id": str})
    frame = frame[frame.enrollment_id.isin(source.only_users or ())]
    counts = frame.drop(columns=["enrollment_id", "time"]).rename(columns=lambda c: c[6:])
    by_type = Counter(e.event_type for e in events if e.event_type != "enrollment")
    assert by_type == {kind: n for kind, n in (counts > 0).sum().items() if n}
    assert sum(e.numeric.get("count", 0) for e in events) == counts.to_numpy().sum() == 1666
    stamps = [e.ts for e in events]
    assert stamps == sorted(stamps)


@needs_kdd
@pytest.mark.timeout(120)
def test_real_kdd_overlapping_courses_merge_in_time_order() -> None:
    source = Kdd2015Source(KDD_DIR, courses=["1038", "769"])
    source.limit_users(300, seed=0)
    events = list(source.events())
    assert [e.ts for e in events] == sorted(e.ts for e in events)
    assert {e.categorical["course"] for e in events} == {"1038", "769"}
    for event in events[:: max(1, len(events) // 200)]:
        assert parse_event(event.to_bytes(), max_ahead_s=0) == event


@needs_telco
@pytest.mark.timeout(60)
def test_real_telco_counts() -> None:
    source = telco_source(TELCO_FILE)
    events = list(source.events())
    outcomes = source.outcomes()
    assert (len(events), len(outcomes), sum(o.churned for o in outcomes)) == (7043, 7043, 1869)
    assert dict(source.report.bad) == {"blank_number": 11}
    assert sum("total_charges" not in e.numeric for e in events) == 11
