"""Where each service listens, and whether it can listen there, asked before anything starts.

A service that found its port taken only once it had started failed deep inside uvicorn or
Prometheus' server, with a traceback; asked first, the answer is one line naming the setting.
"""

import errno
import socket
from dataclasses import dataclass

from churn_stream.errors import ConfigurationError
from churn_stream.settings import Settings

ALL_INTERFACES = "0.0.0.0"
"""Where Prometheus' ``start_http_server`` binds a metrics port."""
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Listener:
    """A host and port a service listens on, with the settings that choose them."""

    host: str
    port: int
    port_setting: str
    host_setting: str | None = None
    """None when the host is fixed (loopback, or every interface for metrics)."""

    def __str__(self) -> str:
        settings = ", ".join(filter(None, (self.host_setting, self.port_setting)))
        return f"{self.host}:{self.port} ({settings})"


def listeners(settings: Settings) -> dict[str, Listener]:
    """Every address the services of ``churn up`` listen on, by service; the embedded
    broker's, when it runs, comes last."""
    found = {
        "predictor": Listener(settings.predictor_http_host, settings.predictor_port,
                              "PREDICTOR_PORT", "PREDICTOR_HTTP_HOST"),
        "feedback API": Listener(settings.feedback_api_host, settings.feedback_api_port,
                                 "FEEDBACK_API_PORT", "FEEDBACK_API_HOST"),
        "dashboard": Listener(LOOPBACK, settings.dashboard_port, "DASHBOARD_PORT"),
        "consumer metrics": Listener(ALL_INTERFACES, settings.consumer_metrics_port,
                                     "CONSUMER_METRICS_PORT"),
        "producer metrics": Listener(ALL_INTERFACES, settings.producer_metrics_port,
                                     "PRODUCER_METRICS_PORT"),
        "feedback loop metrics": Listener(ALL_INTERFACES, settings.feedback_loop_metrics_port,
                                          "FEEDBACK_LOOP_METRICS_PORT"),
    }
    if settings.uses_embedded_broker:
        found["embedded broker"] = Listener(LOOPBACK, settings.embedded_broker_port,
                                            "EMBEDDED_BROKER_PORT")
    return found


def check_can_listen(listener: Listener) -> None:
    """Raise ``ConfigurationError`` naming the settings unless ``listener`` can listen now.

    The check binds and closes at once, with ``SO_REUSEADDR`` as uvicorn, Prometheus and
    Streamlit set it: a port that only lingers from a closed connection passes, a port where
    something listens does not, and port 0 (off, or any free port) always does. Something may
    still take the port before the service binds it.
    """
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            listener.host, listener.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ConfigurationError(
            f"{listener.host_setting}={listener.host!r} does not resolve ({exc.strerror}): "
            f"set it to an address of this machine, such as {LOOPBACK}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigurationError(_why_not(listener, exc)) from None


def _why_not(listener: Listener, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"{listener} is in use: stop what listens there, or set "
                f"{listener.port_setting} to a free port")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"{listener.host_setting}={listener.host!r} is not an address of this "
                f"machine: set it to one, such as {LOOPBACK}")
    return f"cannot listen on {listener}: {exc.strerror}"
