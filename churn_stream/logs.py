"""One logging format for every service, configured once in each entry point."""

import logging
import os

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def configure_logging(level: str | None = None) -> None:
    """Configure the root logger; ``LOG_LEVEL`` in the environment wins over the default.

    A level that is not one of ``LEVELS`` ends the process with one error line, as any
    other setting that does not validate.
    """
    chosen = (level or os.environ.get("LOG_LEVEL") or "INFO").upper()
    if chosen not in LEVELS:
        logging.basicConfig(level="INFO", format=LOG_FORMAT, force=True)
        logging.getLogger(__name__).error("invalid setting LOG_LEVEL=%r: one of %s",
                                          chosen[:40], ", ".join(LEVELS))
        raise SystemExit(1)
    logging.basicConfig(level=chosen, format=LOG_FORMAT, force=True)
    # kafka-python logs every reconnect attempt at INFO/WARNING; keep the service lines readable.
    logging.getLogger("kafka").setLevel(max(logging.getLevelName(chosen), logging.WARNING))
    # Its event loop warns whenever compressing a large batch takes over 100 ms: not a fault.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
