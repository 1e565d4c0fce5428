"""``python -m bench`` (``make bench``): run the benchmarks, print the table, write it to
``bench/results.md``. ``--only`` picks benchmarks, ``--runs`` the runs per figure."""

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench import (
    cold_start,
    ingest,
    latency,
    machine,
    memory,
    predict,
    report,
    retrain,
    throughput,
)
from bench.common import Context, Figure, Sizes
from bench.data import simulated

log = logging.getLogger("bench")
BENCHMARKS = {
    "memory": memory.run,
    "ingest": ingest.run,
    "throughput": throughput.run,
    "latency": latency.run,
    "predict": predict.run,
    "retrain": retrain.run,
    "cold_start": cold_start.run,
}
RESULTS = Path(__file__).with_name("results.md")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated benchmarks out of {', '.join(BENCHMARKS)}")
    parser.add_argument("--runs", type=int, default=Sizes.runs, help="runs per figure")
    parser.add_argument("--users", type=int, default=10_000, help="simulated users")
    parser.add_argument("--days", type=int, default=60, help="days of stored history")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file")
    parser.add_argument("--profile", action="store_true",
                        help="add one pyinstrument-profiled run per benchmark (bench/profiles/)")
    return parser.parse_args(argv)


def start_broker():
    """Apache Kafka from the test jars, or the broker ``KAFKA_BOOTSTRAP_SERVERS`` names."""
    from tests.brokers import ApacheKafka, External

    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return External(os.environ["KAFKA_BOOTSTRAP_SERVERS"]).start()
    if not ApacheKafka.available():
        sys.exit("benchmarks need Apache Kafka: run `make kafka-jars` (Java and Maven), or set "
                 "KAFKA_BOOTSTRAP_SERVERS; the embedded Tansu broker is too slow to measure")
    return ApacheKafka().start()


def run_all(ctx: Context, names: list[str]) -> tuple[list[Figure], dict[str, str]]:
    """Each named benchmark in turn; one that fails shows as failed, the others still run."""
    figures: list[Figure] = []
    loads: dict[str, str] = {}
    for name in names:
        loads[name] = machine.load_average()
        log.info("benchmark %s starting (load %s)", name, loads[name])
        started = time.monotonic()
        try:
            figures.extend(BENCHMARKS[name](ctx))
        except Exception as exc:  # one broken benchmark must not hide the others
            log.error("benchmark %s failed", name, exc_info=True)
            figures.append(Figure(f"{name} (failed: {type(exc).__name__}: {exc})", "", "", []))
        log.info("benchmark %s took %.0f s", name, time.monotonic() - started)
    loads["end"] = machine.load_average()
    return figures, loads


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        sys.exit(f"unknown benchmarks {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "httpx", "churn_stream.drift", "churn_stream.predictor.drift_watch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # SIGTERM unwinds like Ctrl-C, so that the broker and the child processes are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))
    sizes = Sizes(runs=args.runs)
    dataset = simulated(args.users, args.days)
    broker = start_broker()
    work_dir = Path(tempfile.mkdtemp(prefix="churn-bench-"))
    try:
        ctx = Context(broker.bootstrap_servers, broker.kind, dataset, sizes, work_dir,
                      profile=args.profile)
        figures, loads = run_all(ctx, names)
    finally:
        broker.close()
        shutil.rmtree(work_dir, ignore_errors=True)
    described = (f"{dataset.users:,} simulated users, {dataset.days} days of history "
                 f"({dataset.history_events:,} events in SQLite), the next day as the stream")
    command = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report.document(figures, machine.describe(broker.kind), loads, command.strip(),
                           sizes.runs, described)
    args.out.write_text(text)
    print(report.table(figures))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
