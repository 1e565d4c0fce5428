"""``churn up``: the whole stack on one machine, each service a child process.

It starts the embedded broker when ``KAFKA_BOOTSTRAP_SERVERS`` is unset, creates the topics
and the schema, then starts the services with their log lines prefixed by name. Ctrl-C (or
``--duration``) stops them all: SIGTERM first, so each finishes its batch and commits.
"""

import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import typer

from churn_stream import storage
from churn_stream.broker import EmbeddedBroker
from churn_stream.errors import AlreadyRunning, ChurnStreamError
from churn_stream.kafka_io import ensure_topics
from churn_stream.logs import configure_logging
from churn_stream.ports import check_can_listen, listeners
from churn_stream.replay import open_replay
from churn_stream.settings import Settings, get_settings, mask_url

log = logging.getLogger("churn")
ROOT = Path(__file__).resolve().parents[1]
STOP_GRACE_S = 20.0
LOCK_NAME = ".churn-up.lock"
"""In the SQLite database's folder: held by a running ``churn up`` and its services."""

app = typer.Typer(add_completion=False, help="Run the churn-stream stack.")


@app.callback()
def _group() -> None:
    """Run the churn-stream stack."""


@dataclass
class Service:
    """A child process of ``churn up``."""

    name: str
    argv: list[str]
    process: subprocess.Popen[str] | None = None


def python_service(name: str, script: str, *args: str) -> Service:
    return Service(name, [sys.executable, "-u", str(ROOT / script), *args])


def dashboard_service(settings: Settings) -> Service:
    """The Streamlit dashboard, headless on loopback at ``dashboard_port``."""
    app_path = ROOT / "dashboard" / "app.py"
    return Service(
        "dashboard",
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            str(app_path),
            "--server.port",
            str(settings.dashboard_port),
            "--server.address",
            "127.0.0.1",
            "--server.headless",
            "true",
            "--browser.gatherUsageStats",
            "false",
        ],
    )


def plan_services(settings: Settings, producer_args: list[str]) -> list[Service]:
    """The services ``churn up`` runs, consumers first so that nothing waits on them."""
    return [
        python_service("consumer", "consumer.py"),
        python_service("predictor", "predictor.py"),
        python_service("feedback-api", "feedback_api.py"),
        python_service("feedback-loop", "feedback_loop.py"),
        dashboard_service(settings),
        python_service(
            "producer",
            "producer.py",
            *producer_args,
            "--report-outcomes",
            f"--feedback-url=http://127.0.0.1:{settings.feedback_api_port}",
        ),
    ]


@app.command()
def up(
    duration: float | None = typer.Option(None, min=1, help="Stop by itself after this many s."),
    users: int = typer.Option(500, min=1, help="Simulated users."),
    backfill_days: float = typer.Option(40.0, min=0, help="Days of history written at start."),
    rate: float = typer.Option(500.0, min=0, help="Most live events/s (a cap); 0 = no cap."),
    seed: int = typer.Option(0, help="Simulator seed."),
    drift_at: float | None = typer.Option(None, help="Simulated day of a behaviour shift."),
    replay: str | None = typer.Option(
        None, help="Replay a dataset instead of simulating: kdd2015, telco, or a file path."
    ),
    replay_speed: float = typer.Option(
        0.0, min=0, help="Replay pace in dataset days per second; 0 = as fast as possible."
    ),
    replay_config: str | None = typer.Option(None, help="Column mapping for a generic file."),
    limit_users: int | None = typer.Option(None, min=1, help="Replay a seeded subset of users."),
    keep_data: bool = typer.Option(
        False, "--keep-data",
        help="Keep the embedded SQLite database of an earlier run (it is set aside otherwise).",
    ),
) -> None:
    """Start the broker if needed, create topics and tables, run every service."""
    configure_logging()
    producer_args = [f"--seed={seed}"]
    if replay is None:
        producer_args += [f"--users={users}", f"--backfill-days={backfill_days}", f"--rate={rate}"]
        if drift_at is not None:
            producer_args.append(f"--drift-at={drift_at}")
    else:
        producer_args += [f"--replay={replay}", f"--replay-speed={replay_speed}"]
        if replay_config:
            producer_args.append(f"--replay-config={replay_config}")
        if limit_users:
            producer_args.append(f"--limit-users={limit_users}")
    try:
        settings = get_settings()
        if replay is not None:
            open_replay(replay, Path(replay_config) if replay_config else None)
        # Every check that can refuse the start comes before data/ is touched: a refused
        # start used to set the running stack's database aside first.
        with running_alone(settings) as lock_fd:
            for listener in listeners(settings).values():
                check_can_listen(listener)
            if not keep_data:
                set_aside_previous_run(settings)
            failed = _up(settings, producer_args, duration, lock_fd)
    except ChurnStreamError as exc:
        # A known failure (a bad setting, a taken port, no broker) is one line, not a traceback.
        log.error("%s", exc)
        raise typer.Exit(1) from None
    if failed:
        raise typer.Exit(1)


@contextmanager
def running_alone(settings: Settings) -> Iterator[int]:
    """Hold the lock of the data folder for the life of a run; yields the lock's descriptor.

    ``AlreadyRunning`` if another ``churn up``, or a service one started, holds it. The lock
    is ``flock``'s, so it ends with the last process holding the file, however that ends,
    and a lock file left behind by a run that died holds nothing.
    """
    folder = settings.sqlite_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK_NAME).open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise AlreadyRunning(
                f"another `churn up` (pid {holder}) or a service it started is running on "
                f"{folder}/: stop it first, or give this one its own SQLITE_PATH, "
                "EMBEDDED_BROKER_PORT and service ports"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield lock.fileno()


def set_aside_previous_run(settings: Settings) -> Path | None:
    """Move the embedded SQLite database of an earlier run to ``*.previous.db``.

    A new run's simulated users have the old run's ids, and mixing two histories of the same
    users (each ending "now") gives a model no better than chance. Only the embedded default
    is moved; a configured database is the user's and is never touched.
    """
    if not settings.uses_embedded_database:
        return None
    path = settings.sqlite_path
    if not path.exists() or path.stat().st_size == 0:
        return None
    aside = path.with_name(f"{path.stem}.previous{path.suffix}")
    for suffix in ("", "-wal", "-shm"):
        source = path.with_name(path.name + suffix)
        target = aside.with_name(aside.name + suffix)
        target.unlink(missing_ok=True)
        if source.exists():
            source.rename(target)
    log.info("set the earlier run's database aside as %s (--keep-data keeps it in place)", aside)
    return aside


def _up(settings: Settings, producer_args: list[str], duration: float | None,
        lock_fd: int) -> bool:
    """Run the stack, each service holding the data folder's lock too; True if one failed."""
    with ExitStack() as stack:
        env = dict(os.environ)
        if settings.uses_embedded_broker:
            broker = stack.enter_context(EmbeddedBroker(settings.embedded_broker_port))
            env["KAFKA_BOOTSTRAP_SERVERS"] = broker.bootstrap_servers
            log.info(
                "embedded broker for local use only; set KAFKA_BOOTSTRAP_SERVERS in production"
            )
        ensure_topics(settings)
        engine = storage.make_engine(settings.resolved_database_url())
        storage.create_schema(engine)
        engine.dispose()
        services = plan_services(settings, producer_args)
        _print_directions(settings, services)
        return _run(services, env, duration, lock_fd)


def _print_directions(settings: Settings, services: list[Service]) -> None:
    log.info("broker:    %s", settings.bootstrap_servers)
    log.info("database:  %s", mask_url(settings.resolved_database_url()))
    log.info("consumer metrics   http://127.0.0.1:%d/metrics", settings.consumer_metrics_port)
    log.info("producer metrics   http://127.0.0.1:%d/metrics", settings.producer_metrics_port)
    log.info(
        "predictor          http://127.0.0.1:%d/model (/health /predict/{user_id} /metrics)",
        settings.predictor_port,
    )
    log.info("feedback API       http://127.0.0.1:%d/docs", settings.feedback_api_port)
    log.info("feedback loop      http://127.0.0.1:%d/metrics", settings.feedback_loop_metrics_port)
    log.info("dashboard          http://127.0.0.1:%d", settings.dashboard_port)
    log.info("services:  %s; Ctrl-C stops them all", ", ".join(s.name for s in services))


def _run(services: list[Service], env: dict[str, str], duration: float | None,
         lock_fd: int) -> bool:
    stopping = threading.Event()
    failed = False
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    for service in services:
        _start(service, env, lock_fd)
    deadline = time.monotonic() + duration if duration else None
    while not stopping.wait(0.5):
        if deadline and time.monotonic() > deadline:
            log.info("--duration reached")
            break
        for service in services:
            if service.process and service.process.poll() not in (None, 0):
                log.error("%s exited with code %s", service.name, service.process.returncode)
                failed = True
                stopping.set()
    _stop_all(services)
    return failed


def _start(service: Service, env: dict[str, str], lock_fd: int) -> None:
    service.process = subprocess.Popen(
        service.argv,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # Ctrl-C reaches us only; we stop the children in order.
        # A service outliving a killed ``churn up`` still uses the database: it keeps the
        # data folder locked until it ends.
        pass_fds=(lock_fd,),
    )
    threading.Thread(target=_relay, args=(service,), daemon=True).start()
    log.info("started %s (pid %d)", service.name, service.process.pid)


def _relay(service: Service) -> None:
    assert service.process and service.process.stdout
    width = 14
    for line in service.process.stdout:
        sys.stdout.write(f"{service.name:<{width}}| {line}")
        sys.stdout.flush()


def _stop_all(services: list[Service]) -> None:
    log.info("stopping %d services", len(services))
    # Producers first, so the consumers get to drain what was sent.
    for service in reversed(services):
        if service.process and service.process.poll() is None:
            service.process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for service in reversed(services):
        if not service.process:
            continue
        try:
            service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", service.name, STOP_GRACE_S)
            service.process.kill()
            service.process.wait()
    log.info("all services stopped")


def main() -> None:
    """The ``churn`` console script."""
    app()
