"""Producer service: simulated user activity into the ``user-activity`` topic.

It first writes a backfill of history at full speed, so that the models have labelled
history to train on, then plays the most recent simulated days live, paced by rate and
speed; simulated time never runs ahead of the wall clock, so the live phase settles into
real time once it catches up.

    python producer.py --users 1000 --backfill-days 30 --rate 500 --seed 7

With ``--replay`` it streams a real dataset instead, in event-time order, and releases the
dataset's outcomes when they would have become known (``churn_stream.replay``):

    python producer.py --replay kdd2015 --replay-speed 2 --limit-users 2000 --seed 7
    python producer.py --replay export.csv --replay-config mapping.toml
"""

import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import typer

from churn_stream.errors import ConfigurationError
from churn_stream.kafka_io import make_producer
from churn_stream.pacing import Pacer
from churn_stream.produce import publish
from churn_stream.replay.run import ReplayOptions, log_outcomes, run_replay
from churn_stream.reporting import FeedbackClient, replay_reporter, start_reporting
from churn_stream.runtime import serve_metrics, start_service
from churn_stream.settings import Settings
from churn_stream.simulator import Simulator

log = logging.getLogger("producer")
app = typer.Typer(add_completion=False)


@app.command()
def main(
    users: int = typer.Option(1000, min=1, help="Simulated users."),
    backfill_days: float = typer.Option(30.0, min=0, help="Days of history sent at full speed."),
    live_days: float = typer.Option(2.0, min=0, help="Recent days played at --speed."),
    horizon_days: float = typer.Option(365.0, min=1, help="Simulated days after the backfill."),
    rate: float = typer.Option(500.0, min=0, help="Most events/s in the live phase; 0 = no cap."),
    speed: float = typer.Option(
        3600.0, min=0, help="Simulated seconds per wall second when live; 0 = as fast as rate."
    ),
    seed: int = typer.Option(0, help="Same seed, same users and events."),
    churn_share: float = typer.Option(0.3, min=0, max=1, help="Rough share of users who churn."),
    drift_at: float | None = typer.Option(
        None, help="Shift behaviour (a price change) this many simulated days after the start."
    ),
    replay: str | None = typer.Option(
        None,
        help="Replay a dataset instead of simulating: kdd2015, telco, NAME:PATH, a KDD course "
        "folder, a mapping file (.json/.toml), or a data file with --replay-config.",
    ),
    replay_speed: float = typer.Option(
        0.0, min=0, help="Replay pace in dataset days per second; 0 = as fast as possible."
    ),
    replay_config: str | None = typer.Option(
        None, help="Column mapping (JSON or TOML) for a generic CSV or JSON Lines file."
    ),
    limit_users: int | None = typer.Option(
        None, min=1, help="Replay only a random subset of this many users, chosen by --seed."
    ),
    report_outcomes: bool = typer.Option(
        False, help="Report true outcomes to the feedback API over HTTP, as a CRM would."
    ),
    report_share: float = typer.Option(
        0.5, min=0, max=1, help="Share of simulated users whose outcomes are reported."
    ),
    report_delay_s: float = typer.Option(
        600.0, min=0, help="Typical seconds from an outcome to its report (+-50%)."
    ),
    feedback_url: str | None = typer.Option(
        None, help="Feedback API base URL; default FEEDBACK_API_URL."
    ),
) -> None:
    """Simulate users (or replay a dataset) and publish their activity events."""
    settings, stopping = start_service("producer")
    serve_metrics(settings.producer_metrics_port)
    if replay is not None:
        config = Path(replay_config) if replay_config else None
        options = ReplayOptions(replay, config, speed_days_per_s=replay_speed,
                                limit_users=limit_users, seed=seed)
        client = _feedback_client(settings, feedback_url, stopping) if report_outcomes else None
        _replay(settings, stopping, options, client)
        return
    now = datetime.now(UTC)
    start = now - timedelta(days=backfill_days + live_days)
    live_from = now - timedelta(days=live_days)
    simulator = Simulator(
        users,
        start,
        backfill_days + live_days + horizon_days,
        seed=seed,
        churn_share=churn_share,
        drift_at=start + timedelta(days=drift_at) if drift_at is not None else None,
    )
    if report_outcomes:
        client = _feedback_client(settings, feedback_url, stopping)
        start_reporting(simulator, client, report_share, report_delay_s, stopping, seed)
    producer = make_producer(settings.bootstrap_servers)
    pacer = Pacer(live_from, rate_per_s=rate or None, speed=speed or None, stopping=stopping)
    log.info("producer started: %d users from %s, live from %s", users, start, live_from)
    sent = publish(
        simulator.events(), producer, settings.topic_activity, live_from, pacer, stopping
    )
    producer.close()
    log.info("producer stopped after %d events", sent)


def _feedback_client(
    settings: Settings, feedback_url: str | None, stopping: threading.Event
) -> FeedbackClient:
    key = settings.churn_api_key.get_secret_value() if settings.churn_api_key else None
    return FeedbackClient(feedback_url or settings.feedback_api_url, stopping, api_key=key)


def _replay(
    settings: Settings,
    stopping: threading.Event,
    options: ReplayOptions,
    client: FeedbackClient | None = None,
) -> None:
    producer = make_producer(settings.bootstrap_servers)
    report = replay_reporter(client, options.name_or_path) if client else log_outcomes
    try:
        run_replay(options, producer, settings.topic_activity, stopping, report)
    except ConfigurationError as exc:
        log.error("cannot replay %s: %s", options.name_or_path, exc)
        raise typer.Exit(2) from None
    finally:
        producer.close()


if __name__ == "__main__":
    app()
