"""The naive predictor: what scoring looks like without micro-batches or online state.

For each event on its own: read the user's whole history from the database, compute the
features with the offline code path for that one user, call each model's stock ``predict``
on one row (scikit-learn ``predict_proba``, XGBoost ``Booster.predict`` on a ``DMatrix``,
Keras ``model.predict``), write the prediction in a transaction of its own, send it, and
commit the event's offset. The same models and features as the real predictor, so the ratio
measures the design, not the models.
"""

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
import xgboost as xgb
from kafka import KafkaConsumer, KafkaProducer

from churn_stream import storage
from churn_stream.events import Event, parse_event
from churn_stream.features import features_at
from churn_stream.models import ChurnModel

log = logging.getLogger(__name__)


class NaivePredictor:
    """Scores one event at a time, from the database, with one-row model calls."""

    def __init__(self, engine: sa.Engine, model: ChurnModel, consumer: KafkaConsumer,
                 producer: KafkaProducer, predictions_topic: str) -> None:
        self.engine, self.model = engine, model
        self.consumer, self.producer = consumer, producer
        self.predictions_topic = predictions_topic
        self.scored = 0

    def run(self, count: int, timeout_s: float = 600.0) -> float:
        """Score the next ``count`` events; returns the seconds they took."""
        started = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        done = 0
        while done < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the naive predictor scored {done} of {count} events")
            for batch in self.consumer.poll(timeout_ms=500, max_records=1).values():
                for record in batch:
                    self.handle(record.value)
                    self.consumer.commit()
                    done += 1
        return time.perf_counter() - started

    def handle(self, value: bytes) -> dict[str, Any]:
        """Score one event and write its prediction."""
        event = parse_event(value, max_ahead_s=86_400.0, now=datetime.now(UTC))
        history = self.history(event)
        queries = pd.DataFrame({"user_id": [event.user_id], "cutoff": [event.ts]})
        X, S = features_at(history, queries, self.model.space)
        scores = self.score(X, S)
        row = {"user_id": event.user_id, "scored_at": storage.to_db_time(datetime.now(UTC)),
               "event_ts": storage.to_db_time(event.ts), "model_version": self.model.version,
               "latency_ms": 0.0, **scores}
        with self.engine.begin() as conn:
            conn.execute(storage.predictions.insert(), [row])
        self.producer.send(self.predictions_topic, key=event.user_id.encode(),
                           value=json.dumps(row, default=str).encode())
        self.producer.flush()
        self.scored += 1
        return row

    def history(self, event: Event) -> pd.DataFrame:
        """The user's stored events up to this one, and this one (the consumer may not have
        stored it yet), as ``training.load_history`` shapes them."""
        table = storage.user_activity
        query = (sa.select(table.c.user_id, table.c.event_type, table.c.ts,
                           table.c.numeric_values, table.c.categorical_values)
                 .where(table.c.user_id == event.user_id,
                        table.c.ts <= storage.to_db_time(event.ts),
                        table.c.event_id != str(event.event_id))
                 .order_by(table.c.ts))
        with self.engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(query)]
        rows.append((event.user_id, event.event_type, storage.to_db_time(event.ts),
                     dict(event.numeric), dict(event.categorical)))
        frame = pd.DataFrame(rows, columns=["user_id", "event_type", "ts", "numeric_values",
                                            "categorical_values"])
        frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
        return frame

    def score(self, X: np.ndarray, S: np.ndarray) -> dict[str, float]:
        """Each model's stock one-row call, then the blend."""
        model = self.model
        forest = model.forest.estimator
        positive = int(np.flatnonzero(forest.classes_ == 1)[0])
        rf = float(forest.predict_proba(X)[0, positive])
        xgb_score = float(model.boosted.booster.predict(xgb.DMatrix(X))[0])
        sequence = model.sequence
        seq = float(sequence.network.predict([sequence.sequence.apply(S),
                                              sequence.static.apply(X)], verbose=0)[0, 0])
        weights = model.weights
        blend = weights["rf"] * rf + weights["xgb"] * xgb_score + weights["seq"] * seq
        return {"score": min(max(blend, 0.0), 1.0), "score_rf": rf, "score_xgb": xgb_score,
                "score_seq": seq}
