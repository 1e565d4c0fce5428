"""The exception root of churn-stream and its small, named subclasses."""


class ChurnStreamError(Exception):
    """Root of every error this project raises on purpose."""

    retriable = False
    """Whether trying the same operation again later may succeed."""


class ConfigurationError(ChurnStreamError):
    """A setting is missing or unusable; the message names the variable to change."""


class AlreadyRunning(ChurnStreamError):
    """Another ``churn up`` runs on the same data folder; starting would take its database."""


class InvalidEvent(ChurnStreamError):
    """A record that is not a valid user-activity event.

    ``reason`` is a short, bounded code (safe as a metric label); ``detail`` says
    what exactly is wrong, for the dead-letter record and the log.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class BrokerUnavailable(ChurnStreamError):
    """The Kafka broker could not be reached in time."""

    retriable = True


class StorageUnavailable(ChurnStreamError):
    """The database refused or lost the connection; the write may be retried."""

    retriable = True


class NotEnoughData(ChurnStreamError):
    """There is not enough labelled history to train or evaluate a model yet.

    ``sampled``: the run read a sample of the stored users, all of them might be enough.
    """

    retriable = True

    def __init__(self, message: str, sampled: bool = False) -> None:
        super().__init__(message)
        self.sampled = sampled


class TrainingFailed(ChurnStreamError):
    """A training run failed; the model that was serving keeps serving."""


class TrainingStopped(TrainingFailed):
    """A training run was ended because its service is stopping."""


class InvalidCommand(ChurnStreamError):
    """A record on ``model-control`` that is not a valid command; it is skipped."""
