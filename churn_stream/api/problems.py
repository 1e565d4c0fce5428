"""Error answers: every failure is a ``Problem`` body, and bad input is always a 4xx.

FastAPI's own 422 body echoes the offending input, which can hold ``NaN`` that JSON cannot
encode (the reply would become a 500); ours names each field and says what is wrong, and
never echoes values.
"""

import logging
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.routing import Match

from churn_stream.api.metrics import ERRORS
from churn_stream.api.schemas import FieldError, Problem

log = logging.getLogger(__name__)

ERROR_KINDS = {401: "auth", 404: "not_found", 409: "conflict", 413: "too_large"}


def field_errors(errors: list[Any], prefix: str = "") -> list[FieldError]:
    """Pydantic's error list as ``FieldError`` rows, without the input values."""
    rows = []
    for error in errors:
        where = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "")
        rows.append(FieldError(field=where or "body", message=error["msg"], type=error["type"]))
    return rows


def validation_problem(exc: ValidationError, prefix: str = "") -> list[FieldError]:
    """The field errors of a ``ValidationError`` raised by a model check."""
    return field_errors(exc.errors(include_url=False, include_input=False), prefix)


def _answer(code: int, problem: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(problem.model_dump(), status_code=code, headers=headers)


def problem_response(
    code: int, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error answer with ``detail``, counted; for middleware, which no handler reaches."""
    ERRORS.labels(ERROR_KINDS.get(code, "http")).inc()
    return _answer(code, Problem(detail=detail), headers)


async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
    ERRORS.labels("validation").inc()
    errors = field_errors(list(exc.errors()))
    summary = "; ".join(f"{e.field}: {e.message}" for e in errors[:5])
    return _answer(422, Problem(detail=f"invalid request: {summary}", errors=errors))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    headers = dict(exc.headers or {})
    if exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return problem_response(exc.status_code, str(exc.detail), headers)


def _allowed_methods(request: Request) -> list[str]:
    # Starlette names only the first route matching the path, but /feedback has two.
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


async def _database_down(request: Request, exc: sa.exc.OperationalError) -> JSONResponse:
    ERRORS.labels("database").inc()
    log.warning("database unavailable during %s %s: %s", request.method,
                request.url.path, exc.orig)
    return _answer(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        Problem(detail="the database is unavailable; nothing was stored, retry later"),
        {"Retry-After": "5"},
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    ERRORS.labels("internal").inc()
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return _answer(500, Problem(detail="internal error; it has been logged"))


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error with a ``Problem`` body."""
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(sa.exc.OperationalError, _database_down)
    app.add_exception_handler(Exception, _unexpected)
