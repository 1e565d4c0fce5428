"""Retrain commands from ``model-control``, obeyed by every predictor instance.

Each instance reads every partition of the topic itself, outside any consumer group, from
the end as it was at start: a command is for the predictors running when it is sent.
``request_id`` makes a command seen twice act once.
"""

import logging
import time
from collections.abc import Callable

from kafka import KafkaConsumer, TopicPartition

from churn_stream.control import parse_control
from churn_stream.errors import InvalidCommand

log = logging.getLogger(__name__)
POLL_EVERY_S = 1.0


class ControlListener:
    """Polls ``model-control`` now and then and asks for the retrains it commands."""

    def __init__(self, consumer: KafkaConsumer, topic: str,
                 request_retrain: Callable[[str], object]) -> None:
        self.consumer = consumer
        self.topic = topic
        self.request_retrain = request_retrain
        self.seen: set[str] = set()
        self._last_poll_s = 0.0
        self._listen_from_end()

    def _listen_from_end(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        partitions = self.consumer.partitions_for_topic(self.topic)
        while not partitions and time.monotonic() < deadline:
            time.sleep(0.2)
            partitions = self.consumer.partitions_for_topic(self.topic)
        if not partitions:
            raise RuntimeError(f"topic {self.topic} has no partitions; create it first")
        assigned = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self.consumer.assign(assigned)
        self.consumer.seek_to_end(*assigned)
        # The seek is lazy: resolve it now, so that commands sent from here on are seen.
        offsets = {tp.partition: self.consumer.position(tp) for tp in assigned}
        log.info("listening for commands on %s from offsets %s", self.topic, offsets)

    def poll(self) -> int:
        """Act on the commands that arrived; at most one broker round trip a second."""
        if time.monotonic() - self._last_poll_s < POLL_EVERY_S:
            return 0
        self._last_poll_s = time.monotonic()
        acted = 0
        for records in self.consumer.poll(timeout_ms=0).values():
            for record in records:
                acted += self._obey(record.value, record.offset)
        return acted

    def _obey(self, raw: bytes | None, offset: int) -> int:
        try:
            command = parse_control(raw)
        except InvalidCommand as exc:
            log.warning("skipping invalid command at %s offset %d: %s", self.topic, offset, exc)
            return 0
        if str(command.request_id) in self.seen:
            return 0
        self.seen.add(str(command.request_id))
        log.info("retrain commanded: request %s, reason %s (%s)", command.request_id,
                 command.reason, command.detail)
        self.request_retrain(command.reason)
        return 1

    def close(self) -> None:
        """Leave the topic."""
        self.consumer.close(autocommit=False)
