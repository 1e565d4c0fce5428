"""Publishing events from a source (the simulator, or a replayed dataset) to Kafka."""

import logging
import threading
from collections.abc import Iterable
from datetime import datetime

from kafka import KafkaProducer
from prometheus_client import Counter

from churn_stream.events import Event
from churn_stream.pacing import Pacer

log = logging.getLogger(__name__)

EVENTS_PRODUCED = Counter("events_produced_total", "Events sent to user-activity", ["phase"])


def publish(
    events: Iterable[Event],
    producer: KafkaProducer,
    topic: str,
    live_from: datetime,
    pacer: Pacer,
    stopping: threading.Event,
) -> int:
    """Send events in order: those before ``live_from`` at once, the rest as ``pacer`` allows.

    Returns how many were sent. Everything sent is flushed before returning.
    """
    sent = 0
    live = False
    for event in events:
        if stopping.is_set():
            break
        if event.ts >= live_from:
            if not live:
                producer.flush()
                log.info("backfill done: %d events before %s; going live", sent, live_from)
                live = True
            if not pacer.wait_for(event.ts):
                break
        producer.send(topic, key=event.key(), value=event.to_bytes())
        EVENTS_PRODUCED.labels("live" if live else "backfill").inc()
        sent += 1
    producer.flush()
    return sent
