"""The predictor's Prometheus metrics; labels are bounded (model, reason, feature), never users."""

from prometheus_client import Counter, Gauge, Histogram, Info

MODELS = ("rf", "xgb", "seq", "blend")

PREDICTION_LATENCY = Histogram(
    "model_prediction_latency_seconds",
    "Seconds of one scoring call of a model (a micro-batch, or one row for /predict); "
    "blend: the whole call, all three models and their blend",
    ["model"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
EVENT_LATENCY = Histogram(
    "prediction_event_latency_seconds",
    "From the Kafka timestamp of the oldest event a prediction answers to its scoring",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
BATCH_SECONDS = Histogram(
    "predictor_batch_seconds", "Seconds to process one micro-batch, writes and commit included"
)
EVENTS = Counter("predictor_events_total", "Valid user-activity events consumed by the predictor")
EVENTS_SKIPPED = Counter(
    "predictor_events_skipped_total", "Records the predictor skipped as invalid", ["reason"]
)
PREDICTIONS = Counter("predictions_total", "Predictions written to the table and the topic")
USERS_REBUILT = Counter(
    "predictor_users_rebuilt_total", "Users whose state was rebuilt from the database"
)
TRACKED_USERS = Gauge("predictor_tracked_users", "Users whose state this instance holds")
STATE_BYTES = Gauge("predictor_state_bytes", "Bytes held by the per-user feature state")
CONSUMER_LAG = Gauge(
    "predictor_consumer_lag_records", "Records behind the partition end", ["partition"]
)

RETRAINS = Counter("model_retrains_total", "Training runs started", ["reason"])
RETRAIN_FAILURES = Counter("model_retrain_failures_total", "Training runs that failed", ["reason"])
PROMOTIONS = Counter("model_promotions_total", "Training runs whose model was promoted", ["reason"])
RETRAIN_SECONDS = Histogram(
    "model_retrain_seconds", "Seconds one training run took",
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
)
MODEL_VERSION = Gauge("model_version_number", "Number of the serving model version (v<N>)")
MODEL_INFO = Info("model", "The serving model")

FEATURE_PSI = Gauge("feature_drift_psi", "PSI of a feature in the last drift window", ["feature"])
FEATURE_KS = Gauge("feature_drift_ks", "KS distance of a feature in the last window", ["feature"])
SCORE_PSI = Gauge("score_drift_psi", "PSI of the served score in the last drift window")
DRIFTED_SHARE = Gauge("drift_feature_share", "Share of features drifted in the last window")
DRIFT_WINDOWS = Counter("drift_windows_total", "Drift windows evaluated, by verdict", ["verdict"])
