"""The Kafka clients as the services build them, against the real test broker."""

import pytest
from kafka import TopicPartition

from churn_stream.errors import BrokerUnavailable
from churn_stream.kafka_io import ensure_topics, make_consumer, subscribe_when_known
from churn_stream.settings import Settings
from tests.conftest import wait_until


@pytest.mark.timeout(120)
def test_a_fresh_group_member_is_assigned_every_partition(settings: Settings) -> None:
    ensure_topics(settings)
    consumer = make_consumer(settings.bootstrap_servers, settings.consumer_group,
                             settings.topic_activity)
    try:
        assert wait_until(lambda: consumer.poll(timeout_ms=100) is not None
                          and bool(consumer.assignment()), 30)
        expected = {TopicPartition(settings.topic_activity, p)
                    for p in range(settings.topic_partitions)}
        assert consumer.assignment() == expected
    finally:
        consumer.close(autocommit=False)


@pytest.mark.timeout(60)
def test_subscribing_to_a_topic_without_partitions_names_it(settings: Settings) -> None:
    consumer = make_consumer(settings.bootstrap_servers, settings.consumer_group)
    try:
        with pytest.raises(BrokerUnavailable, match=settings.topic_activity):
            subscribe_when_known(consumer, [settings.topic_activity], timeout_s=2)
        assert consumer.subscription() is None
    finally:
        consumer.close(autocommit=False)
