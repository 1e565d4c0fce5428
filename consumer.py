"""Consumer service: ``user-activity`` into the ``user_activity`` table, nothing lost.

Group ``churn-consumer``. Invalid records go to ``user-activity.dlq`` with the reason in
the headers and the original bytes as the value. Offsets are committed only after the
database transaction commits; see ``churn_stream.ingest`` for the ordering argument.
"""

import logging

from churn_stream import storage
from churn_stream.ingest import ActivityIngestor
from churn_stream.kafka_io import ensure_topics, make_consumer, make_producer
from churn_stream.runtime import serve_metrics, start_service

log = logging.getLogger("consumer")


def main() -> None:
    settings, stopping = start_service("consumer")
    serve_metrics(settings.consumer_metrics_port)
    if not ensure_topics(settings, stopping=stopping):
        return
    engine = storage.make_engine(settings.resolved_database_url())
    storage.create_schema(engine)
    consumer = make_consumer(
        settings.bootstrap_servers,
        settings.consumer_group,
        settings.topic_activity,
        max_poll_records=settings.batch_max_records,
    )
    ingestor = ActivityIngestor(
        consumer,
        make_producer(settings.bootstrap_servers),
        engine,
        settings.topic_dead_letter,
        settings.max_event_ahead_s,
        settings.batch_max_wait_ms,
        settings.batch_max_records,
    )
    ingestor.stopping = stopping
    log.info("consumer started: %s -> user_activity", settings.topic_activity)
    try:
        ingestor.run()
    finally:
        consumer.close(autocommit=False)
        ingestor.dlq_producer.close()
        log.info("consumer stopped")


if __name__ == "__main__":
    main()
