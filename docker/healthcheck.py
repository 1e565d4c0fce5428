"""Container health check: ``python docker/healthcheck.py [SERVICE]``; exit 0 when healthy.

Each service is probed on its own port from ``churn_stream.settings``: the HTTP APIs on
``/health``, the workers on their Prometheus ``/metrics``, the dashboard on Streamlit's
``/_stcore/health``. Without SERVICE the check reads the container's main command line, so
the image's one HEALTHCHECK fits every service it runs.
"""

import sys
import urllib.error
import urllib.request
from pathlib import Path

from churn_stream.settings import Settings, get_settings

TIMEOUT_S = 4.0
ONE_SHOT = ("mssql_config.py",)


def probe_url(service: str, settings: Settings) -> str:
    """The URL that answers 200 while ``service`` is healthy."""
    probes = {
        "consumer": (settings.consumer_metrics_port, "/metrics"),
        "producer": (settings.producer_metrics_port, "/metrics"),
        "predictor": (settings.predictor_port, "/health"),
        "feedback-api": (settings.feedback_api_port, "/health"),
        "feedback-loop": (settings.feedback_loop_metrics_port, "/metrics"),
        "dashboard": (settings.dashboard_port, "/_stcore/health"),
    }
    if service not in probes:
        raise SystemExit(f"no health probe for service {service!r}; known: {', '.join(probes)}")
    port, path = probes[service]
    return f"http://127.0.0.1:{port}{path}"


def service_of(argv: list[str]) -> str | None:
    """The service a command line runs: ``predictor`` for ``python predictor.py``, etc."""
    if any(Path(arg).name == "streamlit" or arg == "streamlit" for arg in argv):
        return "dashboard"
    for arg in argv:
        name = Path(arg).name
        if name in ONE_SHOT:
            return None
        if name.endswith(".py"):
            return name.removesuffix(".py").replace("_", "-")
    raise SystemExit(f"cannot tell the service from the command {' '.join(argv)!r}")


def main_command() -> list[str]:
    """The command line of the container's main process (PID 1)."""
    raw = Path("/proc/1/cmdline").read_bytes()
    return [part.decode() for part in raw.split(b"\0") if part]


def main() -> int:
    """Probe the service; 0 if it answered 200, 1 otherwise."""
    service = sys.argv[1] if len(sys.argv) > 1 else service_of(main_command())
    if service is None:
        return 0  # a one-shot job: its exit code is its health
    url = probe_url(service, get_settings())
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310 - loopback
            healthy = response.status == 200
    except (urllib.error.URLError, OSError) as error:
        sys.stderr.write(f"{service}: {url} did not answer: {error}\n")
        return 1
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
