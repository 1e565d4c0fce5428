"""Prometheus metrics of the feedback API; labels carry route templates, never user ids."""

from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "feedback_api_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
REQUEST_SECONDS = Histogram(
    "feedback_api_request_seconds", "Seconds to answer a request", ["method", "route"]
)
FEEDBACK_RECEIVED = Counter(
    "feedback_received_total", "Feedback items received", ["status"]
)
ERRORS = Counter("feedback_api_errors_total", "Requests answered with an error", ["kind"])
