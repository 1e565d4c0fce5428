"""Event-to-prediction latency at a steady offered rate, the predictor's state held.

Events go out from a child process at ``offered_rate`` per second for ``latency_s`` seconds;
each prediction's latency runs from the Kafka timestamp of the oldest event it answers to
the moment it was written to the table and handed to the producer (see ``bench.live``).
The first ``warmup_s`` seconds are left out. One prediction answers all of a user's events
in a micro-batch and is timed from the oldest, so its figure is the worst of them.
"""

import logging

from bench import live
from bench.common import Context, Figure, fmt, median, percentile, profiled

log = logging.getLogger(__name__)
TARGET_P99_MS = 200.0


def run(ctx: Context) -> list[Figure]:
    """The p99 latency figure at the offered rate."""
    sizes = ctx.sizes
    model = ctx.model()
    p99, p50, scored_p99, rates, counts = [], [], [], [], []
    for number in range(sizes.runs):
        result = live.session(ctx, model, rate=sizes.offered_rate, duration_s=sizes.latency_s)
        steady = result.steady(sizes.warmup_s)
        if not len(steady):
            raise RuntimeError("no prediction was scored after the warm-up")
        p99.append(percentile(steady, 99))
        p50.append(percentile(steady, 50))
        scored = result.scored_ms[result.scored_wall >= result.offered["started_wall"]
                                  + sizes.warmup_s]
        scored_p99.append(percentile(scored, 99))
        rates.append(result.offered["sent"] / result.offered["seconds"])
        counts.append(len(steady))
        log.info("latency run %d: p99 %s ms, p50 %s ms over %d predictions at %s events/s",
                 number + 1, fmt(p99[-1]), fmt(p50[-1]), len(steady), fmt(rates[-1]))
    if ctx.profile:
        with profiled("latency", True):
            live.session(ctx, model, rate=sizes.offered_rate, duration_s=sizes.latency_s)
    return [Figure(
        f"event-to-prediction latency p99 at {sizes.offered_rate:,.0f} events/s offered",
        f"p99 <= {TARGET_P99_MS:.0f} ms", "ms", p99, lambda v: v <= TARGET_P99_MS,
        notes=[f"{sizes.latency_s:.0f} s of load a run, first {sizes.warmup_s:.0f} s left out; "
               f"p50 {fmt(median(p50))} ms; p99 to scores ready (before the table write) "
               f"{fmt(median(scored_p99))} ms; offered {fmt(median(rates))} events/s achieved; "
               f"{int(median(counts)):,} predictions a run"],
    )]
