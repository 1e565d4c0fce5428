"""The API key that guards the write endpoints when ``CHURN_API_KEY`` is set."""

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader

API_KEY_HEADER = "X-API-Key"

_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="Needed when the "
                       "server has CHURN_API_KEY set.")


def require_api_key(
    request: Request, presented: Annotated[str | None, Depends(_header)]
) -> None:
    """Refuse the request with 401 unless it carries the configured key (if one is set)."""
    expected = request.app.state.settings.churn_api_key
    if expected is None:
        return
    # A constant-time comparison does not reveal how much of a guess was right.
    if presented is None or not hmac.compare_digest(
        presented.encode(), expected.get_secret_value().encode()
    ):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail=f"missing or wrong {API_KEY_HEADER} header",
            headers={"WWW-Authenticate": "ApiKey"},
        )
