"""Latency while a retrain runs, against the same session before it started.

One live session per run (see ``bench.live``): events offered at ``offered_rate``; after
``retrain_before_s`` a background retrain (the real one: training from the database in a
process of its own, the promotion judge) starts in the predictor, and the load goes on until
it has ended. The p99 of predictions scored while it ran is compared with the p99 before it.
"""

import logging
import time
from typing import Any

from bench import live
from bench.common import Context, Figure, fmt, median, percentile

log = logging.getLogger(__name__)
TARGET_RATIO = 2.0


def run(ctx: Context) -> list[Figure]:
    """The during/before p99 ratio."""
    sizes = ctx.sizes
    model = ctx.model()
    ratios, before, during, seconds, outcomes = [], [], [], [], []
    by_stage: dict[str, list[float]] = {}
    for number in range(sizes.runs):
        stages: list[tuple[float, str]] = []
        session = live.session(ctx, model, rate=sizes.offered_rate,
                               duration_s=sizes.retrain_max_s,
                               retrain_after_s=sizes.retrain_before_s,
                               prepare=lambda running, marks=stages: _time_stages(running, marks))
        assert session.retrain is not None
        started, ended = session.retrain
        for stage, p99 in stage_p99(session, stages, ended).items():
            by_stage.setdefault(stage, []).append(p99)
        calm = session.window(session.offered["started_wall"] + sizes.warmup_s, started)
        busy = session.window(started, ended)
        if not len(calm) or not len(busy):
            raise RuntimeError("no predictions before or during the retrain")
        before.append(percentile(calm, 99))
        during.append(percentile(busy, 99))
        ratios.append(during[-1] / before[-1])
        seconds.append(ended - started)
        outcomes.append(session.retrain_outcome)
        log.info("retrain run %d: p99 before %s ms, during %s ms (%s s retrain)", number + 1,
                 fmt(before[-1]), fmt(during[-1]), fmt(seconds[-1]))
    promoted = sum(1 for o in outcomes if o is not None and o.promoted)
    stage_text = ", ".join(f"{stage} {fmt(median(values))} ms"
                           for stage, values in by_stage.items())
    return [Figure(
        f"event-to-prediction p99 while a retrain runs / before it, at "
        f"{sizes.offered_rate:,.0f} events/s offered", f"<= {TARGET_RATIO:.0f}x", "x", ratios,
        lambda v: v <= TARGET_RATIO,
        baseline=f"p99 before {fmt(median(before))} ms", ratio=median(ratios),
        notes=[f"p99 during {fmt(median(during))} ms; retrain took {fmt(median(seconds))} s "
               f"(training from the {ctx.dataset.users:,}-user database); "
               f"{promoted} of {len(outcomes)} candidates promoted; p99 by training stage: "
               f"{stage_text}"],
    )]


def _time_stages(running: Any, marks: list[tuple[float, str]]) -> None:
    """Train as the predictor does (in a process of its own), noting when each stage of the
    run starts."""
    from churn_stream.predictor.training_process import train_in_process

    def train(engine: Any, version: str, **kwargs: Any) -> Any:
        return train_in_process(
            engine, version, progress=lambda stage, _done: marks.append((time.time(), stage)),
            **kwargs)

    running.retrainer.train = train


def stage_p99(session: live.Session, marks: list[tuple[float, str]],
              ended: float) -> dict[str, float]:
    """p99 latency (ms) of the predictions scored during each stage of the training run."""
    bounds = [*marks, (ended, "end")]
    out = {}
    for (start, stage), (stop, _) in zip(bounds, bounds[1:], strict=False):
        if stage == "done":
            continue
        values = session.window(start, stop)
        if len(values):
            out[stage] = percentile(values, 99)
    return out
