"""The machine a bench run measured: cores, memory, CPU, Python, libraries, broker, load."""

import os
import platform
import sqlite3
import subprocess
from importlib import metadata
from pathlib import Path

LIBRARIES = ("kafka-python", "SQLAlchemy", "pydantic", "numpy", "pandas", "scikit-learn",
             "xgboost-cpu", "tensorflow-cpu", "keras", "fastapi", "uvicorn")
JARS = Path(__file__).resolve().parents[1] / "tests" / "kafka" / "target" / "jars"


def describe(broker_kind: str) -> dict[str, str]:
    """What the results file says about the machine."""
    return {
        "cores": f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable by this process)",
        "memory": f"{_mem_total_gib():.1f} GiB",
        "CPU": _cpu_model(),
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "SQLite": sqlite3.sqlite_version,
        "libraries": ", ".join(f"{name} {_version(name)}" for name in LIBRARIES),
        "broker": f"{broker_kind}{_kafka_version()}, one node on loopback",
        "Java": _java_version(),
    }


def load_average() -> str:
    """``os.getloadavg()``: other work on the machine while the figures were taken."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def _mem_total_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def _kafka_version() -> str:
    jars = sorted(JARS.glob("kafka-server-[0-9]*.jar"))
    return f" {jars[0].stem.removeprefix('kafka-server-')}" if jars else ""


def _java_version() -> str:
    try:
        done = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "absent"
    lines = (done.stderr or done.stdout).splitlines()
    return lines[0] if lines else "unknown"
