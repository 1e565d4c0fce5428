"""Feedback API service: true outcomes in over HTTP, scores out (FastAPI on uvicorn).

Swagger UI at ``/docs``, the OpenAPI schema at ``/openapi.json``. The application itself
lives in ``churn_stream.api``; this script only serves it.

    python feedback_api.py          # http://127.0.0.1:8001/docs
"""

import ipaddress
import logging

import uvicorn

from churn_stream.api import create_app
from churn_stream.errors import ChurnStreamError, ConfigurationError
from churn_stream.logs import configure_logging
from churn_stream.runtime import refuse_to_start
from churn_stream.settings import Settings, get_settings

log = logging.getLogger("feedback_api")


def check_exposure(settings: Settings) -> None:
    """Refuse to accept writes from the network without an API key."""
    host = settings.feedback_api_host
    if settings.churn_api_key is None and not _is_loopback(host):
        raise ConfigurationError(
            f"FEEDBACK_API_HOST={host} exposes the write endpoints beyond this machine: "
            "set CHURN_API_KEY, or bind 127.0.0.1"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main() -> None:
    configure_logging()
    try:
        serve(get_settings())
    except ChurnStreamError as exc:
        # A known failure (a bad setting, an exposed host without a key) is one line.
        refuse_to_start("feedback API", exc)


def serve(settings: Settings) -> None:
    """Serve the API until SIGTERM or SIGINT."""
    log.info("feedback-api settings: %s", settings.describe())
    check_exposure(settings)
    log.info("feedback API on http://%s:%d/docs", settings.feedback_api_host,
             settings.feedback_api_port)
    # uvicorn handles SIGTERM itself: it stops accepting, finishes requests, runs the
    # app's shutdown (which stops the outbox publisher) and returns.
    uvicorn.run(
        create_app(settings),
        host=settings.feedback_api_host,
        port=settings.feedback_api_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    log.info("feedback API stopped")


if __name__ == "__main__":
    main()
