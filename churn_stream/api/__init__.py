"""The feedback API: true outcomes in, scores out (FastAPI)."""

from churn_stream.api.app import create_app

__all__ = ["create_app"]
