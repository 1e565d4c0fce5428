"""``/predict/{user_id}`` on the predictor's HTTP API, all three models and the explanation.

A client in a child process asks for tracked users one request at a time over a kept-alive
connection and times each round trip; after each, it times a ``/model`` from the same
process, the floor that the HTTP stack and the machine set (nothing copied, nothing
scored). The API runs in a process of its own, fed by the predictor, as in the service
(``churn_stream.predictor.api_process``). Idle: the consume loop is not running. Under
load: the predictor consumes events offered at ``offered_rate`` meanwhile (see
``bench.live``).
"""

import logging
from typing import Any

import numpy as np

from bench import live, load, service
from bench.common import Context, Figure, fmt, median, percentile
from churn_stream.predictor.main import start_api
from tests.brokers import free_port

log = logging.getLogger(__name__)
TARGET_P99_MS = 10.0


def run(ctx: Context) -> list[Figure]:
    """The p99 of ``/predict``, idle and while the predictor consumes."""
    sizes = ctx.sizes
    model = ctx.model()
    idle, idle_p50, busy, busy_p50 = [], [], [], []
    idle_floor, busy_floor = [], []
    for number in range(sizes.runs):
        seconds, floor = idle_run(ctx, model)
        idle.append(percentile(seconds, 99) * 1000)
        idle_p50.append(percentile(seconds, 50) * 1000)
        idle_floor.append(percentile(floor, 99) * 1000)
        session = live.session(ctx, model, rate=sizes.offered_rate, duration_s=sizes.latency_s,
                               http_requests=sizes.predict_requests // 4)
        start = session.offered["started_wall"] + sizes.warmup_s
        loaded = session.http_seconds(start, session.offered["ended_wall"])
        busy.append(percentile(loaded, 99) * 1000)
        busy_p50.append(percentile(loaded, 50) * 1000)
        floor = session.http_seconds(start, session.offered["ended_wall"], floor=True)
        busy_floor.append(percentile(floor, 99) * 1000)
        log.info("/predict run %d: p99 idle %s ms, under load %s ms (/model %s, %s ms)",
                 number + 1, fmt(idle[-1]), fmt(busy[-1]), fmt(idle_floor[-1]),
                 fmt(busy_floor[-1]))
    return [
        Figure("/predict/{user_id} p99, all three models (predictor idle)",
               f"p99 <= {TARGET_P99_MS:.0f} ms", "ms", idle, lambda v: v <= TARGET_P99_MS,
               notes=[f"{sizes.predict_requests:,} sequential requests a run over "
                      f"{live.HTTP_USERS} tracked users; p50 {fmt(median(idle_p50))} ms; "
                      "client round trip, score and top features included; "
                      f"the floor, /model p99, {fmt(median(idle_floor))} ms"]),
        Figure(f"/predict/{{user_id}} p99 while consuming {sizes.offered_rate:,.0f} events/s",
               f"p99 <= {TARGET_P99_MS:.0f} ms", "ms", busy, lambda v: v <= TARGET_P99_MS,
               notes=[f"{sizes.predict_requests // 4:,} requests spread over each "
                      f"{sizes.latency_s:.0f} s session; p50 {fmt(median(busy_p50))} ms; "
                      f"the floor, /model p99, {fmt(median(busy_floor))} ms"]),
    ]


def idle_run(ctx: Context, model: Any) -> tuple[list[float], list[float]]:
    """Seconds of each ``/predict``, and of each ``/model``, against a predictor whose loop
    is not running."""
    settings = ctx.settings(predictor_port=free_port())
    running = service.predictor(settings, model, store=ctx.warm_store())
    server = start_api(settings, "bench", running.holder, running.state, running.retrainer)
    try:
        users = running.state.store.user_ids()
        rng = np.random.default_rng(1)
        sample = [users[i] for i in rng.choice(len(users), min(live.HTTP_USERS, len(users)),
                                               replace=False)]
        process, pipe = load.spawn(load.query, server.address, sample,
                                   ctx.sizes.predict_requests, 0.0)
        pipe.send("go")
        timings = pipe.recv()
        process.join(10)
    finally:
        server.stop()
        running.consumer.close(autocommit=False)
        running.predictor.producer.close()
        running.engine.dispose()
    return [predict for _, predict, _ in timings], [floor for _, _, floor in timings]
