"""Seeded simulator data shared by the model tests, generated once per test process."""

from datetime import UTC, datetime
from functools import lru_cache

import pandas as pd

from churn_stream.events import Event
from churn_stream.simulator import Simulator
from churn_stream.storage import event_row

START = datetime(2024, 1, 1, tzinfo=UTC)
USERS, DAYS, SEED = 300, 45, 7
"""Enough for every split to hold churners: 45 days leave 21 settled cutoffs of 7-day labels."""


@lru_cache(maxsize=4)
def simulated_events(n_users: int = USERS, days: int = DAYS, seed: int = SEED) -> tuple[Event, ...]:
    """The simulator's events for these parameters, in time order."""
    return tuple(Simulator(n_users, START, days, seed=seed).events())


def history_frame(events: tuple[Event, ...] | list[Event]) -> pd.DataFrame:
    """Events as ``user_activity`` rows in a DataFrame, as ``training.load_history`` returns."""
    frame = pd.DataFrame([event_row(e, e.ts) for e in events])
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
    return frame.drop(columns=["ingested_at"])


@lru_cache(maxsize=1)
def simulated_database() -> str:
    """A SQLite database holding the default simulation, written once per test process."""
    import atexit
    import shutil
    import tempfile

    from churn_stream import storage

    folder = tempfile.mkdtemp(prefix="churn-sim-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    url = f"sqlite:///{folder}/churn.db"
    engine = storage.make_engine(url)
    storage.create_schema(engine)
    storage.write_events(engine, simulated_events(), START)
    engine.dispose()
    return url


@lru_cache(maxsize=1)
def trained_model():
    """The model ``training.train`` makes from the simulated database (seed 0), and the
    progress reports it gave, shared by every test that only reads a model."""
    from churn_stream import storage, training

    engine = storage.make_engine(simulated_database())
    reports: list[tuple[str, float]] = []
    model = training.train(engine, "sim-1", progress=lambda s, f: reports.append((s, f)))
    engine.dispose()
    return model, tuple(reports)
