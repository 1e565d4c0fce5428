"""Memory per tracked user: the feature state and its sequence ring, at N users.

Each N is measured in a fresh child process. Users get ``memory_events_per_user`` events
each, copied from the stream (so the event types, numeric properties and attributes are the
real vocabulary and the state has its real width) and spread over the ring's 28 days. Three
measures per user: ``FeatureStore.nbytes`` (its own account: arrays plus the user index),
the bytes tracemalloc sees allocated by building the state (numpy reports its buffers to it),
and the growth of the process's resident memory. The predictor also keeps a ``user_id ->
partition`` dict in ``UserState``, and its HTTP API process a copy of the ``user_id -> slot``
index (the state arrays themselves are shared, one copy for both processes); both are built
too, the copy as that process receives it over its pipe, and counted in the last two.
"""

import logging
import resource
from pathlib import Path
from typing import Any

import numpy as np

from bench import load
from bench.common import Context, Figure, fmt
from bench.data import Dataset

log = logging.getLogger(__name__)
TARGET_BYTES = 1024
BATCH_EVENTS = 200_000


def run(ctx: Context) -> list[Figure]:
    """One figure per user count."""
    figures = []
    events_per_user = ctx.sizes.memory_events_per_user
    for users in ctx.sizes.memory_users:
        runs = [measure_in_child(ctx.dataset, users, events_per_user)
                for _ in range(ctx.sizes.memory_runs)]
        traced = [r["traced_per_user"] for r in runs]
        figures.append(Figure(
            f"memory per tracked user at {users:,} users (state, sequence ring, indexes)",
            f"<= {TARGET_BYTES:,} B", "B", traced, lambda v: v <= TARGET_BYTES,
            notes=[f"tracemalloc, {len(runs)} run (the size follows from users and vocabulary "
                   f"alone); {events_per_user} events a user; FeatureStore.nbytes "
                   f"{fmt(runs[0]['store_per_user'])} B; "
                   f"RSS growth {fmt(runs[0]['rss_per_user'])} B; store capacity "
                   f"{runs[0]['capacity']:,} slots for {users:,} users; "
                   f"{runs[0]['channels']} event types, {runs[0]['pairs']} numeric pairs, "
                   f"{runs[0]['keys']} attributes"]))
    return figures


def measure_in_child(dataset: Dataset, users: int, events_per_user: int) -> dict[str, Any]:
    """``measure`` in a fresh interpreter."""
    process, pipe = load.spawn(_child, str(dataset.db_path), str(dataset.stream_path),
                               users, events_per_user)
    pipe.send("go")
    result = pipe.recv()
    process.join(30)
    if isinstance(result, str):
        raise RuntimeError(result)
    return result


def _child(db_path: str, stream_path: str, users: int, events_per_user: int, pipe: Any) -> None:
    try:
        dataset = Dataset(Path(db_path), Path(stream_path), 0, 0, 0)
        templates = _templates(dataset)
        pipe.send("ready")
        pipe.recv()
        pipe.send(measure(templates, users, events_per_user))
    except Exception as exc:  # the parent reports it
        pipe.send(f"{type(exc).__name__}: {exc}")


def _templates(dataset: Dataset) -> dict[str, np.ndarray]:
    events = dataset.stream_events()
    return {"event_type": np.array([e.event_type for e in events], dtype=object),
            "numeric": np.array([dict(e.numeric) for e in events], dtype=object),
            "categorical": np.array([dict(e.categorical) for e in events], dtype=object)}


def measure(templates: dict[str, np.ndarray], users: int, events_per_user: int) -> dict[str, Any]:
    """Build the state of ``users`` users and return the bytes per user it took."""
    import gc
    import json
    import tracemalloc

    from churn_stream.features import FeatureStore
    from churn_stream.features.common import DAY_S, RING_DAYS

    rng = np.random.default_rng(users)
    total = users * events_per_user
    picks = rng.integers(0, len(templates["event_type"]), total)
    user_index = np.repeat(np.arange(users), events_per_user)
    # Event times within the ring, in time order per user (sorted per user below).
    ts_s = 800_000_000 + np.sort(rng.integers(0, RING_DAYS * DAY_S, total).reshape(
        users, events_per_user), axis=1).reshape(-1)
    gc.collect()
    rss_before = _rss_bytes()
    tracemalloc.start()
    store = FeatureStore()
    partition_of: dict[str, int] = {}
    for start in range(0, total, BATCH_EVENTS):
        part = slice(start, start + BATCH_EVENTS)
        # Names made here, as parsing makes them, so that the kept ones are counted.
        names = np.array([f"user-{i:07d}" for i in user_index[part]], dtype=object)
        store.update_columns(names, templates["event_type"][picks[part]], ts_s[part],
                             templates["numeric"][picks[part]],
                             templates["categorical"][picks[part]])
        for name in names:
            partition_of[name] = hash(name) % 6
    api_index = json.loads(json.dumps(store._slots))  # its own keys, as a received copy has
    gc.collect()
    traced, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = _rss_bytes() - rss_before
    assert len(store) == users == len(api_index)
    return {"users": users, "traced_per_user": traced / users,
            "store_per_user": store.nbytes() / users, "rss_per_user": rss / users,
            "capacity": store._capacity, "channels": len(store._types),
            "pairs": len(store._pairs), "keys": len(store._keys),
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()
