"""Commands to the predictors on topic ``model-control``: for now, "retrain".

Every predictor instance must obey every command, so a predictor reads this topic in a
consumer group of its own (one per instance) or with no group at all, never in the shared
``churn-predictor`` group that splits partitions. ``request_id`` lets an instance that sees a
command twice (a redelivery after a crash) act on it once.
"""

import logging
import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from churn_stream.errors import InvalidCommand

log = logging.getLogger(__name__)

RetrainReason = Literal["feedback", "schedule"]
"""Why a retrain is asked for; the predictor records it as the run's ``reason``."""
MAX_COMMAND_BYTES = 16 * 1024


class RetrainCommand(BaseModel):
    """Ask every predictor to retrain now, with the labelled outcomes reported so far."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: Literal["retrain"] = "retrain"
    reason: RetrainReason
    requested_at: Annotated[AwareDatetime, AfterValidator(lambda v: v.astimezone(UTC))] = Field(
        default_factory=lambda: datetime.now(UTC)
    )
    request_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    detail: str = Field("", max_length=500)
    """What triggered the request, for the predictor's log line."""

    def to_bytes(self) -> bytes:
        """The wire form: compact UTF-8 JSON."""
        return self.model_dump_json().encode()


def parse_control(raw: bytes | None) -> RetrainCommand:
    """Decode one ``model-control`` record, or raise ``InvalidCommand`` saying why.

    >>> parse_control(b'{"command": "retrain", "reason": "feedback"}').reason
    'feedback'
    """
    if raw is None:
        raise InvalidCommand("record has no value")
    if len(raw) > MAX_COMMAND_BYTES:
        raise InvalidCommand(f"{len(raw)} bytes, limit {MAX_COMMAND_BYTES}")
    try:
        return RetrainCommand.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'command'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        raise InvalidCommand(problems) from None


def publish_command(
    producer: KafkaProducer, topic: str, command: RetrainCommand, timeout_s: float = 30.0
) -> None:
    """Send a command and wait until the broker has acknowledged it."""
    producer.send(topic, key=b"retrain", value=command.to_bytes()).get(timeout=timeout_s)
    log.info(
        "retrain requested on %s: request %s, reason %s (%s)",
        topic, command.request_id, command.reason, command.detail,
    )


def last_command(
    bootstrap_servers: str, topic: str, timeout_s: float = 10.0
) -> RetrainCommand | None:
    """The newest valid command on ``topic`` (one partition), or None if there is none.

    The feedback loop reads it at start so that its cooldown survives a restart.
    """
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False
    )
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        end = consumer.end_offsets([partition])[partition]
        if end == 0:
            return None
        consumer.seek(partition, end - 1)
        for records in consumer.poll(timeout_ms=int(timeout_s * 1000)).values():
            for record in reversed(records):
                try:
                    return parse_control(record.value)
                except InvalidCommand as exc:
                    log.warning("skipping invalid record at %s offset %d: %s",
                                topic, record.offset, exc)
        return None
    finally:
        consumer.close()
