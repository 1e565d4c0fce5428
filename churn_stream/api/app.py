"""The feedback API application, built by ``create_app`` so that tests choose its settings."""

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import sqlalchemy as sa
from fastapi import FastAPI, Request, Response, status
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from churn_stream import storage
from churn_stream.api import feedback_routes, read_routes
from churn_stream.api.guard import RequestGuard
from churn_stream.api.metrics import REQUEST_SECONDS, REQUESTS
from churn_stream.api.problems import install_problem_handlers
from churn_stream.api.schemas import Health
from churn_stream.broker import port_open
from churn_stream.outbox import OutboxPublisher, pending_count
from churn_stream.settings import Settings

log = logging.getLogger(__name__)

KNOWN_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}
DESCRIPTION = """
True churn outcomes reported by a CRM, and the scores the predictor stored.

Write endpoints need the `X-API-Key` header when the server has `CHURN_API_KEY` set; it is
checked before the body is read. A body larger than `FEEDBACK_MAX_BODY_BYTES` (1 MiB unless
configured) is refused with 413, also before it is read.
Bad input, JSON that does not parse included, is answered with 422 and a list of the fields
at fault.
"""


def create_app(
    settings: Settings, engine: sa.Engine | None = None, publish: bool = True
) -> FastAPI:
    """The API on ``engine`` (made from ``settings`` if None), schema created.

    ``publish`` runs the outbox publisher while the app is up (between lifespan start and
    stop); without it feedback is only stored.
    """
    owns_engine = engine is None
    engine = engine or storage.make_engine(settings.resolved_database_url())
    storage.create_schema(engine)
    # A pool of its own keeps /health answering while every writer's connection is busy.
    health_engine = storage.make_engine(
        engine.url.render_as_string(hide_password=False), pool_size=1, max_overflow=1,
        pool_timeout=2,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if publish:
            app.state.outbox = OutboxPublisher(
                engine, settings.bootstrap_servers, settings.topic_feedback,
                settings.outbox_interval_s, settings.outbox_batch_max,
            ).start()
            app.state.outbox.wake()
        yield
        if app.state.outbox is not None:
            app.state.outbox.stop()
        health_engine.dispose()
        if owns_engine:
            engine.dispose()

    app = FastAPI(title="churn-stream feedback API", version="1.0", description=DESCRIPTION,
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.health_engine = health_engine
    app.state.outbox = None
    install_problem_handlers(app)
    # Added first, so it runs inside the request counter: refusals are counted too.
    app.add_middleware(RequestGuard, api_key=settings.churn_api_key,
                       max_body_bytes=settings.feedback_max_body_bytes)
    app.middleware("http")(_count_requests)
    app.include_router(feedback_routes.router)
    app.include_router(read_routes.router)
    app.add_api_route("/health", _health, methods=["GET"], tags=["operations"],
                      responses={503: {"model": Health, "description": "A dependency is down"}})
    app.add_api_route("/metrics", _metrics, methods=["GET"], tags=["operations"],
                      response_class=PlainTextResponse)
    return app


def _health(request: Request, response: Response) -> Health:
    """Whether the database and the broker are reachable, and how much feedback waits."""
    engine: sa.Engine = request.app.state.health_engine
    try:
        pending: int | None = pending_count(engine)
        database_ok = True
    except sa.exc.SQLAlchemyError as exc:
        log.warning("health: database unreachable: %s", type(exc).__name__)
        pending, database_ok = None, False
    broker_ok = _broker_reachable(request.app.state.settings.bootstrap_servers)
    healthy = database_ok and broker_ok
    if not healthy:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Health(
        status="ok" if healthy else "degraded",
        database="ok" if database_ok else "unreachable",
        broker="ok" if broker_ok else "unreachable",
        pending_feedback=pending,
    )


def _broker_reachable(bootstrap_servers: str) -> bool:
    for address in bootstrap_servers.split(","):
        host, _, port = address.strip().rpartition(":")
        if port.isdigit() and port_open(host.strip("[]") or "127.0.0.1", int(port), 0.5):
            return True
    return False


def _metrics() -> Response:
    """This process's metrics in the Prometheus text format."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def _count_requests(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    started = time.perf_counter()
    code = 500
    try:
        response = await call_next(request)
        code = response.status_code
        return response
    finally:
        # The route template, never the raw path: user ids must not become label values.
        route = getattr(request.scope.get("route"), "path_format", "unmatched")
        method = request.method if request.method in KNOWN_METHODS else "OTHER"
        REQUESTS.labels(method, route, str(code)).inc()
        REQUEST_SECONDS.labels(method, route).observe(time.perf_counter() - started)
