"""A SIGTERM stops a service at once even while it waits for a broker that is not there."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.brokers import free_port
from tests.conftest import ROOT, wait_until

SERVICES = ["predictor.py", "consumer.py", "feedback_loop.py"]
STOP_WITHIN_S = 10.0
"""Generous for a loaded machine: a stop takes about 2 s here (one 2 s connection attempt)."""


class Output:
    """A child's output lines, read on a thread so that the child never blocks on its pipe."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.reader.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line)

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def __str__(self) -> str:
        self.reader.join(5.0)
        return "".join(self.lines)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script", SERVICES)
def test_sigterm_stops_a_service_waiting_for_the_broker(tmp_path: Path, script: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LOG_LEVEL"} | {
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",  # nothing listens there
        "DATABASE_URL": f"sqlite:///{tmp_path / 'churn.db'}",
        "PREDICTOR_PORT": str(free_port()),
        "CONSUMER_METRICS_PORT": "0",
        "FEEDBACK_LOOP_METRICS_PORT": "0",
    }
    process = subprocess.Popen([sys.executable, "-u", str(ROOT / script)], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = Output(process)
    try:
        assert wait_until(lambda: output.has("settings:"), 60), str(output)
        time.sleep(3)  # well into the retries of a broker that does not answer
        asked = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(STOP_WITHIN_S)
        took_s = time.monotonic() - asked
    finally:
        process.kill()
        process.wait()
    assert code == 0, str(output)
    assert "Traceback" not in str(output), str(output)
    assert output.has("stopping (SIGTERM)")
    print(f"{script} stopped {took_s:.1f} s after SIGTERM")
