"""Tiny runs of every benchmark, so that ``make bench`` cannot rot: each runs end to end on
the real broker and a copy of the shared simulated database, and gives finite figures.
The figures are not checked against their targets; sizes this small measure nothing."""

import math
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from bench import cold_start, ingest, latency, memory, predict, report, retrain, throughput
from bench.common import Context, Figure, Sizes
from bench.data import Dataset
from tests.simulated import DAYS, USERS, simulated_database, simulated_events, trained_model

STREAM_EVENTS = 1_000


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """The shared simulated database, copied (the benchmarks write predictions), and its
    last events as the stream."""
    folder = tmp_path_factory.mktemp("bench")
    source = simulated_database().removeprefix("sqlite:///")
    target = folder / "history.db"
    with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)
    events = simulated_events()
    stream = folder / "stream.jsonl"
    stream.write_bytes(b"".join(e.to_bytes() + b"\n" for e in events[-STREAM_EVENTS:]))
    return Dataset(target, stream, USERS, DAYS, len(events))


@pytest.fixture
def ctx(broker, dataset: Dataset, tmp_path: Path) -> Context:
    return Context(broker.bootstrap_servers, broker.kind, dataset, Sizes.smoke(), tmp_path,
                   train=lambda: trained_model()[0])


def check(figures: list[Figure], count: int) -> None:
    assert len(figures) == count
    for figure in figures:
        assert figure.runs, figure.name
        assert all(math.isfinite(v) and v > 0 for v in figure.runs), (figure.name, figure.runs)
        assert figure.verdict in ("met", "missed")
    assert "| --- |" in report.table(figures)


@pytest.mark.timeout(600)
def test_memory_per_user(ctx: Context) -> None:
    figures = memory.run(ctx)
    check(figures, 1)
    assert 100 < figures[0].value < 100_000


@pytest.mark.timeout(600)
def test_consumer_ingestion(ctx: Context) -> None:
    check(ingest.run(ctx), 1)


@pytest.mark.timeout(600)
def test_predictor_throughput_and_the_naive_baseline(ctx: Context) -> None:
    figures = throughput.run(ctx)
    check(figures, 3)
    assert figures[0].ratio is not None and figures[0].ratio > 0


@pytest.mark.timeout(600)
def test_latency_at_an_offered_rate(ctx: Context) -> None:
    check(latency.run(ctx), 1)


@pytest.mark.timeout(600)
def test_predict_endpoint(ctx: Context) -> None:
    check(predict.run(ctx), 2)


@pytest.mark.timeout(600)
def test_latency_during_a_retrain(ctx: Context) -> None:
    check(retrain.run(ctx), 1)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cold_start(ctx: Context) -> None:
    figures = cold_start.run(ctx)
    check(figures, 1)
    assert "on 200 users (a sample)" in figures[0].notes[0]
    assert "(1 of 1 promoted)" in figures[0].notes[0]


def test_results_document_names_the_machine(tmp_path: Path) -> None:
    figure = Figure("x", ">= 1", "events/s", [2.0, 3.0, 4.0], lambda v: v >= 1)
    text = report.document([figure], {"cores": "2"}, {"x": "0.1 / 0.1 / 0.1"},
                           "python -m bench", 3, "tiny")
    assert "| cores | 2 |" in text and "| x | >= 1 | 3 events/s | 2, 3, 4 |" in text
