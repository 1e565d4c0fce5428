"""Load made in child processes, so that it does not share the measured process's GIL:
events offered at a steady rate, and ``/predict`` requests one after the other.

Each child says ``ready`` on its pipe, waits for ``go``, works, and sends back what it did.
"""

import multiprocessing
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

TICK_S = 0.002


def spawn(target: Any, *args: Any) -> tuple[multiprocessing.Process, Connection]:
    """Start ``target(*args, pipe)`` in a fresh interpreter; returns it once it is ready."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=target, args=(*args, theirs), daemon=True)
    process.start()
    if not ours.poll(120) or ours.recv() != "ready":
        process.kill()
        raise RuntimeError(f"{target.__name__} did not get ready")
    return process, ours


def offer(bootstrap_servers: str, topic: str, db_path: str, stream_path: str, users: int,
          days: int, rate: float, duration_s: float, pipe: Connection) -> None:
    """Send the stream to ``topic`` at ``rate`` events/s for ``duration_s`` or until told
    to stop; reports how many were sent and when (wall clock)."""
    from bench.common import iter_stream
    from bench.data import Dataset
    from churn_stream.kafka_io import make_producer

    dataset = Dataset(Path(db_path), Path(stream_path), users, days, 0)
    records = iter_stream(dataset, int(rate * duration_s) + 1)
    producer = make_producer(bootstrap_servers)
    pipe.send("ready")
    pipe.recv()
    started_wall, started = time.time(), time.perf_counter()
    sent = 0
    while not pipe.poll():
        elapsed = time.perf_counter() - started
        if elapsed >= duration_s:
            break
        due = int(rate * elapsed)
        while sent < due:
            key, value = next(records)
            producer.send(topic, key=key, value=value)
            sent += 1
        time.sleep(TICK_S)
    ended_wall, seconds = time.time(), time.perf_counter() - started
    producer.flush()
    producer.close()
    pipe.send({"sent": sent, "started_wall": started_wall, "ended_wall": ended_wall,
               "seconds": seconds})


def query(url: str, user_ids: list[str], count: int, pause_s: float, pipe: Connection) -> None:
    """GET ``/predict/{user_id}`` ``count`` times, one at a time, ``pause_s`` apart, each
    followed by a GET of ``/model``; reports (wall clock at the start, seconds of the
    ``/predict``, seconds of the ``/model``) of each pair.

    ``/model`` is the floor: the same process and HTTP stack answering from what it holds,
    with no state to copy and nothing to score.
    """
    import httpx

    client = httpx.Client(base_url=url, timeout=30.0)
    deadline = time.monotonic() + 60
    while client.get("/health").status_code != 200:  # the API process gets its model
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} served no model within 60 s")
        time.sleep(0.1)
    for user_id in user_ids[:5]:
        client.get(f"/predict/{user_id}").raise_for_status()
    pipe.send("ready")
    pipe.recv()
    timings: list[tuple[float, float, float]] = []
    for i in range(count):
        user_id = user_ids[i % len(user_ids)]
        wall = time.time()
        predict = _timed(client, f"/predict/{user_id}")
        timings.append((wall, predict, _timed(client, "/model")))
        if pause_s:
            time.sleep(pause_s)
    client.close()
    pipe.send(timings)


def _timed(client: Any, path: str) -> float:
    started = time.perf_counter()
    response = client.get(path)
    seconds = time.perf_counter() - started
    response.raise_for_status()
    return seconds
