"""Every setting of churn-stream, read in one place from the environment and ``.env``.

An unset variable, or one set to the empty string, means the embedded default: a SQLite
file under ``data/`` and a Kafka-protocol broker started on loopback. Production points
``KAFKA_BOOTSTRAP_SERVERS`` at a real cluster and ``DATABASE_URL`` (or the ``MSSQL_*``
parts) at SQL Server. A value that does not validate stops a service with one log line.
"""

from functools import lru_cache
from pathlib import Path
from typing import Annotated, TypeVar, get_args

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from churn_stream.errors import ConfigurationError

DATA_DIR = Path("data")
SettingsModel = TypeVar("SettingsModel", bound=BaseSettings)
Port = Annotated[int, Field(ge=0, le=65535)]
"""A TCP port; 0 turns a metrics endpoint off."""


class MssqlSettings(BaseSettings):
    """The parts of a SQL Server connection, assembled into a ``mssql+pyodbc://`` URL."""

    model_config = SettingsConfigDict(env_prefix="MSSQL_", env_file=".env", extra="ignore",
                                      env_ignore_empty=True)

    host: str | None = None
    """Server host name; unset means SQL Server is not configured."""
    port: Port = 1433
    database: str = "churn"
    user: str = "sa"
    password: SecretStr = SecretStr("")
    driver: str = "ODBC Driver 18 for SQL Server"
    """ODBC driver name as unixODBC knows it (``FreeTDS`` works too)."""
    trust_server_certificate: bool = True
    """Accept the server's self-signed certificate, as SQL Server in a container has."""

    def url(self, masked: bool = False) -> str:
        """The SQLAlchemy URL; ``masked`` hides the password for logs."""
        from sqlalchemy.engine import URL

        if not self.host:
            raise ValueError("MSSQL_HOST is not set")
        query = {"driver": self.driver}
        if self.trust_server_certificate:
            query["TrustServerCertificate"] = "yes"
        url = URL.create(
            "mssql+pyodbc",
            username=self.user,
            password=self.password.get_secret_value(),
            host=self.host,
            port=self.port,
            database=self.database,
            query=query,
        )
        return url.render_as_string(hide_password=masked)


class Settings(BaseSettings):
    """Settings shared by every service."""

    # ``NAME=`` (in .env, or compose passing an unset variable through) means unset.
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", env_ignore_empty=True)

    kafka_bootstrap_servers: str | None = None
    """``host:port[,host:port]`` of a Kafka cluster; unset starts the embedded broker."""
    embedded_broker_port: Port = 19092
    """Loopback port of the embedded broker when ``KAFKA_BOOTSTRAP_SERVERS`` is unset."""

    database_url: SecretStr | None = None
    """SQLAlchemy URL; unset means SQL Server from ``MSSQL_*`` if set, else SQLite."""
    sqlite_path: Path = DATA_DIR / "churn.db"
    """Where the embedded SQLite database lives."""

    topic_activity: str = "user-activity"
    topic_dead_letter: str = "user-activity.dlq"
    topic_predictions: str = "churn-predictions"
    topic_feedback: str = "churn-feedback"
    topic_control: str = "model-control"
    topic_partitions: int = Field(6, ge=1)
    """Partitions of ``user-activity``; the most predictors one group can use at once."""

    consumer_group: str = "churn-consumer"
    predictor_group: str = "churn-predictor"

    consumer_metrics_port: Port = 9101
    predictor_port: Port = 8000
    feedback_api_port: Port = 8001
    feedback_loop_metrics_port: Port = 9103
    producer_metrics_port: Port = 9104
    dashboard_port: Port = 8501
    predictor_url: str = "http://127.0.0.1:8000"
    """Where the dashboard asks the predictor which features drive a user's score."""
    risk_threshold: float = Field(0.5, gt=0, lt=1)
    """Score from which the dashboard counts a user as high risk (its starting value)."""

    batch_max_records: int = Field(5000, ge=1)
    """Most records the consumer takes in one poll and writes in one transaction.

    Larger transactions cost less per event: a batch dirties scattered index pages and the
    commit writes each once (bench/ingest.py, same box, medians of three: 26,900 events/s
    with 2,000, 37,300 with 5,000). A crash replays up to two batches, stored once.
    """
    batch_max_wait_ms: int = Field(500, ge=1)
    """Longest a record waits in a partly filled batch."""
    max_event_ahead_s: float = 86_400.0
    """Events stamped further than this in the future are dead-lettered."""

    churn_api_key: SecretStr | None = None
    """When set, write endpoints of the feedback API need it in ``X-API-Key``; empty (or
    blank) means unset."""
    feedback_max_body_bytes: int = Field(1_048_576, ge=1)
    """Largest request body the feedback API accepts (1 MiB); a larger one is refused with 413
    before it is read. A full batch of 1,000 items at their longest ASCII ids, indented,
    takes about 450 kB; long non-ASCII ids written as JSON escapes can need more."""

    feedback_api_host: str = "127.0.0.1"
    """Interface the feedback API binds; anything but loopback requires ``CHURN_API_KEY``."""
    feedback_api_url: str = "http://127.0.0.1:8001"
    """Where the simulator's outcome reporter reaches the feedback API."""
    outbox_interval_s: float = Field(1.0, gt=0)
    """How often stored feedback not yet on ``churn-feedback`` is looked for and published."""
    outbox_batch_max: int = Field(500, ge=1)
    """Most feedback rows published in one outbox pass."""

    feedback_loop_interval_s: float = Field(30.0, gt=0)
    """How often the feedback loop computes live performance and weighs a retrain."""
    live_metrics_top_k: int = Field(50, ge=1)
    """k of live precision-at-k: the share of churners among the k riskiest labelled users."""
    live_metrics_min_per_class: int = Field(5, ge=1)
    """Fewer churned (or retained) labelled users than this: no live metrics for a version."""
    live_metrics_min_lead_s: float = Field(86_400.0, ge=0)
    """A prediction counts for an outcome only if its activity is this long before it; the
    score right after a cancellation event says nothing about foresight."""
    retrain_min_new_outcomes: int = Field(200, ge=1)
    """Outcomes received since the last retrain request that make the loop ask for another."""
    retrain_min_per_class: int = Field(10, ge=1)
    """Fewer churned (or retained) outcomes than this in total: no feedback retrain."""
    retrain_degradation_margin: float = Field(0.05, ge=0)
    """Retrain when live ROC-AUC falls more than this below the validation ROC-AUC."""
    retrain_max_model_age_s: float = Field(86_400.0, gt=0)
    """Retrain (reason ``schedule``) when the serving model was trained longer ago than this."""
    retrain_cooldown_s: float = Field(1_800.0, ge=0)
    """Least time between two retrain requests of the feedback loop."""

    predictor_batch_max_records: int = Field(2000, ge=1)
    """Most events the predictor scores in one micro-batch (one vectorised call per model)."""
    predictor_batch_max_wait_ms: int = Field(5, ge=1)
    """Longest the first event of a micro-batch waits for more before the batch is scored.

    Short: while a batch is scored and written the next one gathers by itself, so waiting
    adds latency without adding throughput (bench/latency.py at 2,000 events/s: p50 136 ms
    and p99 over 1 s with 50 ms, p50 85 ms and p99 235 ms with 5 ms, same loaded box).
    """
    predictor_commit_interval_ms: int = Field(100, ge=0)
    """How often the predictor flushes its predictions to the broker and then commits its
    offsets (0: after every micro-batch). A crash replays at most this much of the stream."""
    predictor_train_retry_s: float = Field(5.0, gt=0)
    """While there is too little labelled history to train, how often the predictor retries."""
    predictor_first_run_users: int = Field(1000, ge=0)
    """Users (a seeded sample) the predictor's first training run reads, so that it serves
    within seconds of a start; a full-size run (reason ``warm-up``) follows at once in the
    background and replaces that model through the usual promotion. 0, or as many as a full
    run reads (5,000), makes the first run full size."""
    predictor_http_host: str = "127.0.0.1"
    """Interface the predictor's HTTP API (health, model, predict, metrics) binds."""
    promotion_tolerance: float = Field(0.01, ge=0)
    """A retrained model replaces the serving one unless its holdout ROC-AUC is lower than the
    serving model's on the same holdout by more than this."""
    min_serving_roc_auc: float = Field(0.6, ge=0, le=1)
    """No model whose own holdout ROC-AUC is below this is served, the first one included."""
    retrain_failure_injection: str | None = None
    """Tests only: ``raise`` or ``memory`` makes every retrain after the first fail that way."""
    drift_window_rows: int = Field(5000, ge=1)
    """Scored rows in one drift window, a prediction counted once per event it answers; a
    window also closes after ``drift_window_s``."""
    drift_window_s: float = Field(300.0, gt=0)
    """Longest a drift window stays open, so that slow traffic is still checked."""
    drift_min_rows: int = Field(1000, ge=1)
    """A window with fewer rows is not evaluated: on a few hundred rows, sampling noise in
    sparse features (purchase amounts, say) reads as drift."""
    drift_psi_threshold: float = Field(0.2, gt=0)
    """PSI above which a feature counts as drifted (0.1 to 0.2 reads as moderate)."""
    drift_ks_threshold: float = Field(0.1, gt=0, le=1)
    """KS distance above which a numeric feature's KS result says drifted (reported only)."""
    drift_score_psi_threshold: float = Field(0.2, gt=0)
    """PSI of the served score above which a window is drifted whatever its features do."""
    drift_min_features: int = Field(2, ge=1)
    """Features (beyond clocks and those constant in training) that must drift together for
    a window to count as drifted."""
    drift_persistence: int = Field(3, ge=1)
    """Drifted windows in a row that confirm drift."""
    drift_cooldown_s: float = Field(900.0, ge=0)
    """Least time from any retrain to a retrain for drift."""

    @field_validator("churn_api_key", mode="before")
    @classmethod
    def _blank_key_is_unset(cls, value: object) -> object:
        # ``CHURN_API_KEY=`` in .env or a compose file must not demand a key no client sends.
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        return None if isinstance(text, str) and not text.strip() else value

    @property
    def uses_embedded_broker(self) -> bool:
        return not self.kafka_bootstrap_servers

    @property
    def bootstrap_servers(self) -> str:
        """Where the Kafka clients connect."""
        return self.kafka_bootstrap_servers or f"127.0.0.1:{self.embedded_broker_port}"

    @property
    def uses_embedded_database(self) -> bool:
        """Neither ``DATABASE_URL`` nor ``MSSQL_HOST`` is set: the SQLite file is in force."""
        return self.database_url is None and not MssqlSettings().host

    def resolved_database_url(self) -> str:
        """The database URL in force, following the precedence in ``database_url``."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        if not self.uses_embedded_database:
            return MssqlSettings().url()
        return f"sqlite:///{self.sqlite_path}"

    def environment(self) -> dict[str, str]:
        """These settings as the environment variables that give a child process them."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if hasattr(value, "get_secret_value"):
                value = value.get_secret_value()
            env[name.upper()] = str(value)
        return env

    def describe(self) -> dict[str, object]:
        """The effective settings with secrets masked, for the start-up log line."""
        shown = self.model_dump(exclude={"database_url", "churn_api_key"})
        shown["bootstrap_servers"] = self.bootstrap_servers
        shown["database"] = mask_url(self.resolved_database_url())
        shown["churn_api_key"] = "set" if self.churn_api_key else "unset"
        return shown


def mask_url(url: str) -> str:
    """Hide the password in a database URL."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once, the ``MSSQL_*`` parts checked too.

    A value that does not validate raises ``ConfigurationError`` naming the variable, so that
    each service can refuse to start with one line instead of a traceback.
    """
    _read(MssqlSettings)
    return _read(Settings)


def _read(model: type[SettingsModel]) -> SettingsModel:
    try:
        return model()
    except ValidationError as exc:
        raise ConfigurationError(invalid_settings(model, exc)) from None


def invalid_settings(model: type[BaseSettings], exc: ValidationError) -> str:
    """What is wrong, per environment variable, with the value quoted unless it is a secret."""
    prefix = model.model_config.get("env_prefix", "")
    problems = []
    for error in exc.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        variable = (prefix + field).upper()
        annotation = model.model_fields[field].annotation if field in model.model_fields else None
        secret = annotation is SecretStr or SecretStr in get_args(annotation)
        value = error.get("input")
        shown = "" if secret or not isinstance(value, str) else f"={value[:40]!r}"
        problems.append(f"{variable}{shown}: {error['msg']}")
    return "invalid setting " + "; ".join(problems)
