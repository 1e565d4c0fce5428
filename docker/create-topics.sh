#!/bin/sh
# Create churn-stream's topics on the compose Kafka before any service starts.
# Arguments are NAME:PARTITIONS; --if-not-exists makes a restart harmless, and the services'
# own ensure_topics() finds them in place. tests/test_docker.py checks the list against
# churn_stream/settings.py.
set -eu
bootstrap="${BOOTSTRAP:-kafka:9092}"
for spec in "$@"; do
    name="${spec%%:*}"
    partitions="${spec##*:}"
    /opt/kafka/bin/kafka-topics.sh --bootstrap-server "$bootstrap" --create --if-not-exists \
        --topic "$name" --partitions "$partitions" --replication-factor 1
done
/opt/kafka/bin/kafka-topics.sh --bootstrap-server "$bootstrap" --list
