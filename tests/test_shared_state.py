"""The feature store's state shared with a reading process: what the reader copies is what the
writer holds, and never a change half made."""

import multiprocessing
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import numpy as np
import pytest

from churn_stream.events import Event
from churn_stream.features import FeatureSpace, FeatureStore
from churn_stream.features.shared import Mirror, SharedArrays
from tests.simulated import history_frame, simulated_events

pytestmark = pytest.mark.timeout(120)
SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def events() -> tuple[Event, ...]:
    return simulated_events()


def connected(store: FeatureStore) -> Iterator[Mirror]:
    writer, reader = SPAWN.Pipe()
    store.share(SharedArrays())
    store.connect_reader(writer)
    mirror = Mirror(reader)
    threading.Thread(target=mirror.follow, daemon=True).start()
    yield mirror
    writer.close()


def features_of(mirror: Mirror, user_id: str, as_of, space: FeatureSpace):
    copied = mirror.copy_of(user_id)
    assert copied is not None, f"{user_id} not held by the reader"
    return FeatureStore.of_rows(user_id, *copied).matrix([user_id], as_of, space)


def test_the_reader_sees_the_writers_state_through_growth_forgetting_and_reuse(
    events: tuple[Event, ...]
) -> None:
    space = FeatureSpace.learn(history_frame(events))
    store = FeatureStore(capacity=2)  # grows many times; no vocabulary yet: it grows too
    mirror_of = connected(store)
    mirror = next(mirror_of)
    users = sorted({e.user_id for e in events})
    batches = np.array_split(np.arange(len(events)), 40)
    for number, batch in enumerate(batches):
        store.update([events[i] for i in batch])
        if number == 20:
            store.forget(users[:50])  # their slots go to the users that come next
            assert all(mirror.copy_of(u) is None for u in users[:50])
        as_of = events[batch[-1]].ts
        held = store.user_ids()
        for user_id in held[:: max(len(held) // 25, 1)]:
            mine = store.matrix([user_id], as_of, space)
            theirs = features_of(mirror, user_id, as_of, space)
            np.testing.assert_array_equal(theirs[0], mine[0])
            np.testing.assert_array_equal(theirs[1], mine[1])
        assert sorted(mirror.slots) == sorted(held)
    assert store.vocabulary() == mirror.vocabulary
    next(mirror_of, None)


def test_a_shared_store_crosses_to_another_process_as_a_private_copy(events) -> None:
    store = FeatureStore()
    store.update(list(events[:500]))
    store.share(SharedArrays())
    copy = FeatureStore.__new__(FeatureStore)
    copy.__setstate__(store.__getstate__())  # what pickling between processes does
    assert copy._shared is None and copy.user_ids() == store.user_ids()
    for name, array in copy._state.items():
        np.testing.assert_array_equal(array, store._state[name])
        assert not np.shares_memory(array, store._state[name])


def test_a_reader_in_another_process_never_copies_a_change_half_made(events) -> None:
    """Every copy keeps the invariants a finished change keeps (events counted in total
    and by type alike; the last event the latest of any type), while changes stream in."""
    store = FeatureStore()
    store.update(list(events[:2000]))
    writer, reader = SPAWN.Pipe()
    store.share(SharedArrays())
    results, sending = SPAWN.Pipe(duplex=False)
    users = store.user_ids()
    child = SPAWN.Process(target=_copy_and_check, args=(reader, users, 2.5, sending))
    child.start()
    store.connect_reader(writer)
    later = [e.model_copy(update={"ts": e.ts + timedelta(days=30)}) for e in events]
    changes = 0
    deadline = time.monotonic() + 60
    while not results.poll(0) and time.monotonic() < deadline:
        start = (changes * 97) % (len(later) - 400)
        store.update(sorted(later[start:start + 400], key=lambda e: e.ts))
        changes += 1
    copies, broken = results.recv()
    child.join(10)
    assert changes > 20 and copies > 200, (changes, copies)
    assert broken == [], f"{len(broken)} torn copies, e.g. {broken[:3]}"


def _copy_and_check(reader, users: list[str], seconds: float, results) -> None:
    mirror = Mirror(reader)
    threading.Thread(target=mirror.follow, daemon=True).start()
    copies, broken = 0, []
    end = time.monotonic() + seconds
    rng = np.random.default_rng(0)
    while time.monotonic() < end:
        user_id = users[rng.integers(len(users))]
        copied = mirror.copy_of(user_id)
        if copied is None:
            continue
        rows = copied[1]
        copies += 1
        if int(rows["total"][0]) != int(rows["type_total"][0].sum()) or (
                int(rows["last_s"][0]) != int(rows["type_last_s"][0].max())):
            broken.append((user_id, int(rows["total"][0]), int(rows["type_total"][0].sum())))
    results.send((copies, broken))
