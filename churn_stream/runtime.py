"""What every service does at start and stop: logging, the settings line, signals."""

import logging
import signal
import threading
from typing import Any, NoReturn

from prometheus_client import start_http_server

from churn_stream.errors import ChurnStreamError
from churn_stream.logs import configure_logging
from churn_stream.settings import Settings, get_settings

log = logging.getLogger(__name__)


def start_service(name: str) -> tuple[Settings, threading.Event]:
    """Configure logging, log the effective settings, and return them with a stop flag.

    SIGTERM and SIGINT set the flag; each service finishes what it has in hand and exits.
    A setting that does not validate ends the process (``refuse_to_start``).
    """
    configure_logging()
    try:
        settings = get_settings()
    except ChurnStreamError as exc:
        refuse_to_start(name, exc)
    log.info("%s settings: %s", name, settings.describe())
    stopping = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        log.info("%s stopping (%s)", name, signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return settings, stopping


def refuse_to_start(name: str, exc: ChurnStreamError) -> NoReturn:
    """Log why ``name`` cannot start as one error line, not a traceback, and exit with 1."""
    log.error("%s not started: %s", name, exc)
    raise SystemExit(1)


def serve_metrics(port: int) -> None:
    """Expose this process's Prometheus metrics on ``port``; 0 turns it off."""
    if port:
        start_http_server(port)
        log.info("metrics on :%d/metrics", port)
