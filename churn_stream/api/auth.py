"""The API key that guards the write endpoints when ``CHURN_API_KEY`` is set."""

import hmac

from fastapi.security import APIKeyHeader
from pydantic import SecretStr

API_KEY_HEADER = "X-API-Key"

# Declares the header in the OpenAPI schema only. The check itself is ``RequestGuard``'s:
# FastAPI reads and parses the body before it runs any dependency, too late to refuse cheaply.
documented_key = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="Needed when "
                              "the server has CHURN_API_KEY set.")


def key_matches(expected: SecretStr | None, presented: str | None) -> bool:
    """Whether a request may write: no key is configured, or it presents that key."""
    if expected is None:
        return True
    # A constant-time comparison does not reveal how much of a guess was right.
    return presented is not None and hmac.compare_digest(
        presented.encode(), expected.get_secret_value().encode()
    )
